"""Submitting a rendered job: the run directory written, then ``sbatch``, or nothing changed."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from orchestrator.launch.run_folder import write_atomic
from orchestrator.launch.slurm.render import SCRIPT_NAME


def find_sbatch() -> str:
    """The sbatch on PATH; ``ValueError`` when there is none."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError(
            "launcher=slurm: sbatch is not on PATH; run this on a SLURM login node, "
            "or add slurm.submit=false to only write the run directory and its script"
        )
    return sbatch


def write_and_submit(
    run_dir: Path, files: Mapping[str, str], *, sbatch: str | None, cwd: Path
) -> str | None:
    """Write ``files`` (name -> text, the script as ``job.sh``) into ``run_dir``; submit it.

    Returns the job id, or None when ``sbatch`` is None (render only). When
    sbatch refuses the job the run directory is put back as it was (removed
    if this call created it) and ``ValueError`` carries sbatch's message.
    """
    created = not run_dir.exists()
    previous = {name: _read(run_dir / name) for name in files}
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch's --output goes here
    try:
        for name, text in files.items():
            write_atomic(run_dir / name, text)
        if sbatch is None:
            return None
        job_id = _sbatch(sbatch, run_dir / SCRIPT_NAME, cwd=cwd)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for name, old in previous.items():
                if old is None:
                    (run_dir / name).unlink(missing_ok=True)
                else:
                    write_atomic(run_dir / name, old)
        raise
    write_atomic(run_dir / "job_id", job_id + "\n")  # status knows the job while it is pending
    return job_id


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _sbatch(sbatch: str, script: Path, *, cwd: Path) -> str:
    try:
        result = subprocess.run(
            [sbatch, "--parsable", str(script)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"launcher=slurm: could not run sbatch: {exc}") from exc
    job_id = result.stdout.strip().split(";")[0]
    if result.returncode != 0 or not job_id.isdigit():
        lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise ValueError(
            f"launcher=slurm: sbatch refused the job: {reason} (check cluster.partition, "
            "cluster.account, cluster.time_limit, slurm.extra_sbatch_args)"
        )
    return job_id
