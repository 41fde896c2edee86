"""Hangs: a rank stopped with SIGSTOP trips the watchdog, and the job fails naming it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from orchestrator.state.checkpoint import checkpoint_dir
from orchestrator.status.metrics import read_metrics
from tests.checkpoint_files import weights_and_optimiser
from tests.launch import kill_run, run_launch, start_launch, worker_pids

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
        kill_run(proc, run_dir)
    assert proc.returncode != 0
    assert "rank 0 failed" in stderr, stderr[-2000:]
    assert "HangError: rank 0 made no progress" in stderr
    # Named by rank 0's watchdog and again by the launcher: rank 1 went quiet.
    assert stderr.count("not responding (the others kept beating): rank 1 (") == 2, stderr
    assert worker_pids(run_dir) == []


NAN_RUN = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "parallel=tp1pp1",
    "parallel.dp=2",
    "train.steps=8",
    "train.log_interval=1",
]


def test_consecutive_skips_roll_back_to_the_last_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "rollback"
    proc = run_launch(
        *NAN_RUN,
        f"run.dir={run_dir}",
        "faults.inject_nan_at_steps=[5,6]",
        "faults.max_consecutive_skips=2",
        "checkpoint.interval=4",
    )
    assert "2 consecutive non-finite steps: rolled back to step_00000004 (step 4)" in proc.stdout
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [int(m["step"]) for m in metrics]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # steps 5-6 again, on the next batches
    assert all(math.isfinite(m["loss"]) for m in metrics[6:])
    # the data moved on: 10 steps' worth of samples were consumed for 8 steps of progress
    assert metrics[-1]["consumed_tokens"] == 10 * 8 * 128


def test_numerics_guard_policy() -> None:
    from orchestrator.runtime.numerics import NumericsGuard

    guard = NumericsGuard(max_consecutive_skips=2, spike_factor=2.0, spike_window=3)
    assert guard.observe(4.0, skipped=False).rollback == ""
    assert guard.observe(float("nan"), skipped=False).skipped  # a NaN loss is a skip
    assert guard.observe(4.0, skipped=False).rollback == ""  # the run of skips is broken
    assert guard.observe(3.0, skipped=True).skipped  # DeepSpeed skipped: inf grad norm
    verdict = guard.observe(3.0, skipped=True)
    assert verdict.skipped and verdict.rollback == "2 consecutive non-finite steps"
    guard.after_rollback()
    for loss in (3.0, 3.0, 3.0):
        assert guard.observe(loss, skipped=False).rollback == ""
    assert guard.observe(5.9, skipped=False).rollback == ""  # below 2 x 3.0
    # the window is now (3.0, 3.0, 5.9), mean 3.97: 8.5 is a spike
    assert guard.observe(8.5, skipped=False).rollback.startswith("loss spike 8.5000 > 2 x 3.9667")
    assert guard.skipped_total == 3


def test_loss_spike_rolls_back_the_weights_and_moves_the_data_on(tmp_path: Path) -> None:
    """A bad step that *was* applied is undone: the run ends where skipping that batch ends.

    The reference skips the same batch instead (a NaN step: no update, the lr
    and Adam's step count held, the batch consumed) and takes one more step to
    make up for it; with a constant lr after warmup both end with the same
    weights and optimiser state, bit for bit. A rollback that kept the spiked
    update, or replayed the bad batch, cannot.
    """
    common = [
        "model=tiny",
        "data=demo",
        "parallel=tp1pp1",
        "parallel.dp=2",
        "train.log_interval=1",
        "train.warmup_steps=1",
        "train.min_lr_ratio=1.0",
        "train.eval_interval=0",
        "checkpoint.interval=4",
    ]
    rolled, skipped = tmp_path / "rolled", tmp_path / "skipped"
    proc = run_launch(
        *common,
        f"run.dir={rolled}",
        "train.steps=9",  # as the reference: the data index depends on it
        "train.exit_at_step=8",
        "faults.inject_spike_at_steps=[5]",
        "faults.spike_factor=3",
        "faults.spike_window=2",
    )
    assert "loss spike" in proc.stdout and "rolled back to step_00000004 (step 4)" in proc.stdout
    metrics = read_metrics(rolled / "metrics.jsonl")
    assert [int(m["step"]) for m in metrics] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert metrics[4]["loss"] > 100 * metrics[3]["loss"]  # the spike was real and applied
    run_launch(*common, f"run.dir={skipped}", "train.steps=9", "faults.inject_nan_at_steps=[5]")
    reference = read_metrics(skipped / "metrics.jsonl")
    assert metrics[-1]["consumed_tokens"] == reference[-1]["consumed_tokens"] == 9 * 8 * 128
    for mine, theirs in zip(metrics[5:], reference[5:], strict=True):
        assert mine["loss"] == theirs["loss"], (mine, theirs)  # the same batches after the bad one
    got = weights_and_optimiser(checkpoint_dir(rolled) / "step_00000008")
    want = weights_and_optimiser(checkpoint_dir(skipped) / "step_00000009")
    assert got.keys() == want.keys() and len(want) > 4
    for name in want:
        assert torch.equal(got[name], want[name]), name
