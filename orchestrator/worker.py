"""``python -m orchestrator.worker RUN_DIR``: the name before the regrouping, kept for queued jobs.

A SLURM job requeues with the batch script it was submitted with, so a job
rendered before 2026-12-03 starts its ranks with this name on every requeue.
Only the module's name changed; ``orchestrator.runtime.worker`` does the work
(importing it first holds the stop signals, as starting it directly does).
"""

import sys

if __name__ == "__main__":
    from orchestrator.runtime.worker import main

    sys.exit(main(sys.argv[1:]))
