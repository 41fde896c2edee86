"""Seeded random token sequences: a data source that needs no files.

Sample ``k`` is drawn from a generator seeded by ``(seed, k)``, so any rank
can produce any sample without coordination. With ``num_samples > 0`` the
stream repeats every ``num_samples`` samples (a model can then memorise it).
"""

from __future__ import annotations

import numpy as np

from orchestrator.data import SampleSource


class SyntheticData(SampleSource):
    """This dp rank's micro-batches of random tokens (see ``orchestrator.data``)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        seed: int,
        num_samples: int = 0,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        super().__init__(
            global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
        )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_samples = num_samples

    def sample(self, index: int) -> tuple[np.ndarray, None]:
        if self.num_samples:
            index %= self.num_samples
        gen = np.random.default_rng([self.seed, index])
        return gen.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64), None
