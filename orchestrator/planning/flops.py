"""Training FLOPs per token for LLaMA's shapes, and MFU.

Notation: d = ``args.dim``, f = SwiGLU hidden width (``args.hidden_dim``,
Meta's ``ffn_hidden_dim`` rule), k = the width of the K and V projections
(``args.kv_dim`` = n_kv_heads · head_dim; d without grouped-query
attention), l = layers, s = sequence length, V = the unpadded vocabulary. A matmul with a (m x n) weight costs 2·m·n FLOPs per
token (one multiply and one add per weight).

Forward pass, per token::

    per layer   q, o projections            2 · 2·d·d   =  4·d²
                k, v projections (d x k)    2 · 2·d·k   =  4·d·k   (4·d² without GQA)
                SwiGLU w1, w3 (d x f), w2   3 · 2·d·f   =  6·d·f
                QK^T and AV over s keys     2 · 2·s·d   =  4·s·d   (every query head)
    once        output layer (d x V)        2·d·V
    free        embedding lookup, RMSNorm, RoPE, softmax, SiLU (not matmuls)

    forward = l·(4·d² + 4·d·k + 6·d·f + 4·s·d) + 2·d·V

Backward costs twice the forward (gradients of the input and of the weight),
so the *model* FLOPs of training are ``3 · forward = 6·N_matmul + 12·l·s·d``,
where N_matmul = l·(2·d² + 2·d·k + 3·d·f) + d·V is every parameter that takes part in
a matmul (the input embedding does not). This is PaLM's appendix-B formula
(6N + 12·L·H·Q·T with H·Q = d, T = s).

The attention term counts the *full* s x s score matrix, not the causal
half that a mask-aware kernel actually needs: that is how PaLM and Megatron
publish MFU, so our MFU compares with theirs. (Counting the causal half would
lower the attention term to 6·l·s·d.)

*Hardware* FLOPs add what the run really executes beyond the model's need:
full activation recomputation runs every layer's forward once more in the
backward pass, so 4 · forward instead of 3 (the output layer is recomputed
too in this accounting, which is a slight overcount; Megatron's 96·B·s·l·h²
formula does the same). MFU uses model FLOPs; HFU would use hardware FLOPs.
"""

from __future__ import annotations

from model_parallel.args import ModelArgs


def forward_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """FLOPs of one forward pass per token: l·(4·d² + 4·d·k + 6·d·f + 4·s·d) + 2·d·V."""
    d, k, f = args.dim, args.kv_dim, args.hidden_dim
    per_layer = 4 * d * d + 4 * d * k + 6 * d * f + 4 * seq_len * d
    return float(args.n_layers * per_layer + 2 * d * args.vocab_size)


def model_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token the model needs: 3 x forward = 6·N_matmul + 12·l·s·d.

    Full (non-causal) attention term, as PaLM and Megatron count it for MFU.
    """
    return 3.0 * forward_flops_per_token(args, seq_len)


def hardware_flops_per_token(args: ModelArgs, seq_len: int, *, recompute: bool) -> float:
    """Training FLOPs per token executed: one more forward when activations are recomputed."""
    passes = 4.0 if recompute else 3.0
    return passes * forward_flops_per_token(args, seq_len)


def achieved_tflops(tokens_per_s_per_device: float, flops_per_token: float) -> float:
    """TFLOP/s one device sustains at this throughput."""
    return tokens_per_s_per_device * flops_per_token / 1e12


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (0..1)."""
    return achieved_tflops(tokens_per_s_per_device, flops_per_token) / peak_tflops
