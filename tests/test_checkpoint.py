"""Checkpoints: bitwise-exact resume, atomic commit, keep-last-K, and the stop signal."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import checkpoint_dir, latest_tag
from orchestrator.config import load_config
from orchestrator.faults import EXIT_REQUEUE
from orchestrator.metrics import read_metrics
from orchestrator.weights import read_checkpoint
from tests.distributed import run_ranks
from tests.launch import run_launch, start_launch, wait_for_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

COMMON = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.log_interval=1",
    "train.steps=20",
]


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run_launch(*COMMON, f"run.dir={run_dir}", *overrides)


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) checkpoint object, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.pt")):
        # DeepSpeed's own files hold non-tensor objects too: read them in the test only.
        tensors.update(_tensors(torch.load(f, map_location="cpu", weights_only=False), f.name))
    return tensors


@pytest.mark.parametrize(
    "layout",
    [["parallel=tp2pp2"], ["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=2"]],
    ids=["tp2pp2", "dp2_zero2"],
)
def test_resume_is_bitwise_exact(layout: list[str], tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, *layout)
    _run(resumed, *layout, "train.exit_at_step=10")
    assert latest_tag(resumed) == "step_00000010"
    proc = _run(resumed, *layout)
    assert "resumed from step_00000010 at step 10" in proc.stdout
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), x["step"]
    # the same final weights and optimiser state, bit for bit
    final_a = _checkpoint_tensors(checkpoint_dir(straight) / "step_00000020")
    final_b = _checkpoint_tensors(checkpoint_dir(resumed) / "step_00000020")
    assert final_a.keys() == final_b.keys() and len(final_a) > 10
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


def test_keeps_the_last_k(tmp_path: Path) -> None:
    run_dir = tmp_path / "keep"
    _run(run_dir, "parallel=tp1pp1", "train.steps=8", "checkpoint.interval=2", "checkpoint.keep=2")
    names = sorted(p.name for p in checkpoint_dir(run_dir).iterdir() if p.is_dir())
    assert names == ["step_00000006", "step_00000008"]
    assert latest_tag(run_dir) == "step_00000008"


def _engine(rank: int) -> object:
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed

    from model_parallel.args import ModelArgs
    from model_parallel.groups import ProcessGroups
    from model_parallel.layout import Layout
    from model_parallel.llama import Transformer
    from orchestrator.engine import DeepSpeedMPU, init_deepspeed_comm

    init_deepspeed_comm()
    groups = ProcessGroups.build(Layout(dp=2))
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64), groups=groups)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={
            "train_batch_size": 2,
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 1},
        },
        mpu=DeepSpeedMPU(groups),
        dist_init_required=False,
    )
    return engine


def _save_then_die_mid_save(rank: int, world: int, run_dir: str) -> None:
    from orchestrator import checkpoint

    engine = _engine(rank)
    checkpoint.save(engine, Path(run_dir), checkpoint.TrainingState(1, 10, {"position": 1}), keep=3)
    original = engine.save_checkpoint  # type: ignore[attr-defined]

    def dying_save(save_dir: str, **kwargs: object) -> object:
        result = original(save_dir, **kwargs)  # rank 1 writes its part ...
        if rank == 1:
            os._exit(9)  # ... and dies before the checkpoint is committed
        return result

    engine.save_checkpoint = dying_save  # type: ignore[attr-defined]
    checkpoint.save(engine, Path(run_dir), checkpoint.TrainingState(2, 20, {"position": 2}), keep=3)


def _load_latest(rank: int, world: int, run_dir: str) -> int:
    from orchestrator import checkpoint

    engine = _engine(rank)
    tag = checkpoint.latest_tag(Path(run_dir))
    assert tag is not None
    state = checkpoint.load(engine, Path(run_dir), tag)
    return state.step


def test_rank_killed_while_saving_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="failed|timed out"):  # the job dies with rank 1
        run_ranks(_save_then_die_mid_save, 2, str(tmp_path), timeout=60)
    assert latest_tag(tmp_path) == "step_00000001"
    assert (checkpoint_dir(tmp_path) / "step_00000002.partial").is_dir()  # never committed
    assert not (checkpoint_dir(tmp_path) / "step_00000002").exists()
    assert run_ranks(_load_latest, 2, str(tmp_path)) == [1, 1]  # and the previous one loads


@pytest.mark.parametrize("storm", [False, True], ids=["one_signal", "signals_during_the_save"])
def test_sigusr1_checkpoints_and_exits_for_requeue(tmp_path: Path, storm: bool) -> None:
    run_dir = tmp_path / "signal"
    proc = start_launch(*COMMON, f"run.dir={run_dir}", "parallel=tp2pp1", "train.steps=100000")
    try:
        wait_for_steps(proc, run_dir, 3)
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
        # More signals while the step finishes and the checkpoint is written (an
        # impatient operator, scancel after the time-limit signal): no effect.
        for i in range(400 if storm else 0):
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGTERM if i % 2 else signal.SIGUSR1)
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_REQUEUE, stderr[-3000:]
    last_step = int(read_metrics(run_dir / "metrics.jsonl")[-1]["step"])
    assert latest_tag(run_dir) == f"step_{last_step:08d}"
    assert "stopped by signal" in stdout
    assert not list(checkpoint_dir(run_dir).glob("*.partial"))
    # the checkpoint is whole: every rank's files read back
    cfg = load_config(run_dir / "config.yaml")
    state = read_checkpoint(
        checkpoint_dir(run_dir) / f"step_{last_step:08d}", cfg.model.to_args(), tp=2, pp=1
    )
    assert len(state) == 3 + 9 * cfg.model.n_layers and all(
        t.isfinite().all() for t in state.values()
    )


def test_stop_signal_during_start_up_is_kept_until_the_first_step(tmp_path: Path) -> None:
    """SIGUSR1 while torch and DeepSpeed still import: no death, a checkpoint after step 1."""
    import sys

    from orchestrator.launcher import free_port
    from orchestrator.slurm import prepare

    run_dir = tmp_path / "run"
    prepare(run_dir, [*COMMON, "parallel=tp1pp1", "parallel.dp=1", "cluster=local"], ntasks=1)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.worker", str(run_dir)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.5)  # the worker is importing torch
    worker.send_signal(signal.SIGUSR1)
    out, _ = worker.communicate(timeout=240)
    assert worker.returncode == EXIT_REQUEUE, out[-3000:]
    assert latest_tag(run_dir) == "step_00000001"
