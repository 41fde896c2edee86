"""Checkpoints: bitwise-exact resume, atomic commit, keep-last-K, and the stop signal."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.config.schema import load_config
from orchestrator.protocol import EXIT_REQUEUE
from orchestrator.state.checkpoint import checkpoint_dir, latest_tag
from orchestrator.state.integrity import verify
from orchestrator.state.weights import read_checkpoint
from orchestrator.status.metrics import read_metrics
from tests.checkpoint_files import checkpoint_tensors
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


def _client_state(path: Path) -> list[tuple[int, int, dict[str, int]]]:
    """Step, consumed tokens and data position recorded by each model-parallel rank."""
    out = []
    for f in sorted(path.glob("*mp_rank_*_model_states.pt")):  # not the pipeline's layer files
        state = torch.load(f, map_location="cpu", weights_only=False)
        out.append((state["step"], state["consumed_tokens"], dict(state["data"])))
    return out


@pytest.mark.parametrize(
    "layout",
    [["parallel=tp2pp2"], ["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=2"]],
    ids=["tp2pp2", "dp2_zero2"],
)
def test_resume_is_bitwise_exact(layout: list[str], tmp_path: Path) -> None:
    """Stopped at step 7 of the demo corpus: 56 samples in, no repeat period divides it.

    A resume that restarted the data (or replayed a batch) reads other samples
    from step 8 on, so its losses, consumed tokens and final state differ.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    demo = ["data=demo", *layout]
    _run(straight, *demo)
    _run(resumed, *demo, "train.exit_at_step=7")
    assert latest_tag(resumed) == "step_00000007"
    assert {s[:2] for s in _client_state(checkpoint_dir(resumed) / "step_00000007")} == {
        (7, 7 * 8 * 128)
    }
    proc = _run(resumed, *demo)
    assert "resumed from step_00000007 at step 7" in proc.stdout
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 21))
    assert len({round(m["loss"], 6) for m in a}) == 20  # no two steps alike: no short period
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["grad_norm"], x["consumed_tokens"]) == (
            y["loss"],
            y["grad_norm"],
            y["consumed_tokens"],
        ), x["step"]
    # the same final weights, optimiser state and data position, bit for bit
    final_a = checkpoint_tensors(checkpoint_dir(straight) / "step_00000020")
    final_b = checkpoint_tensors(checkpoint_dir(resumed) / "step_00000020")
    assert final_a.keys() == final_b.keys() and len(final_a) > 10
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    state_a = _client_state(checkpoint_dir(straight) / "step_00000020")
    assert state_a == _client_state(checkpoint_dir(resumed) / "step_00000020")
    assert state_a[0][1] == 20 * 8 * 128


def test_keeps_the_last_k(tmp_path: Path) -> None:
    run_dir = tmp_path / "keep"
    _run(run_dir, "parallel=tp1pp1", "train.steps=8", "checkpoint.interval=2", "checkpoint.keep=2")
    names = sorted(p.name for p in checkpoint_dir(run_dir).iterdir() if p.is_dir())
    assert names == ["step_00000006", "step_00000008"]
    assert latest_tag(run_dir) == "step_00000008"


def _engine(rank: int) -> object:
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed

    from model_parallel.groups import ProcessGroups
    from model_parallel.layout import Layout
    from model_parallel.llama import Transformer
    from orchestrator.runtime.engine import DeepSpeedMPU, init_deepspeed_comm
    from tests.tiny import tiny_args

    init_deepspeed_comm()
    groups = ProcessGroups.build(Layout(dp=2))
    # smaller still (any model will do for the commit protocol), with the
    # ModelArgs defaults this test was written with for multiple_of and max_seq_len
    args = tiny_args(
        dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=256, max_seq_len=2048
    )
    model = Transformer(args, groups=groups)
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
    from orchestrator.state import checkpoint

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
    from orchestrator.state import checkpoint

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


