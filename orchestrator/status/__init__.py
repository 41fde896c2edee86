"""Reading a run folder: ``python -m orchestrator.status RUN_DIR [--follow] [--plot PNG]``.

- ``report``: gathering a run's state; ``view``: the text report and the plot.
- ``logs``: the last warnings and errors of rank logs, read from their tails.
- ``ranks``: heartbeats: who is behind, who is slow.
- ``metrics``: the progress line and ``metrics.jsonl`` format (written by a
  rank, read here).
"""
