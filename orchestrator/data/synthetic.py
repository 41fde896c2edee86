"""Seeded random token sequences: a data source that needs no files.

Sample ``k`` is drawn from a generator seeded by ``(seed, k)``, so any rank
can produce any sample without coordination. With ``num_samples > 0`` the
stream repeats every ``num_samples`` samples (a model can then memorise it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from orchestrator.data import Batch, sample_indices


class SyntheticData:
    """This dp rank's micro-batches of random tokens (see ``orchestrator.data``)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_samples: int = 0,
    ) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_samples = num_samples
        self.micro_per_step = global_batch // (micro_batch * dp_size)
        self.position = 0  # micro-batches of this rank already handed out

    def sample(self, index: int) -> torch.Tensor:
        if self.num_samples:
            index %= self.num_samples
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=gen)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            step, micro = divmod(self.position, self.micro_per_step)
            indices = sample_indices(
                step,
                micro,
                global_batch=self.global_batch,
                micro_batch=self.micro_batch,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
            )
            tokens = torch.stack([self.sample(i) for i in indices])  # (mb, S+1)
            self.position += 1
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
