"""SLURM: the sbatch script rendered from the config, its submission, and the
commands the job runs (login node, and the job's first step on the allocation).

- ``render``: ``render_sbatch``, a pure function of the config, the plan and
  the run directory (fills ``slurm/template.sh``; every value quoted);
- ``submit``: the run directory written, then ``sbatch`` (or put back as it
  was when sbatch refuses);
- ``job``: ``prepare``, the job's first step (create or reuse RUN_DIR/config.yaml);
- ``checked_in``: the configs of ``slurm/llama*.sh`` and their rendering;
- ``cli``: ``python -m orchestrator.launch.slurm prepare RUN_DIR [--ntasks N]
  -- [OVERRIDE ...]`` and ``... render-checked-in [--check]``.

The names below are this package's interface (``from orchestrator.launch import slurm``).
"""

from orchestrator.launch.slurm.checked_in import CHECKED_IN, render_all, render_checked_in
from orchestrator.launch.slurm.cli import main
from orchestrator.launch.slurm.job import compose, prepare
from orchestrator.launch.slurm.render import (
    REPO_ROOT,
    SCRIPT_NAME,
    SLURM_DIR,
    TEMPLATE,
    JobShape,
    job_name,
    job_shape,
    render_sbatch,
    time_limit_s,
)
from orchestrator.launch.slurm.submit import find_sbatch, write_and_submit

__all__ = [
    "CHECKED_IN",
    "REPO_ROOT",
    "SCRIPT_NAME",
    "SLURM_DIR",
    "TEMPLATE",
    "JobShape",
    "compose",
    "find_sbatch",
    "job_name",
    "job_shape",
    "main",
    "prepare",
    "render_all",
    "render_checked_in",
    "render_sbatch",
    "time_limit_s",
    "write_and_submit",
]
