"""Real jobs on the private two-node SLURM cluster (``tests/slurm_cluster.py``).

Every job script is rendered by the same generator as the checked-in
``slurm/llama*.sh`` (``launch/run.py ... launcher=slurm slurm.submit=false``)
and submitted with ``sbatch``; the reference is the local launcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.launch.slurm import CHECKED_IN
from orchestrator.protocol import EXIT_REQUEUE
from orchestrator.state.checkpoint import latest_tag
from orchestrator.state.export import export
from orchestrator.status.metrics import read_metrics
from tests.launch import REPO, run_launch
from tests.slurm_cluster import (
    TERMINAL_STATES,
    SlurmCluster,
    slurm_a100_cluster,  # noqa: F401 (fixture)
    slurm_cluster,  # noqa: F401 (fixture)
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

STEPS = 20
RUN = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "parallel=tp2pp1",
    "parallel.dp=2",  # 4 ranks: 2 nodes x 2 tasks (cluster=slurm_cpu)
    "train.log_interval=1",
    "train.eval_interval=0",
]


def _render(run_dir: Path, *overrides: str) -> Path:
    """The job script of a run, rendered and written by ``launcher=slurm``, not submitted."""
    run_launch(
        *RUN,
        "cluster=slurm_cpu",
        "launcher=slurm",
        "slurm.submit=false",
        f"run.dir={run_dir}",
        *overrides,
    )
    return run_dir / "job.sh"


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    return int(records[-1]["step"]) if records else 0


def _wait_for_step(run_dir: Path, step: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while _steps_done(run_dir) < step:
        assert time.monotonic() < deadline, f"{run_dir}: step {step} never reached"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float]]:
    """The same run under the local launcher."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    run_launch(
        *RUN, "cluster=local", "launcher=local", f"train.steps={STEPS}", f"run.dir={run_dir}"
    )
    return read_metrics(run_dir / "metrics.jsonl")


def _assert_same_losses(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), (g, w)


def test_job_on_two_nodes_trains_like_the_local_launcher(
    slurm_cluster: SlurmCluster,  # noqa: F811
    reference: list[dict[str, float]],
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "two nodes"  # a space in the path, as users' paths have
    job = slurm_cluster.submit(_render(run_dir, f"train.steps={STEPS}"), cwd=REPO)
    result = slurm_cluster.wait_job(job, timeout_s=300)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 0), result
    assert result.info["NodeList"] == "n[1-2]" and result.info["NumTasks"] == "4"
    assert sorted(p.name for p in (run_dir / "logs").glob("rank_*.log")) == [
        f"rank_{r}.log" for r in range(4)
    ]
    _assert_same_losses(read_metrics(run_dir / "metrics.jsonl"), reference)
    assert latest_tag(run_dir) == f"step_{STEPS:08d}"
    # the status command finds the job and asks SLURM about it
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator.status", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=slurm_cluster.env,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert f"slurm job {job}: COMPLETED" in status.stdout, status.stdout


def _as_rendered_before_the_regrouping(job_sh: Path) -> None:
    """Name the modules in ``job_sh`` as a job rendered before 2026-12-03 does."""
    text = job_sh.read_text()
    old = text.replace("-m orchestrator.launch.slurm prepare", "-m orchestrator.slurm prepare")
    old = old.replace("-m orchestrator.runtime.worker ", "-m orchestrator.worker ")
    assert old.count("-m orchestrator.slurm prepare") == 1, text
    assert old.count("-m orchestrator.worker ") == 1, text
    assert "orchestrator.launch" not in old and "orchestrator.runtime" not in old
    job_sh.write_text(old)


@pytest.mark.parametrize("names", ["current", "before the regrouping"])
def test_usr1_checkpoints_requeues_and_finishes(
    slurm_cluster: SlurmCluster,  # noqa: F811
    reference: list[dict[str, float]],
    tmp_path: Path,
    names: str,
) -> None:
    """Also for a job that names the modules as they were before 2026-12-03: SLURM
    requeues a job with the script it was submitted with, whatever job.sh says now."""
    run_dir = tmp_path / "run"
    job_sh = _render(run_dir, f"train.steps={STEPS}")
    if names != "current":
        _as_rendered_before_the_regrouping(job_sh)
    job = slurm_cluster.submit(job_sh, cwd=REPO)
    _wait_for_step(run_dir, 2)
    # What --signal=USR1@grace sends before the time limit: USR1 to the job's steps.
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    result = slurm_cluster.wait_job(job, timeout_s=300)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1), result
    rank0 = (run_dir / "logs" / "rank_0.log").read_text()
    assert "exiting for requeue" in rank0 and "resumed from step_" in rank0
    _assert_same_losses(read_metrics(run_dir / "metrics.jsonl"), reference)