def test_stop_signal_during_start_up_exits_for_requeue_at_once(tmp_path: Path) -> None:
    """SIGUSR1 while torch and DeepSpeed still import: not a death by signal but exit 75 at
    once, with nothing saved (nothing to save yet); the requeued start begins afresh."""
    import sys

    from orchestrator.launch.launcher import free_port
    from orchestrator.launch.slurm import prepare

    run_dir = tmp_path / "run"
    prepare(run_dir, [*COMMON, "parallel=tp1pp1", "parallel.dp=1", "cluster=local"], ntasks=1)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.runtime.worker", str(run_dir)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(0.5)  # the worker is importing torch
    sent = time.monotonic()
    worker.send_signal(signal.SIGUSR1)
    out, _ = worker.communicate(timeout=240)
    assert worker.returncode == EXIT_REQUEUE, out[-3000:]
    assert time.monotonic() - sent < 10  # not after torch's import and the engine's start
    assert "StopInStartup: pid" in out and "got SIGUSR1 in start-up phase" in out, out
    assert latest_tag(run_dir) is None


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:  # one bit flipped in the middle: the size is right, the bytes are not
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))


def test_damaged_checkpoints_fall_back_to_the_newest_whole_one(tmp_path: Path) -> None:
    """step 6 truncated, step 4 with one bit flipped: the resume names both, takes step 2."""
    from orchestrator.state.checkpoint import main as checkpoint_main

    run_dir = tmp_path / "run"
    layout = ["parallel=tp1pp1", "parallel.dp=2", "checkpoint.interval=2"]
    _run(run_dir, *layout, "train.steps=6")
    assert checkpoint_main(["verify", str(run_dir)]) == 0
    root = checkpoint_dir(run_dir)
    truncated = root / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flipped = root / "step_00000004" / "mp_rank_00_model_states.pt"
    _damage(truncated, "truncated")
    _damage(flipped, "bit_flipped")  # the size is right, the bytes are not
    assert checkpoint_main(["verify", str(run_dir)]) == 1  # by hand: names them

    proc = _run(run_dir, *layout, "train.steps=8")
    warnings = [line for line in proc.stdout.splitlines() if "is damaged" in line]
    assert len(warnings) == 2, proc.stdout[-3000:]
    assert str(truncated) in warnings[0] and "bytes, the manifest says" in warnings[0]
    assert str(flipped) in warnings[1] and "checksum" in warnings[1]
    assert "resumed from step_00000002 at step 2" in proc.stdout
    for tag in ("step_00000006", "step_00000004"):
        assert (root / f"{tag}.damaged").is_dir()  # kept for a look
    assert latest_tag(run_dir) == "step_00000008"
    steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")]
    assert steps[-6:] == [3, 4, 5, 6, 7, 8]


def test_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.state.checkpoint import main as checkpoint_main

    assert checkpoint_main(["verify", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run_dir=") and err.count("\n") == 1
    run_dir = tmp_path / "run"
    _run(run_dir, "parallel=tp1pp1", "train.steps=2")
    assert checkpoint_main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step_00000002: ok (" in out and "latest: step_00000002" in out
    assert checkpoint_main(["verify", str(run_dir), "--tag", "step_00000009"]) == 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``RUN_DIR/checkpoints`` on a 32 MiB tmpfs: one tiny-model checkpoint fits, two do not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    run_dir = tmp_path / "run"
    mount = checkpoint_dir(run_dir)
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    try:
        yield run_dir
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_keeps_latest_and_says_so(small_disk: Path) -> None:
    run_dir = small_disk
    proc = run_launch(
        *COMMON,
        f"run.dir={run_dir}",
        "parallel=tp1pp1",
        "parallel.dp=2",
        "train.steps=4",
        "checkpoint.interval=2",
        expect=1,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    assert "checkpoint step_00000004 not saved" in line and "No space left on device" in line
    assert "step_00000004.partial/" in line and "needs about" in line and "GiB free" in line
    assert "latest still names step_00000002" in line
    assert "Traceback" not in proc.stderr
    root = checkpoint_dir(run_dir)
    assert latest_tag(run_dir) == "step_00000002"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002"]
    assert "checkpoint " + str(root / "step_00000004") not in proc.stdout  # never reported
    assert verify(root / "step_00000002") == []  # and what latest names is whole
    cfg = load_config(run_dir / "config.yaml")
    state = read_checkpoint(root / "step_00000002", cfg.model.to_args(), tp=1, pp=1)
    assert all(t.isfinite().all() for t in state.values())
