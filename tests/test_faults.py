"""Hangs: a rank stopped with SIGSTOP trips the watchdog, and the job fails naming it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.launch import start_launch, worker_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_stopped_rank_trips_the_hang_timeout(tmp_path: Path) -> None:
    run_dir = tmp_path / "hang"
    proc = start_launch(
        "model=tiny",
        "data=synthetic",
        "parallel=tp2pp1",
        "train.steps=100000",
        "train.log_interval=1",
        "faults.hang_timeout_s=8",
        f"run.dir={run_dir}",
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
        for pid in worker_pids(run_dir):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "rank 0 failed" in stderr, stderr[-2000:]
    assert "HangError: rank 0 made no progress" in stderr
    assert "furthest behind: rank 1" in stderr
    assert worker_pids(run_dir) == []
