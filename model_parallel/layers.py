"""Tensor-parallel layers: vocabulary-parallel embedding, column- and row-parallel linear.

Weights follow ``torch.nn.Linear``: ``A`` has shape ``(out, in)`` and
``Y = X A^T``. Every sharded parameter carries ``partition_dim`` (the axis it
is split along), ``full_size`` (the unpadded length of that axis in the full
tensor) and ``replicas`` (how many consecutive tp ranks hold the same shard:
1, or ``tp / n_kv_heads`` for replicated key/value heads), which is all that
is needed to cut a shard out of a full tensor or to gather one back
(``load_shard_``/``gather_full``). ``tensor_model_parallel`` (Megatron's and
DeepSpeed's name) is True on the first rank holding each shard and False on
its replicas, so a gradient norm that counts ``tensor_model_parallel``
parameters on every tp rank and the others on tp rank 0 counts each once. Layers allocate their parameters
uninitialised; the owner initialises them from full tensors, so the values
never depend on the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_parallel.mappings import (
    Group,
    copy_to_tp_region,
    gather_from_sp_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sp_region,
    scatter_to_tp_region,
    sum_over_replicas,
)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator}: must be divisible by tp({denominator})")
    return numerator // denominator


def mark_sharded(
    param: nn.Parameter,
    *,
    partition_dim: int,
    full_size: int,
    replicas: int = 1,
    tp_rank: int = 0,
) -> None:
    """Record how ``param`` is cut out of its full tensor (Megatron's attribute names)."""
    param.tensor_model_parallel = tp_rank % replicas == 0  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    param.partition_stride = 1  # type: ignore[attr-defined]
    param.full_size = full_size  # type: ignore[attr-defined]
    param.replicas = replicas  # type: ignore[attr-defined]


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a tp shard (replicated shards included) of a larger tensor."""
    return hasattr(param, "partition_dim")


def replicas_of(param: torch.Tensor) -> int:
    """How many consecutive tp ranks hold the same shard as ``param`` (1 if not replicated)."""
    return int(getattr(param, "replicas", 1))


def counts_in_norm(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this tp rank's copy of ``param`` counts in a tp-wide norm (once per value)."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the full (unsharded, unpadded) tensor ``param`` is a shard of."""
    shape = list(param.shape)
    if is_sharded(param):
        shape[param.partition_dim] = param.full_size  # type: ignore[attr-defined]
    return tuple(shape)


def shard_of(
    full: torch.Tensor, param: torch.Tensor, *, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This rank's shard of ``full``, shaped like ``param`` (a padded axis zero-padded)."""
    if tuple(full.shape) != full_shape(param):
        raise ValueError(f"full tensor shape {tuple(full.shape)} != expected {full_shape(param)}")
    if not is_sharded(param):
        return full
    dim = param.partition_dim  # type: ignore[attr-defined]
    replicas = replicas_of(param)
    num_shards = tp_size // replicas  # rank r holds shard r // replicas
    pad = param.shape[dim] * num_shards - full.shape[dim]
    if pad:
        pad_shape = list(full.shape)
        pad_shape[dim] = pad
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.chunk(num_shards, dim=dim)[tp_rank // replicas]


def load_shard_(param: torch.Tensor, full: torch.Tensor, *, tp_rank: int, tp_size: int) -> None:
    """Copy this rank's shard of ``full`` into ``param`` (zero-padding a padded axis)."""
    with torch.no_grad():
        param.copy_(shard_of(full, param, tp_rank=tp_rank, tp_size=tp_size))


def gather_full(param: torch.Tensor, group: Group) -> torch.Tensor:
    """The full, unpadded tensor of which ``param`` (or its gradient) is this rank's shard.

    A collective over ``group`` when ``param`` is sharded and tp > 1; of
    replicated shards the first copy of each is kept.
    """
    data = param.detach()
    if not is_sharded(param):
        return data.clone()
    dim = param.partition_dim  # type: ignore[attr-defined]
    size = group_size(group)
    if size > 1:
        parts = [torch.empty_like(data) for _ in range(size)]
        torch.distributed.all_gather(parts, data.contiguous(), group=group)
        data = torch.cat(parts[:: replicas_of(param)], dim=dim)
    return data.narrow(dim, 0, param.full_size).clone()  # type: ignore[attr-defined]


class VocabParallelEmbedding(nn.Module):
    """Embedding table ``E`` of shape ``(V, H)`` split by rows over tp: ``E = [E_1; ...; E_p]``.

    Rank ``i`` owns ids ``[i*V/p, (i+1)*V/p)``, looks up the ids it owns and
    writes zeros for the others; the partial lookups are then summed.
    Forward: all-reduce over tp (``(B, S, H)`` out), or with sequence
    parallelism a reduce-scatter over the sequence (``(B, S/p, H)`` out).
    Backward: identity (all-gather of the sequence with sequence parallelism).
    ``num_embeddings`` is the padded vocabulary; ``vocab_size`` the real one.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: Group = None,
        vocab_size: int | None = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        tp = group_size(tp_group)
        self.num_local = _divide(num_embeddings, tp, "num_embeddings")
        self.vocab_start = group_rank(tp_group) * self.num_local
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_dim))
        mark_sharded(self.weight, partition_dim=0, full_size=vocab_size or num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp_region(out, self.tp_group)
        return reduce_from_tp_region(out, self.tp_group)


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T`` with ``A`` (out, in) split by output rows: ``A = [A_1; ...; A_p]``.

    Rank ``i`` computes ``Y_i = X A_i^T`` of shape ``(..., out/p)``.
    Input mapping: forward identity, backward all-reduce of ``dX`` over tp;
    with sequence parallelism the input arrives as ``(B, S/p, in)`` and is
    all-gathered over the sequence in forward, ``dX`` reduce-scattered in
    backward. ``mapped_input=True`` means the caller already applied that
    mapping once for several layers sharing one input (q/k/v, w1/w3), which
    saves a collective per extra layer. ``gather_output`` all-gathers ``Y``
    over the last dim (backward: keep this rank's chunk).

    ``replicas = r > 1`` (key/value heads when tp exceeds them): ``A`` is cut
    into ``p / r`` blocks only, and ranks ``[j*r, (j+1)*r)`` all hold ``A_j``.
    Each of them computes ``dA_j`` from its own part of the output gradient
    only, so the true gradient of the one logical ``A_j`` is the sum of the
    ``r`` partial ones: the weight passes through ``sum_over_replicas``
    (forward identity, backward that sum over the ``r`` ranks; an all-gather
    over tp), and every copy gets the same gradient, hence the same update.
    ``dX`` needs nothing extra: ``sum_i dY_i A_{i//r}`` over all ranks is
    already the full ``dY A`` once the input mapping's all-reduce has run.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: Group = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        mapped_input: bool = False,
        full_out_features: int | None = None,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        if gather_output and replicas > 1:
            raise ValueError("gather_output with replicated shards is not supported")
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.mapped_input = mapped_input
        self.replicas = replicas
        tp = group_size(tp_group)
        if tp % replicas:
            raise ValueError(f"replicas={replicas}: must divide tp({tp})")
        out_local = _divide(out_features, tp // replicas, "out_features")
        self.weight = nn.Parameter(torch.empty(out_local, in_features))
        mark_sharded(
            self.weight,
            partition_dim=0,
            full_size=full_out_features or out_features,
            replicas=replicas,
            tp_rank=group_rank(tp_group),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mapped_input:
            x = map_column_input(x, self.tp_group, sequence_parallel=self.sequence_parallel)
        weight = sum_over_replicas(self.weight, self.tp_group, self.replicas)
        y = F.linear(x, weight)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y


def map_column_input(x: torch.Tensor, tp_group: Group, *, sequence_parallel: bool) -> torch.Tensor:
    """The input side of a column-parallel layer (see ``ColumnParallelLinear``)."""
    if sequence_parallel:
        return gather_from_sp_region(x, tp_group, reduce_grad=True)
    return copy_to_tp_region(x, tp_group)


class RowParallelLinear(nn.Module):
    """``Y = X A^T`` with ``A`` (out, in) split by input columns: ``A = [A_1, ..., A_p]``.

    With ``X = [X_1, ..., X_p]`` split the same way on its last dim,
    ``Y = sum_i X_i A_i^T``. Forward: all-reduce the partial products over tp,
    or with sequence parallelism reduce-scatter them over the sequence
    (``(B, S/p, out)`` out). Backward: identity (all-gather with sequence
    parallelism). ``input_is_parallel=False`` first scatters a full ``X``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: Group = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        in_local = _divide(in_features, group_size(tp_group), "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        mark_sharded(self.weight, partition_dim=1, full_size=in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sp_region(y, self.tp_group)
        return reduce_from_tp_region(y, self.tp_group)
