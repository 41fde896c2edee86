"""One rank of a run: from ``python -m orchestrator.runtime.worker`` to its last step.

- ``dist_env``: the only reader of the launcher's environment variables (a
  package: torchrun in its ``__init__``, ``slurm``, ``mpi``, the shared ``values``).
- ``worker``: a rank's entry point; ``train``: start-up top to bottom, then
  ``loop``: each step, its verdict, evaluation, checkpoint and stop;
  ``steppers``: one step and one evaluation per engine kind; ``resume``: the
  built ``Run`` and its checkpoint save, restore and roll-back; ``aids``: the
  ``faults.inject_*`` testing aids behind the loop's hooks.
- ``engine``: the DeepSpeed engine and its JSON; ``ds_compat``: every use of
  DeepSpeed beyond its public API, behind one door.
- ``startup``, ``faults``: the start-up guard, stop requests, heartbeats and the hang
  watchdog (the exit codes, phases and signals they share with the launchers:
  ``orchestrator.protocol``).
- ``numerics``: bad steps and roll-backs; ``commwait``: time inside collectives.
- ``monitor``: the banner, progress lines and metrics sinks; ``schedule``: the
  learning-rate schedule.

Never imports ``orchestrator.launch``.
"""
