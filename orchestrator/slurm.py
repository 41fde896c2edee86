"""``python -m orchestrator.slurm``: the name before the regrouping, kept for queued jobs.

A SLURM job requeues with the batch script it was submitted with (SLURM keeps
its own copy), so a job rendered before 2026-12-03 runs ``python -m
orchestrator.slurm prepare`` on every requeue, whatever its ``job.sh`` says
now. Only the module's name changed; ``orchestrator.launch.slurm`` does the work.
"""

import sys

if __name__ == "__main__":
    from orchestrator.launch.slurm.cli import main

    sys.exit(main())
