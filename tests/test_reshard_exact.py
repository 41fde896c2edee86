"""Re-sharding copies the optimiser state exactly, between every kind of DeepSpeed file.

A checkpoint written by a short real run (bf16 pipeline with DeepSpeed's
``BF16_Optimizer``; fp32 ZeRO-3) is loaded into engines of other layouts and
ZeRO stages, which save it again at once. (All eight source x target pairs
passed when this was written; four of them cover every kind and keep CI short.) Read back as full tensors, the new
checkpoint's fp32 weights and both Adam moments must equal the source's bit
for bit: re-sharding moves numbers, it computes nothing. The reader is also
checked against DeepSpeed's own view of the source files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.config.schema import load_config
from orchestrator.state.checkpoint import checkpoint_dir, latest_tag
from orchestrator.state.reshard import read_full_state
from orchestrator.state.reshard_source import SourceCheckpoint
from tests.distributed import run_ranks
from tests.launch import REPO, run_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMMON = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.steps=3",
    "train.eval_interval=0",
]
SOURCES = {
    "bf16_tp1pp2": ["train.precision=bf16", "parallel=tp1pp2"],
    "fp32_zero3_dp2": ["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=3"],
}
TARGETS = {
    "bf16_tp2pp1_zero1": (2, ["train.precision=bf16", "parallel=tp2pp1", "parallel.dp=1"]),
    "bf16_tp1pp1_dp2_zero2_mb2": (
        2,
        [
            "train.precision=bf16",
            "parallel=tp1pp1",
            "parallel.dp=2",
            "parallel.zero_stage=2",
            "parallel.micro_batch_size=2",
        ],
    ),
    "fp32_tp2pp1_dp1_zero3": (2, ["parallel=tp2pp1", "parallel.dp=1", "parallel.zero_stage=3"]),
    "fp32_tp2pp2_zero1": (4, ["parallel=tp2pp2", "parallel.dp=1"]),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, overrides in SOURCES.items():
        run_launch(*COMMON, f"run.dir={root / name}", *overrides, timeout=600)
        out[name] = root / name
    return out


def _build_engine(rank: int, overrides: list[str]) -> tuple[Any, Any, Any, Any]:
    """(engine, cfg, plan, groups) of this rank for the layout ``overrides`` name."""
    os.environ["LOCAL_RANK"] = str(rank)
    from model_parallel.groups import ProcessGroups
    from model_parallel.layout import Layout
    from orchestrator.config.compose import compose_config
    from orchestrator.planning.plan import resolve_plan
    from orchestrator.runtime import engine as ds_engine
    from orchestrator.runtime.train import build_model

    ds_engine.init_deepspeed_comm()
    cfg = compose_config([*COMMON, *overrides], conf_dir=REPO / "conf")
    plan = resolve_plan(cfg)
    groups = ProcessGroups.build(Layout(tp=plan.tp, pp=plan.pp, dp=plan.dp))
    engine = ds_engine.initialize(
        build_model(cfg.model.to_args(), plan, groups, seed=cfg.train.seed),
        plan,
        cfg.train,
        cfg.deepspeed,
        groups,
        on_gpu=False,
    )
    return engine, cfg, plan, groups


def _reshard_and_save(rank: int, source_run: str, overrides: list[str], out: str) -> Any:
    """This rank's engine of the new layout, loaded from ``source_run`` and saved to ``out``."""
    from orchestrator.state import checkpoint
    from orchestrator.state.reshard import load_resharded

    engine, cfg, plan, groups = _build_engine(rank, overrides)
    run = Path(source_run)
    path = checkpoint.checkpoint_dir(run) / str(checkpoint.latest_tag(run))
    state, _ = load_resharded(
        engine,
        path,
        args=cfg.model.to_args(),
        pp=plan.pp,
        tp_group=groups.tp_group,
        dp=plan.dp,
        micro_batch=plan.micro_batch_size,
    )
    state.layout = checkpoint.LayoutRecord.from_plan(plan)
    checkpoint.save(engine, Path(out), state, keep=1)
    return engine, groups, state.step


def _load_and_save(rank: int, world: int, source_run: str, overrides: list[str], out: str) -> int:
    return int(_reshard_and_save(rank, source_run, overrides, out)[2])


