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


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tp_group: Group = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross entropy ``(...)`` from vocab-sharded logits ``(..., V/p)``.

    ``vocab_size`` is the real vocabulary (columns past it are tp padding).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size, ignore_index)


def masked_mean(
    per_token: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """Mean loss over the tokens that carry one (``target != ignore_index``)."""
    count = (target != ignore_index).sum().clamp(min=1)
    return per_token.sum() / count
