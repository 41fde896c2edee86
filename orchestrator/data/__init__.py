"""Training data: what the loop asks of a data source, and the sources.

The loop needs one thing: an iterator of this data-parallel rank's
micro-batches, each ``(inputs, labels)`` of shape ``(micro_batch, seq_len)``
(labels are the inputs shifted by one token, ``IGNORE_INDEX`` where no loss
is taken), plus ``state_dict`` / ``load_state_dict`` for the position, so a
resumed run continues with exactly the next batch.

Sample order (Megatron's): optimiser step ``t`` consumes global samples
``[t*G, (t+1)*G)``; within it micro-batch ``m`` is the slice
``[m*mb*dp, (m+1)*mb*dp)``, of which dp rank ``r`` takes ``[r*mb, (r+1)*mb)``.
So the dp ranks never overlap, together cover the global batch, and every
layout sees the same samples in the same step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]
IGNORE_INDEX = -100


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


class SampleSource:
    """A ``MicroBatchSource`` over any indexable sample space.

    Subclasses define ``sample(k)``: the ``seq_len + 1`` tokens of global
    sample ``k`` and, optionally, a mask of the tokens that carry loss.
    """

    def __init__(self, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> None:
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_per_step = global_batch // (micro_batch * dp_size)
        self.position = 0  # micro-batches of this rank already handed out

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def micro_batch_at(self, position: int) -> Batch:
        step, micro = divmod(position, self.micro_per_step)
        indices = sample_indices(
            step,
            micro,
            global_batch=self.global_batch,
            micro_batch=self.micro_batch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        inputs, labels = [], []
        for k in indices:
            tokens, mask = self.sample(k)
            target = torch.from_numpy(np.asarray(tokens[1:], dtype=np.int64))
            if mask is not None:
                target[~torch.from_numpy(np.asarray(mask[1:], dtype=bool))] = IGNORE_INDEX
            inputs.append(torch.from_numpy(np.asarray(tokens[:-1], dtype=np.int64)))
            labels.append(target)
        return torch.stack(inputs), torch.stack(labels)  # (mb, S) each

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.micro_batch_at(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
