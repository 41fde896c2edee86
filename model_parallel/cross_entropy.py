"""Cross entropy over logits whose vocabulary dimension is split over tp.

No rank ever holds the full ``(B, S, V)`` logits. With rank ``i`` owning
vocabulary columns ``[i*V/p, (i+1)*V/p)``:

    m      = max_j z_j                      (all-reduce MAX)
    z_t    = logit of the target column     (owned by one rank; all-reduce SUM)
    sum    = sum_j exp(z_j - m)             (all-reduce SUM)
    loss   = log(sum) - (z_t - m)
    dloss/dz_j = softmax_j - [j == t]       (local, no communication)

Columns at or past ``vocab_size`` (tp padding) are masked to -inf so the
padding never changes the loss. Targets equal to ``ignore_index`` give zero
loss and zero gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from model_parallel.mappings import Group, group_rank, group_size


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType, group: Group) -> None:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss (3 all-reduces of (B, S) over tp). Backward: local."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: Group,
        vocab_size: int | None,
        ignore_index: int,
    ) -> torch.Tensor:
        num_local = logits.shape[-1]
        start = group_rank(group) * num_local
        z = logits.float()
        if vocab_size is not None and start + num_local > vocab_size:
            column = torch.arange(start, start + num_local, device=z.device)
            z = z.masked_fill(column >= vocab_size, float("-inf"))

        z_max = z.max(dim=-1).values
        _all_reduce(z_max, dist.ReduceOp.MAX, group)
        z = z - z_max.unsqueeze(-1)

        ignored = target == ignore_index
        local_target = target - start
        not_mine = (local_target < 0) | (local_target >= num_local) | ignored
        local_target = local_target.masked_fill(not_mine, 0)
        z_target = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        z_target = z_target.masked_fill(not_mine, 0.0)
        _all_reduce(z_target, dist.ReduceOp.SUM, group)

        exp = z.exp()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        loss = (sum_exp.log() - z_target).masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, not_mine, ignored)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local_target, not_mine, ignored = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once
        one_hot = (~not_mine).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -one_hot.unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None


def _real_columns(logits: torch.Tensor, start: int, vocab_size: int) -> torch.Tensor | None:
    """Mask of this rank's columns below ``vocab_size``, or None when all are
    (the ints are specialised when compiled, so an unpadded rank's kernels carry
    no mask: an int64 compare per element costs as much as the exp)."""
    if start + logits.shape[-1] <= vocab_size:
        return None
    return start + torch.arange(logits.shape[-1], device=logits.device) < vocab_size


def _local_max(logits: torch.Tensor, start: int, vocab_size: int) -> torch.Tensor:
    z = logits.float()
    real = _real_columns(logits, start, vocab_size)
    return (z if real is None else torch.where(real, z, float("-inf"))).amax(dim=-1)


def _local_sums(
    logits: torch.Tensor,
    z_max: torch.Tensor,
    target: torch.Tensor,
    start: int,
    vocab_size: int,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_j exp(z_j - m)`` over this rank's real columns, and the target's logit
    where this rank owns it (else 0)."""
    z = logits.float()
    exp = torch.exp(z - z_max.unsqueeze(-1))
    real = _real_columns(logits, start, vocab_size)
    exp = exp if real is None else torch.where(real, exp, 0.0)
    local = target - start
    mine = (local >= 0) & (local < logits.shape[-1]) & (target != ignore_index)
    picked = z.gather(-1, torch.where(mine, local, 0).unsqueeze(-1)).squeeze(-1)
    return exp.sum(dim=-1), torch.where(mine, picked, 0.0)


def _local_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    start: int,
    vocab_size: int,
    ignore_index: int,
) -> torch.Tensor:
    """``grad * (softmax - one_hot)`` for this rank's columns in one pass; zero in
    padding columns and ignored rows; in the logits' dtype."""
    g = torch.where(target != ignore_index, grad_loss, 0.0).unsqueeze(-1)
    # int32 columns against the local target: half the lanes of an int64 compare
    column = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int32)
    local = (target - start).to(torch.int32).unsqueeze(-1)  # outside [0, n): no column
    one_hot = (column == local).float()
    grad = (torch.exp(logits.float() - lse.unsqueeze(-1)) - one_hot) * g
    real = _real_columns(logits, start, vocab_size)
    grad = grad if real is None else torch.where(real, grad, 0.0)
    return grad.to(logits.dtype)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn)


class _CompiledVocabParallelCrossEntropy(torch.autograd.Function):
    """The same loss as ``_VocabParallelCrossEntropy`` (the same three all-reduces),
    with the local work in three inductor kernels: max, exp-sum with the target's
    logit, and a one-pass backward. Keeps the logits and one logsumexp per token
    for backward instead of an fp32 softmax, so it also holds half the memory."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: Group,
        vocab_size: int | None,
        ignore_index: int,
    ) -> torch.Tensor:
        start = group_rank(group) * logits.shape[-1]
        vocab = start + logits.shape[-1] if vocab_size is None else vocab_size
        z_max = _compiled(_local_max)(logits, start, vocab)
        _all_reduce(z_max, dist.ReduceOp.MAX, group)
        sum_exp, z_target = _compiled(_local_sums)(
            logits, z_max, target, start, vocab, ignore_index
        )
        _all_reduce(z_target, dist.ReduceOp.SUM, group)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        lse = z_max + sum_exp.log()
        loss = torch.where(target == ignore_index, 0.0, lse - z_target)
        ctx.save_for_backward(logits, target, lse)
        ctx.start, ctx.vocab, ctx.ignore_index = start, vocab, ignore_index
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, lse = ctx.saved_tensors
        grad = _compiled(_local_grad)(
            logits, target, lse, grad_loss, ctx.start, ctx.vocab, ctx.ignore_index
        )
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Group = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-token cross entropy ``(...)`` from vocab-sharded logits ``(..., V/p)``.

    ``vocab_size`` is the real vocabulary (columns past it are tp padding).
    ``compiled`` (``model.compile=true``): the local work as inductor kernels
    between the same all-reduces. On this CPU, tp = 1, bf16 logits of 4 x 512
    tokens by 32,000 words: forward + backward 44 + 63 ms, against 269 + 72 ms.
    """
    fn = _CompiledVocabParallelCrossEntropy if compiled else _VocabParallelCrossEntropy
    return fn.apply(logits, target, tp_group, vocab_size, ignore_index)


def masked_mean(
    per_token: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean loss over the tokens that carry one (``target != ignore_index``)."""
    count = (target != ignore_index).sum().clamp(min=1)
    return per_token.sum() / count
