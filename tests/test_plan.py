"""Layout resolution: hand-computed plans and every cross-section rule."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestrator.config.schema import Config
from orchestrator.planning.plan import (
    Plan,
    format_plan,
    resolve_plan,
    search_layouts,
    validate_config,
    with_layout,
)
from tests.test_config import load


def _padded_params_check(plan: Plan, cfg: Config) -> None:
    """Sum over stages and tp ranks of the per-rank params = the padded model.

    Norm weights are replicated on every tp rank: count them once.
    """
    dim, n_layers = cfg.model.dim, cfg.model.n_layers
    replicated = (2 * n_layers + 1) * dim
    assert plan.tp * sum(plan.stage_params_per_rank) - (plan.tp - 1) * replicated == (
        plan.num_padded_params
    )


def test_13b_tp8pp4_on_local() -> None:
    cfg = load("model=13b", "parallel=tp8pp4", "dry_run=true")
    plan = validate_config(cfg)
    assert (plan.world_size, plan.tp, plan.pp, plan.dp, plan.nodes) == (32, 8, 4, 1, 1)
    assert plan.stage_layers == ((0, 9), (10, 19), (20, 29), (30, 39))
    assert plan.padded_vocab_size == 32768
    assert plan.num_micro_batches == plan.grad_accumulation_steps == 2048
    # 13B: 2*V*d + l*(4d^2 + 3*d*ffn + 2d) + d
    assert (
        plan.num_params
        == 2 * 32000 * 5120 + 40 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120) + 5120
    )
    assert plan.num_params == 13_015_864_320
    assert plan.num_padded_params == plan.num_params + 2 * 768 * 5120
    layer = (4 * 5120**2 + 3 * 5120 * 13824) // 8 + 2 * 5120
    embedding = 32768 * 5120 // 8
    assert plan.stage_params_per_rank == (
        10 * layer + embedding,
        10 * layer,
        10 * layer,
        10 * layer + 5120 + embedding,
    )
    _padded_params_check(plan, cfg)


def test_65b_tp8pp8_on_a100() -> None:
    cfg = load("model=65b", "parallel=tp8pp8", "cluster=a100_80g")
    plan = resolve_plan(cfg)
    assert (plan.world_size, plan.nodes, plan.dp) == (64, 8, 1)
    assert plan.stage_layers[0] == (0, 9) and plan.stage_layers[-1] == (70, 79)
    assert plan.num_params == pytest.approx(65.3e9, rel=1e-3)
    assert plan.num_params == 65_285_660_672
    _padded_params_check(plan, cfg)


def test_dp_derived_from_nodes() -> None:
    cfg = load("model=7b", "parallel=tp2pp2", "cluster=a100_80g", "cluster.nodes=4")
    plan = resolve_plan(cfg)
    assert (plan.world_size, plan.dp, plan.nodes) == (32, 8, 4)
    assert plan.num_micro_batches == 2048 // 8
    _padded_params_check(plan, cfg)


def test_explicit_dp_and_nodes_needed() -> None:
    # 8 * 2 * 3 = 48 GPUs on 8-GPU nodes: 6 nodes.
    overrides = ("parallel=tp8pp4", "parallel.pp=2", "parallel.dp=3", "cluster=a100_40g")
    plan = resolve_plan(load("model=13b", *overrides, "train.global_batch_size=2046"))
    assert (plan.world_size, plan.dp, plan.nodes) == (48, 3, 6)
    assert plan.num_micro_batches == 682


def test_explicit_pipeline_split() -> None:
    cfg = load("parallel=tp1pp2", "parallel.pipeline_split=[1,3]")
    plan = resolve_plan(cfg)
    assert plan.stage_layers == ((0, 0), (1, 3))
    _padded_params_check(plan, cfg)


def test_tiny_single_process_and_vocab_padding() -> None:
    plan = resolve_plan(load("parallel=tp2pp2"))
    assert plan.padded_vocab_size == 2048  # 2000 -> multiple of 128 * 2
    assert (plan.world_size, plan.nodes, plan.num_micro_batches) == (4, 1, 8)
    single = resolve_plan(load("parallel=tp1pp1"))
    assert single.stage_params_per_rank == (single.num_padded_params,)


def test_format_plan_is_greppable() -> None:
    cfg = load("model=13b", "parallel=tp8pp4")
    text = format_plan(resolve_plan(cfg), cfg)
    assert "world size: 32 = tp(8) * pp(4) * dp(1)" in text
    assert "vocab: 32000 -> padded 32768 (multiple of 128*tp = 1024)" in text
    assert "stage 3: layers 30-39 (10)" in text
    assert "total params: 13,015,864,320" in text
    assert "zero stage: 1" in text


def _with(cfg: Config, **sections: dict[str, object]) -> Config:
    for name, changes in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **changes))
    return cfg


BAD = [
    # (overrides, section changes, expected message prefix)
    (("model=7b",), {"parallel": {"tp": 3}}, "parallel.tp=3: model.n_heads(32) must be divisible"),
    (
        ("model=7b",),
        {"parallel": {"tp": 0}},
        "parallel.tp=0: must be a positive integer",
    ),
    (
        (),
        {
            "model": {"n_heads": 4, "dim": 96, "multiple_of": 1, "ffn_dim_multiplier": 1.01},
            "parallel": {"tp": 4},
        },
        "parallel.tp=4: FFN hidden width(258)",
    ),
    (
        ("model=33b",),
        {"parallel": {"tp": 4, "pp": 7}},
        "parallel.pp=7: model.n_layers(60) must be divisible by pp",
    ),
    (
        (),
        {"parallel": {"pp": 2, "pipeline_split": [1, 2]}},
        "parallel.pipeline_split=[1, 2]: sums to 3 != model.n_layers(4)",
    ),
    (
        ("model=7b", "cluster=a100_80g"),
        {"parallel": {"tp": 2, "pp": 2, "dp": 3}, "cluster": {"nodes": 2}},
        "parallel: tp(2) * pp(2) * dp(3) = 12 != world_size(16) = cluster.nodes(2) "
        "* cluster.gpus_per_node(8)",
    ),
    (
        ("model=7b", "cluster=a100_80g"),
        {"parallel": {"tp": 4, "pp": 4}, "cluster": {"nodes": 3}},
        "parallel.dp=-1: world_size(24) = cluster.nodes(3) * cluster.gpus_per_node(8) "
        "is not divisible by tp(4) * pp(4) = 16",
    ),
    (
        ("model=7b", "cluster=a100_80g"),
        {"parallel": {"tp": 8}, "cluster": {"gpus_per_node": 4}},
        "parallel.tp=8: cluster.gpus_per_node(4) must be divisible by tp",
    ),
    (
        (),
        {"cluster": {"nodes": 2}},
        "cluster.nodes=2: a CPU cluster (gpus_per_node=0) runs on one node",
    ),
    (
        (),
        {"parallel": {"dp": 3}},
        "train.global_batch_size=8: must be divisible by parallel.micro_batch_size(1) * dp(3) = 3",
    ),
    (
        (),
        {"parallel": {"pp": 4, "micro_batch_size": 4}},
        "train.global_batch_size=8: gives 2 micro-batches",
    ),
    (
        (),
        {"parallel": {"tp": 8, "sequence_parallel": True}, "model": {"max_seq_len": 100}},
        "parallel.sequence_parallel=true: model.max_seq_len(100) must be divisible by tp(8)",
    ),
    ((), {"parallel": {"zero_stage": 3, "pp": 2}}, "parallel.zero_stage=3: DeepSpeed's pipeline"),
    *[
        (
            (),
            {"parallel": {"zero_stage": 0, "pp": pp}, "train": {"precision": "bf16"}},
            "parallel.zero_stage=0: train.precision=bf16 needs parallel.zero_stage >= 1",
        )
        for pp in (1, 2)
    ],
    ((), {"train": {"global_batch_size": -8}}, "train.global_batch_size=-8: must be a positive"),
    ((), {"model": {"dim": 0}}, "model.dim=0: must be a positive integer"),
    ((), {"model": {"n_layers": 0}}, "model.n_layers=0: must be a positive integer"),
    (
        ("parallel=auto",),
        {},
        "parallel.auto=true: needs a GPU cluster with cluster.nodes set (the devices to fill); "
        "cluster=local has nodes=None, gpus_per_node=0",
    ),
    (
        ("model=65b", "parallel=auto", "cluster=a100_80g"),
        {"cluster": {"nodes": 1}},
        "parallel.auto=true: none of the",
    ),
    (
        ("model=7b", "cluster=a100_80g"),
        {"cluster": {"compute_efficiency": 1.5}},
        "cluster.compute_efficiency=1.5: must be in (0, 1]",
    ),
]


@pytest.mark.parametrize(("overrides", "changes", "message"), BAD)
def test_bad_layouts(
    overrides: tuple[str, ...], changes: dict[str, dict[str, object]], message: str
) -> None:
    cfg = _with(load(*overrides), **changes)
    with pytest.raises(ValueError) as info:
        resolve_plan(cfg)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_auto_search_counts_grouped_kv_heads() -> None:
    """Llama-3-70B (8 KV heads) on 8 x 8 A100-80GB against its multi-head twin: in every
    layout the smaller K/V weights, their gradients, optimizer state and activations
    take less memory and the K/V projections fewer FLOPs, so more layouts fit."""
    base = ("model=llama3_70b", "parallel=auto", "cluster=a100_80g", "cluster.nodes=8")
    gqa = {_layout(c): c for c in search_layouts(load(*base))}
    mha = {_layout(c): c for c in search_layouts(load(*base, "model.n_kv_heads=64"))}
    assert gqa.keys() == mha.keys()
    for key, c in gqa.items():
        assert c.estimate.peak.total < mha[key].estimate.peak.total, key
        assert c.estimate.tokens_per_s_per_device > mha[key].estimate.tokens_per_s_per_device
    fits = sum(c.estimate.fits for c in gqa.values())
    assert fits > sum(c.estimate.fits for c in mha.values())
    best = next(iter(gqa.values()))  # ranked: the fastest that fits first
    assert best.estimate.fits and best.parallel.tp * best.parallel.pp * best.parallel.dp == 64


def _layout(c: Any) -> tuple[int, int, int, int, int, str]:
    p = c.parallel
    return (p.tp, p.pp, p.dp, p.zero_stage, p.micro_batch_size, p.activation_checkpointing)


def test_auto_picks_the_fastest_layout_that_fits() -> None:
    """7B on one 8 x A100-80GB node: every valid layout is estimated; the best that fits wins."""
    cfg = load("model=7b", "parallel=auto", "cluster=a100_80g", "cluster.nodes=1")
    candidates = search_layouts(cfg)
    # Every tp in {1, 2, 4, 8} x pp dividing 32 layers within 8 GPUs is there.
    layouts = {(c.parallel.tp, c.parallel.pp) for c in candidates}
    assert layouts == {(t, p) for t in (1, 2, 4, 8) for p in (1, 2, 4, 8) if t * p <= 8}
    fitting = [c for c in candidates if c.estimate.fits]
    assert fitting and len(fitting) < len(candidates)  # some do not fit and are ranked last
    assert candidates[: len(fitting)] == tuple(fitting)
    speeds = [c.estimate.tokens_per_s_per_device for c in fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert all(c.parallel.zero_stage >= 1 for c in candidates)  # bf16 needs ZeRO >= 1
    assert all(c.parallel.zero_stage <= 1 for c in candidates if c.parallel.pp > 1)

    given = dataclasses.replace(cfg.parallel)
    plan = validate_config(cfg)
    best = fitting[0].parallel
    assert cfg.parallel == given and cfg.parallel.auto  # the composed config is not changed
    resolved = with_layout(cfg, plan)  # what the ranks and run dir see
    assert resolved.parallel == best and not resolved.parallel.auto
    assert plan.parallel == best
    assert (plan.tp, plan.pp, plan.dp, plan.zero_stage) == (
        best.tp,
        best.pp,
        best.dp,
        best.zero_stage,
    )
    assert resolve_plan(resolved).candidates == ()  # the concrete layout resolves as any other
    text = format_plan(plan, cfg)
    assert f"parallel=auto: chose tp{best.tp} pp{best.pp} dp{best.dp}" in text
    assert f"parallel=auto: {len(candidates)} valid layouts, {len(fitting)} fit" in text
    assert "#  tp  pp    dp  zero  micro  ckpt  memory GiB  fits  tokens/s/device    MFU" in text


@pytest.mark.parametrize(("tp", "replicas"), [(8, 1), (16, 2)])
def test_gqa_params_per_rank_hold_narrow_kv_and_its_copies(tp: int, replicas: int) -> None:
    """Llama-3-8B (8 KV heads): K and V are dim x 1024; at tp 16 each KV head is on 2 ranks."""
    cfg = load("model=llama3_8b", "parallel=tp8pp1", f"parallel.tp={tp}", "dry_run=true")
    plan = validate_config(cfg)
    dim, n_layers = cfg.model.dim, cfg.model.n_layers
    kv = 2 * dim * 1024 * n_layers  # wk and wv of every layer
    replicated = (2 * n_layers + 1) * dim
    summed = plan.tp * sum(plan.stage_params_per_rank) - (plan.tp - 1) * replicated
    assert summed == plan.num_padded_params + (replicas - 1) * kv


@pytest.mark.parametrize("precision,lowest", [("fp32", 0), ("bf16", 1), ("fp16", 0)])
def test_layout_search_starts_at_the_lowest_zero_stage_the_precision_allows(
    precision: str, lowest: int
) -> None:
    from orchestrator.planning.search import _layouts

    cfg = load("model=7b", "parallel=auto", "cluster=a100_80g", f"train.precision={precision}")
    assert min(par.zero_stage for par in _layouts(cfg, world=8)) == lowest
