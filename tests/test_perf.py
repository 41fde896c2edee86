"""The plan's performance model against hand counts and published numbers.

One efficiency factor for every case: ``cluster.compute_efficiency`` as
``conf/cluster/a100_80g.yaml`` sets it (0.6), never tuned per case.
"""

from __future__ import annotations

import pytest

from model_parallel.args import ModelArgs
from orchestrator.config import ClusterConfig
from orchestrator.perf import (
    GIB,
    estimate,
    layer_activation_bytes,
    stage_memory,
    zero_state_bytes,
)
from orchestrator.plan import format_plan, resolve_plan
from tests.test_config import load

A100_EFFICIENCY = 0.6


def test_one_efficiency_factor() -> None:
    cfg = load("cluster=a100_80g")
    assert cfg.cluster.compute_efficiency == A100_EFFICIENCY
    assert ClusterConfig.compute_efficiency == A100_EFFICIENCY  # the schema default
    assert load("cluster=a100_40g").cluster.compute_efficiency == A100_EFFICIENCY


def test_llama65b_on_2048_a100_matches_the_paper() -> None:
    """Touvron et al. 2023: ~380 tokens/s/GPU on 2048 A100-80GB.

    Layout: tp8 (one node, as Meta's 8 model-parallel shards) x pp4 x dp64,
    sequence parallelism, the 4M-token batch (2048 x 2048), micro-batch 1.
    The paper recomputed only cheap activations and kept the matmul outputs,
    so in FLOPs its run is closest to our activation_checkpointing=none.
    """
    cfg = load(
        "model=65b",
        "parallel=tp8pp4",
        "cluster=a100_80g",
        "cluster.nodes=256",
        "parallel.sequence_parallel=true",
        "parallel.activation_checkpointing=none",
    )
    plan = resolve_plan(cfg)
    assert (plan.world_size, plan.dp, plan.num_micro_batches) == (2048, 64, 32)
    est = estimate(cfg, plan)
    assert est.fits
    assert est.tokens_per_s_per_device == pytest.approx(380, rel=0.15)
    # The bubble is (p-1)/(m+p-1) of the pipeline's time: 3/35.
    busy = est.time.compute + est.time.tp_comm
    assert est.time.bubble / (busy + est.time.bubble) == pytest.approx(3 / 35)


# Megatron-LM 2022 (Korthikanti et al., table 3, A100-80GB, seq 2048, micro-batch
# 1, vocab 51200, sequence parallel + selective recompute): (hidden, heads,
# layers, tp, pp, GPUs, global batch, published MFU). A LLaMA of the same
# hidden size and depth is the stand-in: its SwiGLU (3 x h x 8h/3) has GPT's
# MLP FLOPs (2 x h x 4h), so the per-token FLOPs match. Selective recompute adds
# ~3% FLOPs at these sizes; we model it as no recompute. Their 22B row
# (8 GPUs, batch 4: 41.5%) is outside this model: it predicts ~52%.
MEGATRON_2022 = {
    "175b": (12288, 96, 96, 8, 8, 64, 64, 0.514),
    "530b": (20480, 128, 105, 8, 35, 280, 280, 0.560),
    "1t": (25600, 160, 128, 8, 64, 512, 512, 0.563),
}


@pytest.mark.parametrize("name", sorted(MEGATRON_2022))
def test_megatron_2022_mfu(name: str) -> None:
    hidden, heads, layers, tp, pp, gpus, batch, published = MEGATRON_2022[name]
    cfg = load(
        "model=65b",
        "parallel=tp8pp4",
        "cluster=a100_80g",
        f"cluster.nodes={gpus // 8}",
        f"model.dim={hidden}",
        f"model.n_heads={heads}",
        f"model.n_layers={layers}",
        "model.vocab_size=51200",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        "parallel.sequence_parallel=true",
        "parallel.activation_checkpointing=none",
        f"train.global_batch_size={batch}",
    )
    plan = resolve_plan(cfg)
    assert plan.dp == 1
    assert estimate(cfg, plan).mfu == pytest.approx(published, rel=0.15)


