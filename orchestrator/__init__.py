"""Training orchestrator for LLaMA-family models.

Subpackages, named for where they run:

- ``config``: the typed schema registered with Hydra, its rules, and the
  composition of ``conf/`` with command-line overrides (login node and ranks).
- ``planning``: the resolved plan (layout, stages, padded vocabulary), the
  layout search, the memory and time model, FLOPs (login node; pure).
- ``data``: tokenizers, preprocessing, indexed shards, whole-run indexes and
  blending (preprocessing on login or array nodes; the sources on ranks).
- ``state``: checkpoints, integrity, re-sharding, weights, conversion and export.
- ``runtime``: one rank: the launcher environment, the training loop, the
  DeepSpeed engine and every DeepSpeed internal (``runtime.ds_compat``),
  faults, the monitor.
- ``launch``: the command line, the local launcher, SLURM rendering and
  submission, run folders (login node).
- ``status``: reading a run folder: ``python -m orchestrator.status RUN_DIR``.
- ``protocol`` (a module, both sides): what the launchers and the ranks agree
  on: exit codes, stop signals, start-up phases, the console pipe, reading
  heartbeats. A leaf: it imports nothing of ours, nor torch.
- ``slurm`` and ``worker`` (modules): ``python -m`` names of job scripts
  rendered before the regrouping, forwarding to ``launch.slurm`` and
  ``runtime.worker``; SLURM requeues a job with the script it was submitted
  with, so a queued job still runs these names.

Login-node code (``config``, ``planning``, ``launch``, ``status``) does not
import ``runtime`` at module level (the command line imports it inside the
functions that make the process a rank), and ``runtime`` never imports
``launch``; ``tests/test_import_graph.py`` holds both.
"""
