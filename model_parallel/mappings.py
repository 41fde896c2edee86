"""The tensor-parallel collectives, as autograd functions.

Each function takes the tp process group explicitly; a ``None`` group (or a
group of size 1) makes it the identity. "Last dim" is the hidden/feature
dimension; the sequence-parallel pair works on the sequence dimension of a
batch-first ``(B, S, H)`` activation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None

SEQ_DIM = 1  # activations are (B, S, H)


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by {size}")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce_scatter: all-reduce, then keep this rank's chunk.
        return _split(_all_reduce(x.clone(), group), dim, group)
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient over tp."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce over tp. Backward: identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's chunk of the last dim."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    """Forward: keep this rank's chunk of the sequence. Backward: all-gather the sequence."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad, SEQ_DIM, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: reduce-scatter the gradient over the sequence.

    The reduce-scatter is right when the consumer is tensor-parallel (each
    rank's gradient is a partial sum); ``reduce_grad=False`` splits instead.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return _gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.reduce_grad:
            return _reduce_scatter(grad, SEQ_DIM, ctx.group), None, None
        return _split(grad, SEQ_DIM, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Forward: reduce-scatter over the sequence. Backward: all-gather the sequence."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad, SEQ_DIM, ctx.group), None


class _SumOverReplicas(torch.autograd.Function):
    """Forward: identity. Backward: sum the gradient over the ``replicas`` consecutive tp
    ranks that hold the same tensor (an all-gather over tp, then a local sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, replicas: int) -> torch.Tensor:
        ctx.group, ctx.replicas = group, replicas
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        size = group_size(ctx.group)
        parts = [torch.empty_like(grad) for _ in range(size)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        first = group_rank(ctx.group) // ctx.replicas * ctx.replicas
        return torch.stack(parts[first : first + ctx.replicas]).sum(0), None, None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sp_region(
    x: torch.Tensor, group: Group, *, reduce_grad: bool = True
) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSP.apply(x, group, reduce_grad)


def reduce_scatter_to_sp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)


def sum_over_replicas(x: torch.Tensor, group: Group, replicas: int) -> torch.Tensor:
    return x if replicas == 1 else _SumOverReplicas.apply(x, group, replicas)