def test_zero_state_hand_count() -> None:
    """Two groups of 16 and 3 elements over dp=4 (alignment 2*dp = 8 for ZeRO-1/2)."""
    groups = [[10, 6], [3]]
    # ZeRO-0 fp32: the plain optimiser, no padding: 4 + 4 + 8 bytes.
    z0 = zero_state_bytes(groups, zero_stage=0, dp=4, precision="fp32")
    assert (z0.params, z0.grads, z0.optimizer) == (19 * 4, 19 * 4, 19 * 8)
    # ZeRO-1 fp32: flat groups 16 and 3 -> 8, 24 elements; partitions 4 + 2 = 6;
    # fp32 master + 2 moments = 12 bytes per partition element.
    z1 = zero_state_bytes(groups, zero_stage=1, dp=4, precision="fp32")
    assert (z1.params, z1.grads, z1.optimizer) == (24 * 4, 24 * 4, 6 * 12)
    z2 = zero_state_bytes(groups, zero_stage=2, dp=4, precision="fp32")
    assert (z2.params, z2.grads, z2.optimizer) == (24 * 4, 6 * 4, 6 * 12)
    # ZeRO-3: each parameter padded to dp: 3 + 2 and 1 elements; fp32 groups
    # padded to 2: 6 and 2.
    z3 = zero_state_bytes(groups, zero_stage=3, dp=4, precision="fp32")
    assert (z3.params, z3.grads, z3.optimizer) == (6 * 4, 6 * 4, 8 * 12)
    # bf16: 2-byte weights; BF16_Optimizer (ZeRO-1) keeps fp32 gradients.
    b1 = zero_state_bytes(groups, zero_stage=1, dp=4, precision="bf16")
    assert (b1.params, b1.grads, b1.optimizer) == (24 * 2, 24 * 4, 6 * 12)


@pytest.mark.parametrize(
    ("stage", "per_param"),
    [(2, lambda n, dp: 2 * n + 14 * n / dp), (3, lambda n, dp: 16 * n / dp)],
)
def test_zero_state_matches_the_16_bytes_rule(stage: int, per_param: object) -> None:
    """Without padding, bf16 ZeRO-2/3 are REFERENCE.md's 2+14/dp and 16/dp bytes per parameter."""
    n, dp = 64 * 1024, 8
    state = zero_state_bytes([[n]], zero_stage=stage, dp=dp, precision="bf16")
    assert state.params + state.grads + state.optimizer == per_param(n, dp)  # type: ignore[operator]


def _tiny_layer(**kw: int | bool) -> float:
    args = ModelArgs(dim=128, n_layers=4, n_heads=8, vocab_size=2000, multiple_of=64)
    shape: dict[str, int | bool] = dict(micro_batch=2, seq_len=64, tp=1, sp=False, e=2)
    shape.update(kw)
    return layer_activation_bytes(args, **shape)  # type: ignore[arg-type]


def test_layer_activations_hand_count() -> None:
    """tiny: h=128, f=384 (2/3*4*128 = 341 -> multiple of 64), b=2, s=64, bf16.

    Per s*b*h: 2 norms x 4 (fp32 copies) + 2 x 2 (linear inputs) + 5 x 2
    (q, k, v, attention output, wo input) + 4 x 2 x 384/128 (SwiGLU) = 46.
    """
    sbh = 2 * 64 * 128
    assert _tiny_layer() == sbh * 46
    # tp=2: the 5x2 and SwiGLU terms halve: 8 + 4 + (10 + 24) / 2 = 29.
    assert _tiny_layer(tp=2) == sbh * 29
    # + sequence parallelism: norms halve, the gathered linear inputs stay
    # full and the norms' outputs add 2 x 2 / 2: 4 + 4 + 2 + 17 = 27.
    assert _tiny_layer(tp=2, sp=True) == sbh * 27


def test_one_f_one_b_in_flight_and_checkpointing() -> None:
    """Stage i holds pp - i micro-batches of its layers; checkpointing keeps layer inputs."""
    cfg = load("parallel=tp1pp2", "train.precision=fp32")
    plan = resolve_plan(cfg)
    args = cfg.model.to_args()
    shape = dict(micro_batch=1, seq_len=128, tp=1, sp=False, e=4)
    layer = layer_activation_bytes(args, **shape)  # type: ignore[arg-type]
    assert stage_memory(cfg, plan, 0).activations == 2 * 2 * layer
    assert stage_memory(cfg, plan, 1).activations == 1 * 2 * layer
    cfg.parallel.activation_checkpointing = "full"
    layer_input = 128 * 128 * 4
    assert stage_memory(cfg, plan, 0).activations == 2 * 2 * layer_input + layer


def test_verdict_names_the_largest_item() -> None:
    cfg = load("model=65b", "parallel=tp1pp1", "cluster=a100_80g", "train.global_batch_size=8")
    text = format_plan(resolve_plan(cfg), cfg)
    assert (
        "memory verdict: does NOT fit in 80.00 GiB (a100-80gb); largest item: optimizer state"
        in text
    )
    fits = load("model=7b", "parallel=tp8pp1", "cluster=a100_80g", "cluster.nodes=1")
    text = format_plan(resolve_plan(fits), fits)
    assert "memory verdict: fits in 80.00 GiB" in text
    assert "tokens/s per device, MFU" in text
    est = estimate(fits, resolve_plan(fits))
    assert est.peak.total < 80 * GIB
