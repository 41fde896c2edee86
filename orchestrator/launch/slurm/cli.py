"""``python -m orchestrator.launch.slurm``: ``prepare`` (the job's first step) and
``render-checked-in``; a bad setting is one ``error:`` line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.compose import describe_error
from orchestrator.launch.run_folder import write_atomic
from orchestrator.launch.slurm.checked_in import render_all
from orchestrator.launch.slurm.job import prepare


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare`` and ``render-checked-in``; a bad setting is one ``error:`` line, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.launch.slurm")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="create or reuse RUN_DIR/config.yaml")
    prep.add_argument("run_dir", type=Path)
    prep.add_argument("--ntasks", type=int, default=0, help="the job's tasks (SLURM_NTASKS)")
    prep.add_argument("--job-id", default="", help="recorded in RUN_DIR/job_id (SLURM_JOB_ID)")
    render = commands.add_parser("render-checked-in", help="regenerate slurm/llama*.sh")
    render.add_argument("--check", action="store_true", help="only report stale scripts")
    # Config overrides follow "--" (none: the run directory must already have a config).
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    try:
        if args.command == "prepare":
            print(prepare(args.run_dir, argv[split + 1 :], ntasks=args.ntasks), flush=True)
            if args.job_id:  # for ``python -m orchestrator.status RUN_DIR``
                write_atomic(args.run_dir / "job_id", args.job_id + "\n")
            return 0
        return render_all(check=args.check)
    except (ValueError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2
