"""Training data: what the loop asks of a data source, and the sources.

The loop needs one thing: an iterator of this data-parallel rank's
micro-batches, each ``(inputs, labels)`` of shape ``(micro_batch, seq_len)``
(labels are the inputs shifted by one token), plus ``state_dict`` /
``load_state_dict`` for the position so a resumed run continues with exactly
the next batch.

Sample order (Megatron's): optimiser step ``t`` consumes global samples
``[t*G, (t+1)*G)``; within it micro-batch ``m`` is the slice
``[m*mb*dp, (m+1)*mb*dp)``, of which dp rank ``r`` takes ``[r*mb, (r+1)*mb)``.
So the dp ranks never overlap, together cover the global batch, and every
layout sees the same samples in the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class MicroBatchSource(Protocol):
    """This dp rank's micro-batches, in order, resumable."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def sample_indices(
    step: int, micro: int, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
) -> range:
    """Global sample indices of micro-batch ``micro`` of step ``step`` on dp rank ``dp_rank``."""
    start = step * global_batch + micro * micro_batch * dp_size + dp_rank * micro_batch
    return range(start, start + micro_batch)
