"""The Llama 2 and Llama 3 family: grouped-query attention and Llama 3.1's rotary
scaling against Hugging Face transformers, the KV-head layout rule, and the six
published configs.

No weights are downloaded: randomly initialised ``LlamaForCausalLM`` models
with ``num_key_value_heads < num_attention_heads`` and ``rope_type: llama3``
are the references.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model_parallel.args import ModelArgs, RopeScaling
from model_parallel.llama import Transformer
from model_parallel.rotary import rotary_cos_sin
from orchestrator.config.schema import Config
from orchestrator.state.convert import (
    from_hf,
    hf_config,
    load_meta_checkpoint,
    save_meta_checkpoint,
    to_hf,
)
from orchestrator.state.weights import merge_tp
from tests.test_cli import _assert_one_line_error, run
from tests.test_config import load
from tests.tiny import tiny_args

transformers = pytest.importorskip("transformers")

# head_dim 16: wavelengths 6.3, 20, 63, ... tokens, so with original_max_seq_len 32
# (high-frequency limit 32 / 4 = 8, low 32 / 1 = 32) one frequency is kept, one
# blended and the rest divided by the factor: every branch of the rule is used.
SCALING = RopeScaling(
    factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=32
)
# Llama 3's kind in miniature: 6 heads of 16 on 2 KV heads, theta 500k, the scaling above
ARGS = tiny_args(
    dim=96,
    n_heads=6,
    n_kv_heads=2,
    vocab_size=203,
    max_seq_len=64,
    rope_theta=500000.0,
    rope_scaling=SCALING,
)


def _hf_model(args: ModelArgs, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_config(args), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 47), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_scaled_frequencies_match_transformers(theta: float) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = dataclasses.replace(ARGS, rope_theta=theta)
    config = transformers.LlamaConfig(**hf_config(args))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    cos, sin = rotary_cos_sin(40, args.head_dim, theta, torch.device("cpu"), SCALING)
    angles = torch.outer(torch.arange(40).float(), inv_freq.float())
    torch.testing.assert_close(cos, angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, angles.sin(), rtol=0, atol=1e-6)
    plain, _ = rotary_cos_sin(40, args.head_dim, theta, torch.device("cpu"))
    assert not torch.allclose(cos, plain)  # the scaling changes something here


def test_gqa_llama3_logits_match_transformers() -> None:
    hf = _hf_model(ARGS)
    assert hf.config.num_key_value_heads == 2 and hf.config.rope_scaling["rope_type"] == "llama3"
    with torch.no_grad():
        expected = hf(_tokens()).logits
    model = Transformer(ARGS)
    model.load_full_state_dict(from_hf(hf.state_dict(), ARGS))
    assert model.layers["0"].attention.wk.weight.shape == (ARGS.kv_dim, ARGS.dim)
    with torch.no_grad():
        ours = model.gather_logits(model(_tokens()))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_gqa_hf_round_trip_is_exact() -> None:
    state = Transformer(ARGS, seed=3).full_state_dict()
    back = from_hf(to_hf(state, ARGS), ARGS)
    assert all(torch.equal(back[name], state[name]) for name in state)
    hf = _hf_model(ARGS)
    hf.load_state_dict(to_hf(state, ARGS), strict=True)  # the K/V shapes are HF's


def test_gqa_meta_round_trip(tmp_path: Path) -> None:
    args = dataclasses.replace(ARGS, rope_scaling=None)  # params.json holds only a flag
    state = Transformer(args, seed=4).full_state_dict()
    save_meta_checkpoint(tmp_path, args, state, num_shards=2)
    args, back = load_meta_checkpoint(tmp_path)
    assert args.n_kv_heads == 2 and args.rope_theta == 500000.0
    assert all(torch.equal(back[name], state[name]) for name in state)


@pytest.mark.parametrize("num_shards", [4, 8])
def test_meta_shards_beyond_the_kv_heads(tmp_path: Path, num_shards: int) -> None:
    """More model-parallel shards than KV heads (Llama 3.1 405B at MP16: 8 KV heads):
    each shard carries one KV head, copied on shards / n_kv_heads consecutive shards,
    and the embedding is split by vocabulary rows (Llama 3's VocabParallelEmbedding)."""
    args = dataclasses.replace(ARGS, rope_scaling=None, vocab_size=208)
    assert args.n_kv_heads == 2 and args.vocab_size % num_shards == 0
    state = Transformer(args, seed=5).full_state_dict()
    save_meta_checkpoint(tmp_path, args, state, num_shards=num_shards)
    files = sorted(tmp_path.glob("consolidated.*.pth"))
    shards = [torch.load(f, weights_only=True) for f in files]
    assert len(shards) == num_shards
    wk = state["layers.0.attention.wk.weight"]
    copies = num_shards // 2
    for i, shard in enumerate(shards):
        assert torch.equal(shard["layers.0.attention.wk.weight"], wk.chunk(2)[i // copies])
        assert shard["tok_embeddings.weight"].shape == (args.vocab_size // num_shards, args.dim)
    loaded, back = load_meta_checkpoint(tmp_path)
    assert loaded.n_kv_heads == 2 and loaded.vocab_size == args.vocab_size
    assert back.keys() == state.keys()
    assert all(torch.equal(back[name], state[name]) for name in state)


def test_meta_params_use_scaled_rope(tmp_path: Path) -> None:
    args = dataclasses.replace(ARGS, rope_scaling=RopeScaling())
    save_meta_checkpoint(tmp_path, args, Transformer(args).full_state_dict(), num_shards=1)
    assert load_meta_checkpoint(tmp_path)[0].rope_scaling == RopeScaling()


def test_merge_tp_takes_one_replica_per_kv_head() -> None:
    """Per-rank model files at tp 4 with 2 KV heads: ranks 0, 1 hold head 0, ranks 2, 3 head 1."""
    args = dataclasses.replace(ARGS, n_heads=4, dim=64, max_seq_len=16)
    full = Transformer(args, seed=5).full_state_dict()
    shards = []
    for rank in range(4):
        shard = {}
        for name, tensor in full.items():
            if name.endswith(("wk.weight", "wv.weight")):
                shard[name] = tensor.chunk(2)[rank // 2]
            elif name.endswith(("wq.weight", "w1.weight", "w3.weight")):
                shard[name] = tensor.chunk(4)[rank]
            elif name.endswith(("wo.weight", "w2.weight")):
                shard[name] = tensor.chunk(4, dim=1)[rank]
            elif name in ("tok_embeddings.weight", "output.weight"):
                padded = torch.cat([tensor, tensor.new_zeros(512 - tensor.shape[0], args.dim)])
                shard[name] = padded.chunk(4)[rank]
            else:
                shard[name] = tensor
        shards.append(shard)
    merged = merge_tp(shards, args)
    assert all(torch.equal(merged[name], full[name]) for name in full)


# Parameter counts: Meta's and Hugging Face's model cards and the papers.
PUBLISHED = {
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_405b": 405_853_388_800,
}


def _count(args: ModelArgs) -> int:
    """Parameters of ``args`` counted independently of ``ModelArgs.num_params``."""
    d, kv = args.dim, args.num_kv_heads * args.head_dim
    hidden = int(2 * 4 * d / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = -(-hidden // args.multiple_of) * args.multiple_of
    layer = d * d * 2 + d * kv * 2 + 3 * d * hidden + 2 * d
    return args.n_layers * layer + 2 * args.vocab_size * d + d


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name: str) -> None:
    args = load(f"model={name}").model.to_args()
    assert args.num_params() == PUBLISHED[name]
    assert _count(args) == PUBLISHED[name]


def test_the_family_shapes_and_recipes() -> None:
    for name in PUBLISHED:
        cfg = load(f"model={name}")
        m, t = cfg.model, cfg.train
        llama3 = name.startswith("llama3")
        assert m.max_seq_len == (8192 if llama3 else 4096)
        assert m.vocab_size == (128256 if llama3 else 32000)
        assert m.rope_theta == (500000.0 if llama3 else 10000.0)
        assert m.norm_eps == 1e-5
        assert (
            (m.n_kv_heads == 8) if name not in ("llama2_7b", "llama2_13b") else m.n_kv_heads is None
        )
        assert (t.beta1, t.beta2, t.adam_eps, t.weight_decay, t.grad_clip) == (
            0.9,
            0.95,
            1e-5,
            0.1,
            1.0,
        )
        seq = t.seq_len or m.max_seq_len
        assert t.global_batch_size * seq == 4 * 1024 * 1024, name  # 4M tokens
    l405 = load("model=llama3_405b")
    assert l405.model.to_args().rope_scaling == RopeScaling()  # Llama 3.1's constants
    others = [n for n in PUBLISHED if n != "llama3_405b"]
    assert all(load(f"model={n}").model.to_args().rope_scaling is None for n in others)
    t = l405.train
    assert (t.lr, t.warmup_steps, t.steps, t.seq_len) == (8e-5, 8000, 1_200_000, 4096)
    assert t.lr * t.min_lr_ratio == pytest.approx(8e-7)
    for name, lr in (("llama2_7b", 3e-4), ("llama2_13b", 3e-4), ("llama2_70b", 1.5e-4)):
        t = load(f"model={name}").train
        assert (t.lr, t.warmup_steps, t.min_lr_ratio) == (lr, 2000, 0.1)


def test_kv_layout_rule_in_config_validation() -> None:
    cfg = load("model=llama3_8b", "parallel.tp=16")
    cfg.validate()  # 8 KV heads, each on two ranks
    cfg = load("model=tiny", "model.dim=96", "model.n_heads=12", "model.n_kv_heads=4")
    cfg.parallel.tp = 6
    with pytest.raises(ValueError, match=r"^parallel.tp=6: tp > model.n_kv_heads\(4\)"):
        cfg.validate()
    cfg.model.n_kv_heads = 5
    with pytest.raises(ValueError, match=r"^model.n_kv_heads=5: must divide model.n_heads\(12\)"):
        cfg.model.validate()
    assert isinstance(cfg, Config)


def test_rope_scaling_from_the_command_line() -> None:
    """A single field turns it on; factor 1 (the default) is none."""
    assert load("model=tiny").model.to_args().rope_scaling is None
    args = load("model=tiny", "model.rope_scaling.factor=8").model.to_args()
    assert args.rope_scaling == RopeScaling(factor=8.0)
    result = run("model=tiny", "model.rope_scaling.high_freq_factor=0.5", "dry_run=true")
    _assert_one_line_error(
        result,
        "error: model.rope_scaling.high_freq_factor=0.5: must be > "
        "model.rope_scaling.low_freq_factor(1.0)",
    )


def test_bad_kv_layout_is_one_line_and_exit_2() -> None:
    result = run(
        "model=tiny",
        "model.dim=96",
        "model.n_heads=12",
        "model.n_kv_heads=6",
        "parallel=tp4pp2",
        "dry_run=true",
    )
    _assert_one_line_error(
        result, "error: parallel.tp=4: model.n_kv_heads(6) must be divisible by tp"
    )


def test_dry_run_llama3_8b_tp8() -> None:
    result = run(
        "model=llama3_8b", "parallel=tp8pp1", "cluster=a100_80g", "cluster.nodes=4", "dry_run=true"
    )
    assert result.returncode == 0, result.stderr
    assert "total params: 8,030,261,248" in result.stdout
    assert "dry run: config and layout are valid" in result.stdout
