"""Start-up cannot hang silently: phases, the start-up timeout, stop signals, the op-build lock.

The multi-process cases run the real launcher and workers; the rest check the
heartbeat's rate limit and the laggard analysis on files alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.protocol import (
    EXIT_REQUEUE,
    STARTUP_PHASES,
    describe_laggards,
    phase_label,
    startup_order,
)
from orchestrator.runtime.faults import Heartbeat, Watchdog
from tests.launch import REPO, RUN, kill_run, start_launch, worker_pids

SMALL = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "parallel=tp1pp1",
    "parallel.dp=2",
    "train.log_interval=1",
]


def _wait_for_phase(proc: subprocess.Popen[str], beat: Path, phase: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{beat} never showed {phase}"
        try:
            if json.loads(beat.read_text())["phase"] == phase:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stale_build_lock_is_not_waited_on_and_the_console_shows_our_lines(
    tmp_path: Path,
) -> None:
    """A ``lock`` left by a killed build of DeepSpeed's CPU comm op: the run neither waits nor builds."""
    import torch.utils.cpp_extension as cpp

    ext = tmp_path / "ext"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext)
    try:
        op_dir = Path(cpp._get_build_directory("deepspeed_shm_comm", False))
    finally:
        del os.environ["TORCH_EXTENSIONS_DIR"]
    lock = op_dir / "lock"
    lock.touch()
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*RUN, *SMALL, "train.steps=2", "faults.startup_timeout_s=120", f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in op_dir.iterdir()) == ["lock"]  # nothing built, lock untouched
    # The console: our banner once, the progress lines; DeepSpeed's messages only in the log.
    assert proc.stdout.count("=" * 72) == 2, proc.stdout
    assert "step 2/2 | loss" in proc.stdout
    for noise in ("Setting accelerator", "DeepSpeed"):
        assert noise not in proc.stdout, proc.stdout
    log = (run_dir / "logs" / "rank_0.log").read_text()
    assert "Setting accelerator to CPU" in log and "step 2/2 | loss" in log


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rank_stalled_in_startup_is_named_by_phase(tmp_path: Path) -> None:
    run_dir = tmp_path / "stall"
    proc = start_launch(
        *SMALL,
        "train.steps=4",
        "faults.startup_timeout_s=8",
        "faults.inject_stall_rank=1",
        "faults.inject_stall_phase=data indexes",
        f"run.dir={run_dir}",
    )
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        kill_run(proc, run_dir)
    assert proc.returncode == 1
    # Whichever rank's watchdog fires first names its own phase (rank 1: the stalled one;
    # rank 0: the collective of a later phase it waits in); the launcher then names the
    # rank furthest behind from the heartbeats.
    assert "StartupTimeoutError: rank " in stderr, stderr[-3000:]
    assert "(faults.startup_timeout_s=8)" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("heartbeats at the end: furthest behind: rank 1 "), stderr
    assert last.endswith("start-up: data indexes)"), stderr
    assert worker_pids(run_dir) == []
    beat = json.loads((run_dir / "heartbeats" / "rank_1.json").read_text())
    assert beat["phase"] == "start-up: data indexes"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_in_startup_exits_for_requeue_within_seconds(tmp_path: Path) -> None:
    """Rank 1 sits in a start-up phase (a testing aid), rank 0 waits in a collective for it."""
    run_dir = tmp_path / "term"
    proc = start_launch(
        *SMALL,
        "train.steps=4",
        "faults.startup_timeout_s=600",
        "faults.inject_stall_rank=1",
        "faults.inject_stall_phase=engine",
        f"run.dir={run_dir}",
    )
    try:
        _wait_for_phase(proc, run_dir / "heartbeats" / "rank_1.json", "start-up: engine", 180)
        time.sleep(1.0)  # rank 0 is inside deepspeed.initialize's collectives by now
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        kill_run(proc, run_dir)
    assert proc.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert took < 15, took
    assert "stopped on a signal" in stdout
    assert worker_pids(run_dir) == []
    log = (run_dir / "logs" / "rank_1.log").read_text()
    assert "StopInStartup: rank 1 got SIGTERM in start-up phase 'engine'" in log
    assert not list((run_dir / "checkpoints").glob("step_*"))  # nothing to save yet


