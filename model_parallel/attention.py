"""Causal attention: ``scaled_dot_product_attention``, and for compiled blocks on CPU
the flash forward with a backward written as matmuls.

On a GPU SDPA picks its flash or memory-efficient kernels, forward and backward,
and nothing here changes that. On CPU, ATen's flash-attention backward is the
slow half in bf16: on the 60M model (4 x 512 tokens, 8 heads of 64) it takes
about 18 ms per layer against 3.5 ms for its forward. ``flash_attention_cpu``
keeps ATen's flash forward (output and the logsumexp per row) and recomputes
the probabilities in backward from that logsumexp, so the backward is five
matmuls (AMX in bf16) and elementwise work that inductor fuses; about 11 ms
per layer (a whole 60M step: 732 -> 660 ms; the tiny model's: 73 -> 36 ms).
It is meant for compiled blocks (``model.compile=true``) in bf16 or fp16:
eager, the elementwise passes over the ``S x S`` scores run unfused, and in
fp32 ATen's backward is faster.

The backward works on blocks of ``BACKWARD_ROWS`` query rows, each against
only the keys up to its last row (the causal mask leaves the rest at zero), so
its transient memory is ``B x h x BACKWARD_ROWS x S`` scores, not ``S x S``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

BACKWARD_ROWS = 512


def _flash_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of causal softmax attention ``(B, h, S, hd)`` from the forward's
    output and logsumexp ``(B, h, S)`` (fp32): ``P = exp(q k^T scale - lse)``,
    ``dv = P^T dO``, ``dS = P * (dO v^T - rowsum(dO * O))``, ``dq = dS k scale``,
    ``dk = dS^T q scale``. Probabilities and scores in fp32 (fp64 for fp64
    inputs), matmul operands in the inputs' dtype; dk and dv accumulate over
    row blocks in that precision too."""
    seq = q.shape[-2]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # (B, h, S, 1)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for i0 in range(0, seq, BACKWARD_ROWS):
        i1 = min(i0 + BACKWARD_ROWS, seq)
        q_blk, do_blk = q[..., i0:i1, :], grad_out[..., i0:i1, :]
        k_vis, v_vis = k[..., :i1, :], v[..., :i1, :]
        scores = torch.matmul(q_blk, k_vis.transpose(-1, -2)).to(acc) * scale
        rows = torch.arange(i0, i1, device=q.device).unsqueeze(-1)
        cols = torch.arange(i1, device=q.device)
        probs = torch.where(cols <= rows, torch.exp(scores - lse[..., i0:i1, None]), 0.0)
        dv[..., :i1, :] += torch.matmul(probs.to(q.dtype).transpose(-1, -2), do_blk).to(acc)
        dprobs = torch.matmul(do_blk, v_vis.transpose(-1, -2)).to(acc)
        dscores = (probs * (dprobs - delta[..., i0:i1, :]) * scale).to(q.dtype)
        dq[..., i0:i1, :] = torch.matmul(dscores, k_vis)
        dk[..., :i1, :] += torch.matmul(dscores.transpose(-1, -2), q_blk).to(acc)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _FlashAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        group = q.shape[1] // k.shape[1]
        if group == 1:
            return _flash_backward(grad_out.contiguous(), q, k, v, out, lse, scale)
        # Grouped KV heads: expanded for the backward only (transient), and each
        # head's gradient is the sum over the query heads of its group.
        k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dq, dk, dv = _flash_backward(grad_out.contiguous(), q, k_all, v_all, out, lse, scale)
        b, _, s, d = k.shape
        return dq, dk.view(b, -1, group, s, d).sum(2), dv.view(b, -1, group, s, d).sum(2)


def flash_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention ``(B, h, S, hd)``: ATen's CPU flash forward, the matmul backward.
    ``k`` and ``v`` may have fewer heads (``h / g``, grouped-query attention)."""
    return _FlashAttentionCPU.apply(q, k, v)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cpu_matmul_backward: bool = False
) -> torch.Tensor:
    """Causal attention ``(B, h, S, hd)``; ``cpu_matmul_backward``: on a bf16 or fp16
    CPU tensor, ``flash_attention_cpu`` instead of SDPA (for compiled blocks).
    In fp32 ATen's flash backward is the faster one (60M model: 2.29 s against
    2.46 s a step), so fp32 keeps SDPA.

    Grouped-query attention: ``k`` and ``v`` carry ``h / g`` heads, query head
    ``i`` reading KV head ``i // g``. They are not expanded (SDPA's
    ``enable_gqa``, which its flash kernels take as they are), so autograd saves
    K and V at their own width, not at the queries'."""
    half = q.dtype in (torch.bfloat16, torch.float16)
    if cpu_matmul_backward and half and q.device.type == "cpu":
        return flash_attention_cpu(q, k, v)
    grouped = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
