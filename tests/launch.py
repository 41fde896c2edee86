"""Run ``launch/run.py`` as a user would, from the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "launch" / "run.py")]


def run_launch(
    *overrides: str, expect: int = 0, timeout: float = 400
) -> subprocess.CompletedProcess[str]:
    """Run to completion; assert the exit code (output in the failure message)."""
    proc = subprocess.run(
        [*RUN, *overrides], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert proc.returncode == expect, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def start_launch(*overrides: str) -> subprocess.Popen[str]:
    """Start in the background (the caller stops it)."""
    return subprocess.Popen(
        [*RUN, *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )


def worker_pids(run_dir: Path) -> list[int]:
    """The worker processes of a run still alive."""
    out = subprocess.run(
        ["pgrep", "-f", f"orchestrator.runtime.worker {run_dir}"], capture_output=True, text=True
    )
    return sorted(int(p) for p in out.stdout.split())


def wait_for_steps(
    proc: subprocess.Popen[str], run_dir: Path, steps: int, *, timeout: float = 180
) -> None:
    """Until ``metrics.jsonl`` has ``steps`` lines; fails if the run ends or never gets there."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{run_dir}: {steps} steps not logged in {timeout}s"
        time.sleep(0.3)


def kill_run(proc: subprocess.Popen[str], run_dir: Path) -> None:
    """Test teardown: SIGKILL the launcher if it still runs, then any worker it left."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in worker_pids(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
