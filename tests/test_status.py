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

import numpy as np
import pytest

from orchestrator.metrics import read_metrics
from orchestrator.status import main
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
        beats = [json.loads(p.read_text()) for p in sorted((run_dir / "heartbeats").glob("*"))]
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