def test_training_beats_are_rate_limited_and_phase_changes_are_not(tmp_path: Path) -> None:
    hb = Heartbeat(tmp_path, 3, interval_s=0.5)
    hb.beat(0, phase_label("engine"))
    hb.beat(0, phase_label("first step"))  # another phase: written at once
    assert hb.writes == 2
    for step in range(1, 50):
        hb.beat(step, f"training step {step + 1}")
    assert hb.writes == 3  # the first training beat is a phase change; the rest wait
    assert json.loads(hb.path.read_text())["step"] == 1
    hb.flush_due()
    assert hb.writes == 3  # the interval has not passed
    time.sleep(0.6)
    hb.flush_due()
    record = json.loads(hb.path.read_text())
    assert hb.writes == 4 and record["step"] == 49 and record["phase"] == "training step 50"
    hb.beat(49, "checkpoint save")
    assert hb.writes == 5 and json.loads(hb.path.read_text())["phase"] == "checkpoint save"
    # A long phase outside training is repeated each interval: the rank is alive.
    saved = json.loads(hb.path.read_text())
    written = saved["time"]
    hb.flush_due()
    assert hb.writes == 5
    time.sleep(0.6)
    hb.flush_due()
    again = json.loads(hb.path.read_text())
    assert hb.writes == 6 and again["phase"] == "checkpoint save" and again["time"] > written
    assert again["phase_since"] == saved["phase_since"]  # the phase began at the save
    # In training a rank that stops stepping keeps its beat's time; only ``alive`` moves.
    hb.beat(50, "training step 51")
    time.sleep(0.6)
    hb.flush_due()
    stuck = json.loads(hb.path.read_text())
    time.sleep(0.6)
    hb.flush_due()
    later = json.loads(hb.path.read_text())
    assert later["time"] == stuck["time"] and later["step"] == 50
    assert later["alive"] > stuck["alive"] + 0.5


def test_a_frozen_rank_is_named_even_when_its_step_is_ahead(tmp_path: Path) -> None:
    # The race of a collective's last message: the frozen rank got through the step its
    # peers still wait in. Its watchdog thread is frozen with it, so its beat goes quiet.
    waiting = [Heartbeat(tmp_path, r, interval_s=0.2) for r in (0, 2)]
    frozen = Heartbeat(tmp_path, 1, interval_s=0.2)
    for hb in waiting:
        hb.beat(22, "training step 23")
    frozen.beat(23, "training step 24")
    deadline = time.monotonic() + 2.5  # over 2 intervals and a watchdog tick
    while time.monotonic() < deadline:
        for hb in waiting:
            hb.flush_due()
        time.sleep(0.05)
    found = waiting[0].laggards(world_size=3, since=time.time() - 60)
    assert [b["rank"] for b in found.quiet] == [1]
    assert [b["rank"] for b in found.behind] == [0, 2]
    text = describe_laggards(found, skip=0)
    assert text.startswith("not responding (the others kept beating): rank 1 (")
    assert "step 23, training step 24, silent " in text
    assert "furthest behind: rank 2 (" in text
    # While all beat, nobody is quiet: the lowest step is the one behind.
    frozen.flush_due()
    time.sleep(0.25)
    for hb in (*waiting, frozen):
        hb.flush_due()
    found = waiting[0].laggards(world_size=3, since=time.time() - 60)
    assert found.quiet == [] and [b["rank"] for b in found.behind] == [0, 2]


def _write_beat(run_dir: Path, rank: int, step: int, phase: str, when: float) -> None:
    beats = run_dir / "heartbeats"
    beats.mkdir(exist_ok=True)
    record = {"rank": rank, "step": step, "phase": phase, "time": when, "host": f"n{rank}"}
    (beats / f"rank_{rank}.json").write_text(json.dumps(record))


def test_laggards_are_the_earliest_phase_and_ranks_without_a_beat(tmp_path: Path) -> None:
    now = time.time()
    for rank in range(6):
        _write_beat(tmp_path, rank, 0, phase_label("engine"), now)
    _write_beat(tmp_path, 2, 0, phase_label("data indexes"), now)
    _write_beat(tmp_path, 4, 0, phase_label("data indexes"), now)
    _write_beat(tmp_path, 5, 7, "training step 8", now - 3600)  # a previous start's
    hb = Heartbeat(tmp_path, 0)
    found = hb.laggards(world_size=8, since=now - 60)
    assert [b["rank"] for b in found.behind] == [2, 4]
    assert found.missing == [5, 6, 7] and found.quiet == []
    dog = Watchdog(hb, timeout_s=60, startup_timeout_s=30, world_size=8, reporter=True)
    dog.phase = phase_label("engine")
    text = dog._message(31)
    assert text.startswith("StartupTimeoutError: rank 0 spent 31s in 'start-up: engine'")
    assert "furthest behind: rank 2 (n2, step 0, start-up: data indexes), rank 4" in text
    assert "no heartbeat from 3 rank(s): 5, 6, 7" in text
    quiet = Watchdog(
        Heartbeat(tmp_path, 3), timeout_s=60, startup_timeout_s=30, world_size=8, reporter=False
    )
    assert quiet._message(31).endswith("rank 0 names the ranks behind")


def test_training_ranks_are_ahead_of_every_startup_phase(tmp_path: Path) -> None:
    now = time.time()
    _write_beat(tmp_path, 0, 5, "training step 6", now)
    _write_beat(tmp_path, 1, 3, "training step 4", now)
    _write_beat(tmp_path, 2, 0, phase_label("first step"), now)
    found = Heartbeat(tmp_path, 0).laggards(world_size=3, since=now - 60)
    assert [b["rank"] for b in found.behind] == [2] and found.missing == []
    assert [startup_order(phase_label(p)) for p in STARTUP_PHASES] == list(
        range(len(STARTUP_PHASES))
    )
    assert startup_order("training step 3") is None
