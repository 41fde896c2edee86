"""DeepSpeed glue: the JSON against golden files, extra-key conflicts, the
learning-rate schedule against its formula, and ZeRO's per-rank optimiser
state against the analytic size for each stage."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from orchestrator.config.compose import compose_config
from orchestrator.planning.ds_config import deepspeed_config
from orchestrator.planning.plan import resolve_plan
from orchestrator.runtime.schedule import lr_at
from tests.distributed import run_ranks
from tests.tiny import tiny_args

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"

CASES = {
    "deepspeed_tiny_tp2pp2.json": ["model=tiny", "parallel=tp2pp2"],
    "deepspeed_13b_tp8pp4_a100.json": [
        "model=13b",
        "parallel=tp8pp4",
        "cluster=a100_80g",
        "cluster.nodes=16",
    ],
    "deepspeed_tiny_dp2_zero3_bf16.json": [
        "model=tiny",
        "parallel=tp1pp1",
        "parallel.dp=2",
        "parallel.zero_stage=3",
        "train.precision=bf16",
        "+deepspeed.extra.zero_optimization.stage3_max_live_parameters=1000000",
    ],
}


@pytest.mark.parametrize("golden", sorted(CASES))
def test_deepspeed_json_matches_golden(golden: str) -> None:
    cfg = compose_config(CASES[golden], conf_dir=REPO / "conf")
    got = deepspeed_config(resolve_plan(cfg), cfg.train, cfg.deepspeed, on_gpu="a100" in golden)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        (GOLDEN / golden).write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert got == json.loads((GOLDEN / golden).read_text())


def test_extra_key_that_conflicts_is_an_error() -> None:
    cfg = compose_config(["+deepspeed.extra.train_batch_size=16"], conf_dir=REPO / "conf")
    with pytest.raises(ValueError, match=r"deepspeed.extra.train_batch_size=16: conflicts with 8"):
        deepspeed_config(resolve_plan(cfg), cfg.train, cfg.deepspeed)
    same = compose_config(["+deepspeed.extra.train_batch_size=8"], conf_dir=REPO / "conf")
    assert deepspeed_config(resolve_plan(same), same.train, same.deepspeed)["train_batch_size"] == 8


def test_lr_schedule_formula() -> None:
    peak, warmup, total, ratio = 3e-4, 2000, 100_000, 0.1
    kw = dict(peak=peak, warmup_steps=warmup, total_steps=total, min_ratio=ratio)
    assert lr_at(0, **kw) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, **kw) == pytest.approx(peak)  # warmup end: the peak
    assert lr_at(warmup, **kw) == pytest.approx(peak)  # cosine starts at the peak
    mid = warmup + (total - warmup) // 2
    assert lr_at(mid, **kw) == pytest.approx(peak * ratio + peak * (1 - ratio) / 2)
    quarter = warmup + (total - warmup) // 4
    expected = peak * ratio + peak * (1 - ratio) * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(quarter, **kw) == pytest.approx(expected)
    assert lr_at(total, **kw) == pytest.approx(peak * ratio)  # the end: 10% of the peak
    assert lr_at(total + 500, **kw) == pytest.approx(peak * ratio)


ZERO_ARGS = tiny_args(max_seq_len=2048)  # ModelArgs' default, as this test was written with


def _zero_state(rank: int, ws: int, stage: int) -> dict[str, int]:
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed

    from model_parallel.groups import ProcessGroups
    from model_parallel.layout import Layout
    from model_parallel.llama import Transformer
    from orchestrator.runtime.engine import DeepSpeedMPU, init_deepspeed_comm

    init_deepspeed_comm()
    groups = ProcessGroups.build(Layout(dp=ws))
    model = Transformer(ZERO_ARGS, groups=groups)
    num_params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={
            "train_batch_size": ws,
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": stage},
        },
        mpu=DeepSpeedMPU(groups),
        dist_init_required=False,
    )
    tokens = torch.randint(0, ZERO_ARGS.vocab_size, (1, 9))
    engine.backward(model.loss(engine(tokens[:, :-1]), tokens[:, 1:]).mean())
    engine.step()  # Adam's moments exist after the first step
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    moments = sum(
        t.numel()
        for s in inner.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim()
    )
    if stage in (1, 2):
        master = sum(t.numel() for t in opt.single_partition_of_fp32_groups)
    elif stage == 3:
        master = sum(t.numel() for t in opt.fp32_partitioned_groups_flat)
    else:
        master = 0  # ZeRO-0 in fp32: the model's own parameters are the master copy
    if stage == 3:
        engine.destroy()
    return {"num_params": num_params, "moments": moments, "master": master}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_optimizer_state_per_rank_is_analytic(stage: int) -> None:
    dp = 2
    for got in run_ranks(_zero_state, dp, stage):
        n = got["num_params"]
        shard = n if stage == 0 else n // dp  # n is even here, so no alignment padding
        assert n % dp == 0
        assert got["moments"] == 2 * shard, got  # Adam's exp_avg and exp_avg_sq
        assert got["master"] == (0 if stage == 0 else shard), got  # fp32 master weights


# bf16 gradients whose fp32 sum bf16 cannot hold: 0.5 + 2**-9 needs 9 mantissa bits.
_BIG, _SMALL = 1.0, 2.0**-8


def _reduced_bf16_gradient(rank: int, ws: int, micro_batches: int) -> list[float]:
    """Train a 1-parameter-matrix model one step in bf16 through our engine and
    return the fp32 gradient DeepSpeed holds after the reduction (before the
    optimiser step): micro-batch ``i`` of rank ``r`` contributes ``_BIG`` if
    ``r + i == 0`` else ``_SMALL`` to every element."""
    os.environ["LOCAL_RANK"] = str(rank)
    from model_parallel.groups import ProcessGroups
    from model_parallel.layout import Layout
    from orchestrator.runtime.engine import init_deepspeed_comm, initialize

    init_deepspeed_comm()
    cfg = compose_config(
        [
            "model=tiny",
            "parallel=tp1pp1",
            "train.precision=bf16",
            f"parallel.dp={ws}",
            f"train.global_batch_size={ws * micro_batches}",
        ],
        conf_dir=REPO / "conf",
    )
    plan = resolve_plan(cfg)
    groups = ProcessGroups.build(Layout(dp=ws))
    model = torch.nn.Linear(8, 8, bias=False).bfloat16()
    engine = initialize(model, plan, cfg.train, cfg.deepspeed, groups, on_gpu=False)
    for micro in range(micro_batches):
        scale = _BIG if rank + micro == 0 else _SMALL
        x = torch.full((1, 8), scale, dtype=torch.bfloat16)
        engine.backward(engine(x).sum())  # d/dW = scale everywhere
        if micro < micro_batches - 1:
            engine.step()  # not a boundary: accumulates only
    grads = engine.optimizer.fp32_groups_gradients_flat  # BF16_Optimizer, after the reduce
    return sorted({float(v) for g in grads for v in g.flatten()[: 8 * 8]})


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("ws", "micro_batches"), [(1, 2), (2, 1)])
def test_bf16_gradients_reduce_in_fp32(ws: int, micro_batches: int) -> None:
    """The fp32 gradient sum survives the data-parallel reduction: DeepSpeed's bf16
    default would round (1 + 2**-8) / 2 = 0.5 + 2**-9 to 0.5 (dp = 2), or the
    accumulated 1 + 2**-8 to 1.0 (dp = 1, where the all-reduce is skipped)."""
    expected = (_BIG + _SMALL) / (ws * micro_batches)
    assert torch.tensor(expected).bfloat16().item() != expected  # bf16 would round it
    for got in run_ranks(_reduced_bf16_gradient, ws, micro_batches, timeout=240):
        assert got == [expected], got