# Every target kind once, each source twice (BF16_Optimizer and ZeRO-3 files both read
# into ZeRO-1, ZeRO-2 and ZeRO-3 engines, with tp, pp, dp and micro-batch changing).
PAIRS = [
    ("bf16_tp1pp2", "fp32_tp2pp1_dp1_zero3"),
    ("bf16_tp1pp2", "bf16_tp1pp1_dp2_zero2_mb2"),
    ("fp32_zero3_dp2", "bf16_tp2pp1_zero1"),
    ("fp32_zero3_dp2", "fp32_tp2pp2_zero1"),
]


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{s}-to-{t}" for s, t in PAIRS])
def test_state_moves_bit_for_bit(
    sources: dict[str, Path], source: str, target: str, tmp_path: Path
) -> None:
    world, overrides = TARGETS[target]
    steps = run_ranks(
        _load_and_save, world, str(sources[source]), overrides, str(tmp_path), timeout=300
    )
    assert steps == [3] * world
    args = load_config(sources[source] / "config.yaml").model.to_args()
    src = checkpoint_dir(sources[source]) / str(latest_tag(sources[source]))
    want = read_full_state(src, args)
    got = read_full_state(checkpoint_dir(tmp_path) / "step_00000003", args)
    assert want.keys() == got.keys() and len(want) == 3 * (3 + 9 * args.n_layers)
    assert all(w.abs().sum() > 0 for w in want.values())  # trained, not zeros
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _deepspeed_fp32(rank: int, world: int, run: str, overrides: list[str]) -> dict[str, Any]:
    """DeepSpeed's own full fp32 weights after loading the checkpoint under its layout.

    Every file it reads goes through ``torch.load(weights_only=True)``.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    from orchestrator.state import checkpoint

    engine, *_ = _build_engine(rank, overrides)
    calls: list[bool] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(bool(kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    torch.load = recording_load  # type: ignore[assignment]
    try:
        checkpoint.load(engine, Path(run), str(checkpoint.latest_tag(Path(run))))
    finally:
        torch.load = real_load
    assert calls and all(calls), f"DeepSpeed's loader unpickled a file fully: {calls}"
    # numpy arrays: they pickle by value back to the test process
    return {
        n: safe_get_full_fp32_param(p).numpy().copy() for n, p in engine.module.named_parameters()
    }


def test_reader_agrees_with_deepspeed(sources: dict[str, Path]) -> None:
    """ZeRO-3's slices as our reader cuts them are DeepSpeed's full fp32 parameters."""
    run = sources["fp32_zero3_dp2"]
    ranks = run_ranks(_deepspeed_fp32, 2, str(run), SOURCES["fp32_zero3_dp2"], timeout=300)
    args = load_config(run / "config.yaml").model.to_args()
    source = SourceCheckpoint(checkpoint_dir(run) / str(latest_tag(run)), args)
    read = 0
    for name, array in ranks[0].items():
        full = torch.from_numpy(array)[: source.param(name).full_shape[0]]  # vocab padding off
        assert torch.equal(source.read_full(name, "fp32"), full), name
        read += full.numel() * 4
    assert source.bytes_read == read


def _load_into_replicated_kv(
    rank: int, world: int, source_run: str, overrides: list[str], out: str
) -> bool:
    """Load and save as ``_load_and_save``; also whether both copies of each KV head agree."""
    import torch.distributed as dist

    engine, groups, _ = _reshard_and_save(rank, source_run, overrides, out)
    same = True
    for name, param in engine.module.named_parameters():
        if name.endswith(("wk.weight", "wv.weight")):
            parts = [torch.empty_like(param) for _ in range(world)]
            dist.all_gather(parts, param.detach().contiguous(), group=groups.tp_group)
            same &= all(torch.equal(parts[i], parts[i + 1]) for i in range(0, world, 2))
    return same


def test_kv_heads_move_to_replicas_bit_for_bit(tmp_path: Path) -> None:
    """2 KV heads: a tp2 run (one KV head per rank) continues at tp4 (each KV head on
    two ranks); the tp4 checkpoint, read back one copy per head, equals the source."""
    gqa = ["model.n_kv_heads=2", "parallel=tp2pp1", "parallel.dp=1"]
    source = tmp_path / "tp2"
    run_launch(*COMMON, f"run.dir={source}", *gqa, timeout=600)
    moved = tmp_path / "tp4"
    same = run_ranks(
        _load_into_replicated_kv, 4, str(source), [*gqa, "parallel.tp=4"], str(moved), timeout=300
    )
    assert same == [True] * 4
    args = load_config(source / "config.yaml").model.to_args()
    assert args.n_kv_heads == 2
    want = read_full_state(checkpoint_dir(source) / str(latest_tag(source)), args)
    got = read_full_state(checkpoint_dir(moved) / "step_00000003", args)
    assert want.keys() == got.keys()
    assert want["layers.0.attention.wk.weight/fp32"].shape == (2 * args.head_dim, args.dim)
    for name in want:
        assert torch.equal(got[name], want[name]), name
