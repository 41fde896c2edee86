"""Hangs: a rank stopped with SIGSTOP trips the watchdog, and the job fails naming it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _worker_pids(run_dir: Path) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-f", f"orchestrator.worker {run_dir}"], capture_output=True, text=True
    )
    return sorted(int(p) for p in out.stdout.split())


def test_stopped_rank_trips_the_hang_timeout(tmp_path: Path) -> None:
    run_dir = tmp_path / "hang"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "launch" / "run.py"),
            "model=tiny",
            "data=synthetic",
            "parallel=tp2pp1",
            "train.steps=100000",
            "train.log_interval=1",
            "faults.hang_timeout_s=8",
            f"run.dir={run_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    stopped: list[int] = []
    try:
        beat = run_dir / "heartbeats" / "rank_1.json"
        deadline = time.monotonic() + 180
        while not (beat.exists() and json.loads(beat.read_text())["step"] >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.3)
        rank1 = json.loads(beat.read_text())["pid"]
        os.kill(rank1, signal.SIGSTOP)  # alive but frozen: its peers wait in a collective
        stopped.append(rank1)
        frozen_at = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        assert time.monotonic() - frozen_at < 60  # the job ends in seconds, not hours
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _worker_pids(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank 0 failed" in stderr, stderr[-2000:]
    assert "HangError: rank 0 made no progress" in stderr
    assert "furthest behind: rank 1" in stderr
    assert _worker_pids(run_dir) == []
