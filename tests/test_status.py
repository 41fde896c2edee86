"""``python -m orchestrator.status``: finished, live, hung and SLURM runs; the plot."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import status_scale
from bench.status_scale import make_run
from orchestrator.status.logs import last_errors
from orchestrator.status.metrics import MetricsTail, read_metrics
from orchestrator.status.ranks import RankBeat, find_stragglers
from orchestrator.status.report import StatusReader, collect, main
from orchestrator.status.view import render, startup_line
from tests.launch import REPO, kill_run, run_launch, start_launch, wait_for_steps, worker_pids

STEPS = 6
TINY = ("model=tiny", "parallel=tp1pp1", "train.log_interval=1")


def _status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.status", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in run_dir.rglob("*")
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run on the demo data, with validation at steps 0, 3 and 6."""
    run_dir = tmp_path_factory.mktemp("status") / "finished"
    run_launch(
        *TINY,
        f"train.steps={STEPS}",
        "train.eval_interval=3",
        "train.eval_iters=1",
        f"run.dir={run_dir}",
    )
    return run_dir


def test_not_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: not a run directory (no config.yaml)\n"
    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finished_run(finished: Path, tmp_path: Path) -> None:
    before = _snapshot(finished)
    proc = _status(str(finished))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    last = read_metrics(finished / "metrics.jsonl")[-1]
    assert "job: local: finished" in out
    assert f"step {STEPS}/{STEPS}" in out and "100.0%" in out
    assert f"loss {last['loss']:.4f}" in out
    assert f"tokens/s {last['tokens_per_s']:,.0f}" in out
    assert f"mfu {100 * last['mfu']:.2f}%" in out
    assert "eta done" in out
    assert "valid_loss " in out and "valid_loss n/a" not in out
    assert f"checkpoint: step_{STEPS:08d} (" in out
    assert "hang suspects: none" in out and "stragglers: none" in out
    # --follow on an ended run prints once, with its progress bar, and returns
    follow = _status(str(finished), "--follow", "--interval", "0.2")
    assert follow.returncode == 0 and follow.stdout.count("job: local: finished") == 1
    # the plot, written outside the run directory
    png = tmp_path / "curves.png"
    plotted = _status(str(finished), "--plot", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 800
    assert float(np.std(pixels[..., :3])) > 0.05  # curves and text, not a blank canvas
    # status never writes into the run directory
    assert _snapshot(finished) == before


def _beat(path: Path, **fields: object) -> None:
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(fields)
    path.write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stale_heartbeat_and_straggler(finished: Path, tmp_path: Path) -> None:
    """A copy of the run whose heartbeats say: rank 1 silent for an hour, rank 2 slow."""
    run_dir = tmp_path / "copy"
    shutil.copytree(finished, run_dir)
    beats = run_dir / "heartbeats"
    now = time.time()
    template = json.loads((beats / "rank_0.json").read_text())
    # lockstep: one step time; rank 2 is busy for most of it, the others wait for it
    for rank, age, busy in [(0, 1.0, 0.2), (1, 3600.0, 0.2), (2, 2.0, 0.85), (3, 1.0, 0.21)]:
        fields = {"rank": rank, "step": 4, "phase": "training step 5", "time": now - age}
        step = {"step_time_s": 0.9, "busy_s": busy}
        _beat(beats / f"rank_{rank}.json", **{**template, **fields, **step})
    proc = _status(str(run_dir))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "job: local: running (4 of 4 ranks active)" in out
    suspects = out.split("hang suspects:")[1].split("stragglers:")[0]
    assert re.search(
        r"rank 1 \(.*\): no heartbeat for 36\d\ds, in training step 5 at step 4", suspects
    )
    for rank in (0, 2, 3):
        assert f"rank {rank} (" not in suspects
    stragglers = out.split("stragglers:")[1].split("last errors:")[0]
    assert "rank 2 (" in stragglers and "busy 0.850s of a 0.900s step" in stragglers
    for rank in (0, 1, 3):
        assert f"rank {rank} (" not in stragglers
    # heartbeats of a run from before busy times: the step times are compared
    for rank, step_time in [(0, 0.2), (1, 0.2), (2, 0.9), (3, 0.21)]:
        record = json.loads((beats / f"rank_{rank}.json").read_text())
        del record["busy_s"]
        (beats / f"rank_{rank}.json").write_text(json.dumps({**record, "step_time_s": step_time}))
    stragglers = _status(str(run_dir)).stdout.split("stragglers:")[1]
    assert "rank 2 (" in stragglers and "0.900s per step" in stragglers
    assert "rank 0 (" not in stragglers and "rank 3 (" not in stragglers
    # every rank silent: not responding
    for rank in range(4):
        _beat(beats / f"rank_{rank}.json", time=now - 7200)
    silent = _status(str(run_dir)).stdout
    assert re.search(r"job: local: not responding: no heartbeat for 72\d\ds", silent)


def _beats_after_slow_steps(run_dir: Path, *, timeout: float) -> list[dict[str, Any]]:
    """Both ranks' beats once they carry step times of the slowed steps (beats are rate-limited)."""
    deadline = time.monotonic() + timeout
    while True:
        beats = [json.loads(p.read_text()) for p in sorted((run_dir / "heartbeats").glob("*.json"))]
        if min(b.get("step_time_s") or 0.0 for b in beats) > 0.5 or time.monotonic() > deadline:
            return beats
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_real_straggler_is_named(tmp_path: Path) -> None:
    """dp2, rank 1 made slow: both ranks' step times are equal, rank 1 is named by its busy time."""
    run_dir = tmp_path / "slow"
    proc = start_launch(
        "model=tiny",
        "parallel=tp1pp1",
        "parallel.dp=2",
        "data=synthetic",
        "train.steps=100000",
        "train.log_interval=1",
        "faults.inject_slow_rank=1",
        "faults.inject_slow_s=0.5",
        f"run.dir={run_dir}",
    )
    try:
        wait_for_steps(proc, run_dir, 6, timeout=240)
        beats = _beats_after_slow_steps(run_dir, timeout=60)
        # lockstep: rank 0 never sleeps, yet its steps take the 0.5 s too
        assert min(b["step_time_s"] for b in beats) > 0.5
        assert beats[1]["busy_s"] > 0.5 > beats[0]["busy_s"]  # rank 0 waits for rank 1
        out = _status(str(run_dir)).stdout
        stragglers = out.split("stragglers:")[1].split("last errors:")[0]
        assert "rank 1 (" in stragglers and "rank 0 (" not in stragglers, out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        finally:
            kill_run(proc, run_dir)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_job_state_from_scontrol(finished: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "slurm_run"
    shutil.copytree(finished, run_dir)
    (run_dir / "job.sh").write_text("#!/bin/bash\n")
    (run_dir / "logs" / "slurm-4242.out").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2 $3" = "show job 4242" ] || exit 1\n'
        'echo "JobId=4242 JobName=llama"\necho "   JobState=PENDING Reason=Priority Dependency=(null)"\n'
    )
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = _status(str(run_dir), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "job: slurm job 4242: PENDING (Priority); ranks: finished" in proc.stdout
    (run_dir / "logs" / "slurm-4242.out").unlink()
    proc = _status(str(run_dir), env=env)
    assert "job: slurm (job.sh written, no job id found" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_live_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "live"
    proc = start_launch(*TINY, "data=synthetic", "train.steps=100000", f"run.dir={run_dir}")
    try:
        wait_for_steps(proc, run_dir, 3)
        live = _status(str(run_dir))
        assert live.returncode == 0, live.stderr
        assert "job: local: running (1 of 1 ranks active)" in live.stdout
        assert "/100000" in live.stdout and "hang suspects: none" in live.stdout
        assert "checkpoint: none yet" in live.stdout
        assert proc.poll() is None  # status left the run alone
        # stop it cleanly: SIGTERM -> checkpoint -> exit for requeue
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        assert proc.returncode == 75
        assert worker_pids(run_dir) == []
        stopped = _status(str(run_dir)).stdout
        last = int(read_metrics(run_dir / "metrics.jsonl")[-1]["step"])
        assert f"job: local: stopped at step {last} of 100000" in stopped
        assert f"checkpoint: step_{last:08d} (" in stopped
    finally:
        kill_run(proc, run_dir)


# Fast checks on generated run folders and heartbeats (no processes).

NOW = 1_800_000_000.0


def _rank_beat(rank: int, step: int, age: float, **fields: Any) -> RankBeat:
    values: dict[str, Any] = {
        "host": f"node{rank // 8:03d}",
        "pid": 100 + rank,
        "phase": f"training step {step + 1}",
        "step_time_s": 0.1,
        "peak_mem_gb": None,
        "busy_s": 0.08,
        "phase_s": age,
    }
    values.update(fields)
    return RankBeat(rank=rank, step=step, age_s=age, time=NOW - age, **values)


@pytest.mark.parametrize(("num_ranks", "log_kib"), [(64, 160), (2048, 70)])
def test_generated_run_names_the_stale_rank(tmp_path: Path, num_ranks: int, log_kib: int) -> None:
    """Beats staggered over 5 s at 1.2 s a step, rank 21 silent for 5 minutes; at 2,048
    ranks too (the timing is bench/status_scale.py's)."""
    run_dir = tmp_path / "run"
    make_run(
        run_dir, num_ranks=num_ranks, log_bytes=log_kib * 1024, metrics_rows=3000, stale_rank=21
    )
    out = render(collect(run_dir))
    assert f"job: local: running ({num_ranks} of {num_ranks} ranks active)" in out
    assert f"step {status_scale.STEP}/{status_scale.TOTAL_STEPS}" in out
    assert "valid_loss 2.1000" in out
    suspects = out.split("hang suspects:")[1].split("stragglers:")[0]
    assert re.findall(r"rank (\d+) \(", suspects) == ["21"], out
    assert "no heartbeat for 30" in suspects and "in training step" in suspects
    # the staggered beats are no step lag; the silent rank is far behind
    stragglers = out.split("stragglers:")[1].split("last errors:")[0]
    assert re.findall(r"rank (\d+) \(", stragglers) == ["21"], out
    errors = out.split("last errors:")[1]
    assert status_scale.TAIL_WARNING in errors and status_scale.START_ERROR not in errors
    # a second silent rank, silent for less long: listed after the first
    _beat(run_dir / "heartbeats" / "rank_5.json", time=time.time() - 100)
    suspects = render(collect(run_dir)).split("hang suspects:")[1].split("stragglers:")[0]
    assert re.findall(r"rank (\d+) \(", suspects) == ["21", "5"]


def test_follow_reads_on(tmp_path: Path) -> None:
    """One reader across refreshes sees appended lines, new rows and a replaced log."""
    run_dir = tmp_path / "run"
    make_run(run_dir, num_ranks=8, log_bytes=140 * 1024, metrics_rows=500, stale_rank=None)
    reader = StatusReader(run_dir)
    first = reader.collect()
    assert first.last is not None and first.last["step"] == status_scale.STEP
    assert not first.stale and not first.stragglers
    log = run_dir / "logs" / "rank_3.log"
    with log.open("a") as f:
        f.write("2099-01-01 00:00:00 [rank 3 node000] ERROR the newest\n2099-01-01 00:00:01 [ra")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": status_scale.STEP + 1, "loss": 1.5}) + "\n")
        f.write(json.dumps({"step": status_scale.STEP + 1, "valid_loss": 1.25}) + "\n")
        f.write('{"step": 999999, "loss"')  # still being written
    second = reader.collect()
    assert second.errors[-1] == "rank_3.log: 2099-01-01 00:00:00 [rank 3 node000] ERROR the newest"
    assert second.last == {"step": status_scale.STEP + 1, "loss": 1.5}
    assert second.last_valid == {"step": status_scale.STEP + 1, "valid_loss": 1.25}
    with log.open("a") as f:  # the line being written ends
        f.write("nk 3 node000] CRITICAL later still\n")
    assert reader.collect().errors[-1].endswith("CRITICAL later still")
    log.unlink()  # rotated: a new, shorter file under the same name is read anew
    log.write_text("2098-01-01 00:00:00 [rank 3 node000] WARNING after rotation\n")
    assert reader.collect().errors[-1].endswith("WARNING after rotation")
    assert collect(run_dir).errors == reader.collect().errors  # a fresh reader agrees


def _log(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def test_last_errors_reads_the_tail_only(tmp_path: Path) -> None:
    info = "2026-12-02 03:14:17 [rank 5 node017] INFO step 120/1000 | loss 2.3456 | lr 1.500e-04"
    early = "2026-12-02 03:00:00 [rank 5 node017] ERROR early, beyond the tail"
    cut = "2026-12-02 03:10:00 [rank 5 node017] INFO " + "x" * 200 + "] ERROR cut in two"
    late = "2026-12-02 03:20:00 [rank 5 node017] WARNING late, at the end"
    tail = 64 * 1024
    filler = [info] * (2 * tail // len(info))
    _log(tmp_path / "logs" / "rank_5.log", [early, *filler, cut, *filler[:2], late])
    # the window starts inside the cut line, past its start and before its ERROR
    text = (tmp_path / "logs" / "rank_5.log").read_text()
    size, window = len(text), len(text) - text.index(cut) - 50
    assert last_errors(tmp_path, tail_bytes=window) == [f"rank_5.log: {late}"]
    # the default window (64 KiB) holds the last two, not the first, 128 KiB back
    assert last_errors(tmp_path) == [f"rank_5.log: {cut}", f"rank_5.log: {late}"]
    # a window over the whole file finds them all, oldest first
    everything = last_errors(tmp_path, tail_bytes=size + 1)
    assert everything == [f"rank_5.log: {text}" for text in (early, cut, late)]
    # a traceback without a timestamp takes the newest line's before it
    _log(
        tmp_path / "logs" / "rank_6.log",
        [
            info.replace("03:14:17", "03:25:00"),
            "Traceback (most recent call last):",
            "ValueError: bad",
        ],
    )
    assert last_errors(tmp_path)[-3:] == [
        f"rank_5.log: {late}",
        "rank_6.log: Traceback (most recent call last):",
        "rank_6.log: ValueError: bad",
    ]


def test_metrics_tail_matches_read_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 3.0 - s / 1e4, "lr": 1e-4} for s in range(1, 3001)]
    rows.insert(1000, {"step": 1000, "valid_loss": 2.9, "valid_ppl": 18.2})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3001, "lo')
    tail = MetricsTail(path, window=512)  # the valid row is 2,000 rows back: windows grow
    tail.refresh()
    assert tail.train == read_metrics(path)[-1] and tail.train["step"] == 3000
    assert tail.valid == read_metrics(path, kind="valid")[-1]
    with path.open("a") as f:  # the partial row ends, then a new evaluation
        f.write('ss": 1.0}\n' + json.dumps({"step": 3001, "valid_loss": 2.5}) + "\n")
    tail.refresh()
    assert tail.train == {"step": 3001, "loss": 1.0}
    assert tail.valid == {"step": 3001, "valid_loss": 2.5}
    path.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # a new run: read anew
    tail.refresh()
    assert tail.train == {"step": 1, "loss": 9.0} and tail.valid is None


def test_step_lag_is_time_aware() -> None:
    """Beats staggered over 5 s at 0.1 s a step are up to 50 steps apart and not stragglers."""
    top = 5000
    beats = [_rank_beat(r, top - round(age * 10), age) for r, age in enumerate(range(6))]
    beats += [_rank_beat(6, top - 35, 1.3), _rank_beat(7, top - 52, 5.1)]  # 22 steps: behind
    beats += [_rank_beat(8, top - 300, 30.0)]  # silent for 30 s: it stopped
    beats += [_rank_beat(9, top - 44, 4.4, phase="checkpoint save")]  # not training: 44 behind
    out = find_stragglers(beats, heartbeat_interval_s=5.0)
    assert [re.match(r"rank (\d+) ", line).group(1) for line in out] == ["6", "8", "9"], out
    assert "about 22 steps behind the others (rank 0 at step 5000)" in out[0]
    # one step, one beat an hour old: a hang suspect, and no rank is behind it or it behind them
    still = [_rank_beat(r, 100, age, step_time_s=0.9) for r, age in enumerate((1.0, 3600.0, 2.0))]
    assert find_stragglers(still) == []
    # busy time still tells the slow rank of a lockstep run
    busy = [_rank_beat(r, top, 0.5, busy_s=0.085 if r == 3 else 0.02) for r in range(4)]
    assert [line.split(" (")[0] for line in find_stragglers(busy)] == ["rank 3"]


def test_startup_line(tmp_path: Path) -> None:
    beats = [
        _rank_beat(r, 0, 3.0, phase="start-up: data indexes", phase_s=40.0) for r in range(2048)
    ]
    for r in (17, 900):
        beats[r] = _rank_beat(r, 0, 300.0, phase="start-up: rendezvous", phase_s=300.0)
    assert startup_line(beats) == (
        'start-up: 2046 ranks in "start-up: data indexes" (up to 40s), '
        '2 in "start-up: rendezvous" (up to 300s): rank 17, rank 900'
    )
    for r in range(20, 30):
        beats[r] = _rank_beat(r, 0, 1.0, phase="start-up: checkpoint load", phase_s=12.0)
    assert startup_line(beats) == (
        'start-up: 2036 ranks in "start-up: data indexes" (up to 40s), '
        '10 in "start-up: checkpoint load" (up to 12s), 2 in "start-up: rendezvous" (up to '
        "300s): rank 17, rank 900"
    )
    assert startup_line([_rank_beat(r, 10, 1.0) for r in range(4)]) is None
    # from heartbeat files: phase_since when present, else the beat's time
    run_dir = tmp_path / "run"
    make_run(run_dir, num_ranks=12, log_bytes=130 * 1024, metrics_rows=0)
    now = time.time()
    for rank in range(12):
        phase = "start-up: rendezvous" if rank in (4, 5) else "start-up: data indexes"
        since = {} if rank == 4 else {"phase_since": now - (90 if rank == 5 else 40)}
        _beat(
            run_dir / "heartbeats" / f"rank_{rank}.json", step=0, phase=phase, time=now - 2, **since
        )
    line = render(collect(run_dir)).split("\n")[5]
    assert line == (
        'start-up: 10 ranks in "start-up: data indexes" (up to 40s), '
        '2 in "start-up: rendezvous" (up to 90s): rank 4, rank 5'
    )
