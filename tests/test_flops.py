"""FLOPs per token: a hand count of every matmul, and LLaMA-65B's published MFU."""

from __future__ import annotations

import pytest

from model_parallel.args import ModelArgs
from orchestrator.planning.flops import (
    achieved_tflops,
    forward_flops_per_token,
    hardware_flops_per_token,
    mfu,
    model_flops_per_token,
)


def test_hand_count_small_shape() -> None:
    # dim 8, 2 layers, 2 heads, vocab 10, seq 4; multiple_of 4 gives ffn 24
    # (2/3 * 4 * 8 = 21.33 -> 21 -> rounded up to 24).
    args = ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=10, multiple_of=4)
    assert args.hidden_dim == 24
    s = 4
    # Forward, one token, each matmul (m x n weight) = 2*m*n FLOPs:
    wq = wk = wv = wo = 2 * 8 * 8  # 128 each
    w1 = w3 = 2 * 8 * 24  # 384 each (gate and up)
    w2 = 2 * 24 * 8  # 384 (down)
    # Attention for one token against all s=4 keys (full s x s, as PaLM counts):
    # QK^T: 2 heads * 4 keys * head_dim 4 * 2 = 64; AV the same.
    qk = 2 * 4 * 4 * 2
    av = 2 * 4 * 4 * 2
    layer = wq + wk + wv + wo + w1 + w2 + w3 + qk + av  # 512 + 1152 + 128 = 1792
    output = 2 * 8 * 10  # 160; the embedding lookup is free
    forward = 2 * layer + output
    assert forward == 3744
    assert forward_flops_per_token(args, s) == forward
    assert model_flops_per_token(args, s) == 3 * forward  # backward = 2 x forward
    assert hardware_flops_per_token(args, s, recompute=False) == 3 * forward
    assert hardware_flops_per_token(args, s, recompute=True) == 4 * forward


def test_matches_6n_plus_attention() -> None:
    """PaLM appendix B: 6·N_matmul + 12·l·s·d, N_matmul excluding the input embedding."""
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    n_matmul = args.num_params() - args.vocab_size * args.dim - (2 * args.n_layers + 1) * args.dim
    expected = 6 * n_matmul + 12 * args.n_layers * 2048 * args.dim
    assert model_flops_per_token(args, 2048) == pytest.approx(expected, rel=1e-12)


def test_grouped_query_attention_counts_the_narrower_k_and_v() -> None:
    """Llama-3-8B's shape (8 KV heads of 128): k and v are 4096 x 1024, and 6·N_matmul +
    12·l·s·d still holds with N from ``num_params`` (8,030,261,248)."""
    args = ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
    )
    assert args.num_params() == 8_030_261_248
    n_matmul = args.num_params() - args.vocab_size * args.dim - (2 * args.n_layers + 1) * args.dim
    expected = 6 * n_matmul + 12 * args.n_layers * 8192 * args.dim
    assert model_flops_per_token(args, 8192) == pytest.approx(expected, rel=1e-12)
    mha = ModelArgs(**{**args.__dict__, "n_kv_heads": None})
    saved = 32 * 2 * (2 * 4096 * (4096 - 1024))  # per layer k and v: 2 FLOPs per weight fewer
    assert forward_flops_per_token(mha, 8192) - forward_flops_per_token(args, 8192) == saved


def test_llama_65b_published_mfu() -> None:
    """380 tokens/s/GPU on A100 (312 TFLOP/s bf16): 47.6% by 6N, 49.6% with attention."""
    args = ModelArgs(dim=8192, n_layers=80, n_heads=64, vocab_size=32000)
    assert args.hidden_dim == 22016
    flops = model_flops_per_token(args, 2048)
    assert flops == pytest.approx(406.2e9, rel=1e-3)
    tflops = achieved_tflops(380.0, flops)
    assert tflops == pytest.approx(154.4, abs=0.1)
    utilisation = mfu(380.0, flops, 312.0)
    assert 0.47 <= utilisation <= 0.50
    assert utilisation == pytest.approx(0.495, abs=0.002)
    # 6N alone (no attention term) is the paper's other common figure.
    six_n = 6 * (args.num_params() - args.vocab_size * args.dim)
    assert mfu(380.0, six_n, 312.0) == pytest.approx(0.476, abs=0.002)
    # With full recomputation the hardware does a third more.
    hfu = mfu(380.0, hardware_flops_per_token(args, 2048, recompute=True), 312.0)
    assert hfu == pytest.approx(utilisation * 4 / 3)