def test_usr1_in_startup_requeues_within_seconds(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Rank 3 sits in start-up (a testing aid; the others wait for it in a collective)."""
    run_dir = tmp_path / "run"
    script = _render(
        run_dir,
        "train.steps=20",
        "faults.inject_stall_rank=3",
        "faults.inject_stall_phase=engine",
        "faults.startup_timeout_s=600",
    )
    job = slurm_cluster.submit(script, cwd=REPO)
    beat = run_dir / "heartbeats" / "rank_3.json"
    deadline = time.monotonic() + 180
    while not (beat.exists() and "start-up: engine" in beat.read_text()):
        assert time.monotonic() < deadline, "rank 3 never reached the engine phase"
        time.sleep(0.2)
    signalled = time.monotonic()
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    while slurm_cluster.job_info(job).get("Restarts", "0") == "0":
        assert time.monotonic() - signalled < 60, slurm_cluster.job_info(job)
        time.sleep(0.5)
    slurm_cluster.run(["scancel", str(job)])  # the requeued start would stall again
    slurm_cluster.wait_job(job, timeout_s=120)
    log = (run_dir / "logs" / "rank_3.log").read_text()
    assert "StopInStartup: rank 3 got SIGUSR1 in start-up phase 'engine'" in log, log[-3000:]
    assert latest_tag(run_dir) is None  # nothing was saved: there was nothing to save


def test_scancel_leaves_a_loadable_checkpoint(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit(_render(run_dir, "train.steps=100000"), cwd=REPO)
    _wait_for_step(run_dir, 2)
    slurm_cluster.run(["scancel", str(job)])  # SIGTERM to every rank, SIGKILL after KillWait
    result = slurm_cluster.wait_job(job, timeout_s=120)
    assert result.state == "CANCELLED" and result.restarts == 0, result
    tag = latest_tag(run_dir)
    assert tag is not None, (run_dir / "logs" / "rank_0.log").read_text()[-3000:]
    assert int(tag.removeprefix("step_")) >= 2
    out = export(run_dir, tmp_path / "hf")  # reads every rank's files with weights_only=True
    assert (out / "model.safetensors").stat().st_size > 0


def test_a_dead_rank_fails_the_job(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    job = slurm_cluster.submit(
        _render(run_dir, "train.steps=100000", "slurm.step_wait_s=60"), cwd=REPO
    )
    _wait_for_step(run_dir, 2)
    beat = json.loads((run_dir / "heartbeats" / "rank_3.json").read_text())
    killed_at = time.monotonic()
    os.kill(int(beat["pid"]), signal.SIGKILL)
    result = slurm_cluster.wait_job(job, timeout_s=120)
    assert result.state == "FAILED" and result.restarts == 0, result
    assert result.exit_code not in (0, EXIT_REQUEUE), result
    assert time.monotonic() - killed_at < 90  # well before any hang timeout


@pytest.mark.parametrize("name", sorted(CHECKED_IN))
def test_checked_in_scripts_are_accepted_by_sbatch(
    slurm_a100_cluster: SlurmCluster,  # noqa: F811
    name: str,
) -> None:
    """``sbatch --test-only`` against 256 nodes x 8 GPUs, partition gpu (A100-80GB-shaped)."""
    script = REPO / "slurm" / f"{name}.sh"
    ok = slurm_a100_cluster.run(["sbatch", "--test-only", str(script)], check=False, cwd=REPO)
    assert ok.returncode == 0 and "to start at" in ok.stderr, ok.stderr
    # and the check can fail: one GPU per node more than the nodes have
    too_big = slurm_a100_cluster.run(
        ["sbatch", "--test-only", "--gpus-per-node=9", str(script)], check=False, cwd=REPO
    )
    assert too_big.returncode != 0, too_big.stderr


def test_job_the_cluster_refuses_is_one_line_and_leaves_nothing(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The real sbatch refuses a partition it does not have: one error line, exit 2, no run dir."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "run.py"), *RUN]
        + ["cluster=slurm_cpu", "cluster.partition=nope", "launcher=slurm", f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=slurm_cluster.env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert "Invalid partition name" in errors[0], errors
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists()


def test_time_limit_signal_checkpoints_and_requeues(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The rendered ``--signal=USR1@60`` with a 2-minute limit: checkpoint, exit 75,
    requeue, resume. SLURM checks limits about every 30 s, so the signal lands 60-90 s
    after the start; with a 1-minute limit it came during or just after start-up on a
    loaded or slow machine (3 steps once, none before the deadline once).
    """
    run_dir = tmp_path / "run"
    script = _render(
        run_dir,
        "train.steps=100000",
        "cluster.time_limit=00:02:00",
        "slurm.signal_grace_s=60",
    )
    assert "#SBATCH --signal=USR1@60" in script.read_text()
    job = slurm_cluster.submit(script, cwd=REPO)
    log = run_dir / "logs" / "rank_0.log"
    deadline = time.monotonic() + 300
    while "resumed from step_" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, slurm_cluster.job_info(job)
        assert slurm_cluster.job_state(job) not in TERMINAL_STATES, slurm_cluster.job_info(job)
        time.sleep(1)
    slurm_cluster.run(["scancel", str(job)])
    result = slurm_cluster.wait_job(job, timeout_s=120)
    assert result.restarts == 1, result
    text = log.read_text()
    assert "exiting for requeue" in text, text[-2000:]
    stopped_at = int(text.split("resumed from step_")[1].split()[0])
    first_run = [m for m in read_metrics(run_dir / "metrics.jsonl") if m["step"] <= stopped_at]
    assert stopped_at >= 10 and len(first_run) >= stopped_at  # it trained until the signal


def test_run_py_started_by_srun_trains_as_one_rank_per_task(
    slurm_cluster: SlurmCluster,  # noqa: F811
    reference: list[dict[str, float]],
    tmp_path: Path,
) -> None:
    """``launcher=auto`` inside an allocation: each task is a rank (rendezvous found by itself)."""
    run_dir = tmp_path / "run"
    slurm_cluster.run(
        ["srun", "-N2", "-n4", "--ntasks-per-node=2", sys.executable, "launch/run.py", *RUN]
        + ["cluster=slurm_cpu", f"train.steps={STEPS}", f"run.dir={run_dir}"],
        cwd=REPO,
        timeout=300,
    )
    _assert_same_losses(read_metrics(run_dir / "metrics.jsonl"), reference)
