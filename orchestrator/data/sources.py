"""Pre-training data: a weighted blend of sources of indexed shards, train and validation.

The indexes are built once for the whole run (``orchestrator.data.run_index``)
and opened lazily: a rank that never asks for a batch (a middle pipeline
stage) maps nothing. Micro-batches are built a step ahead in a background
thread (``orchestrator.data.prefetch``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from orchestrator.data import Batch, SampleSource
from orchestrator.data.prefetch import Prefetcher
from orchestrator.data.run_index import BlendedSamples, RunIndex

log = logging.getLogger("orchestrator.data.sources")


class BlendedSource(SampleSource):
    """Samples of one split of a built run index, in exact proportion to the source weights."""

    def __init__(
        self,
        folder: Path,
        split: str,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        super().__init__(
            global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
        )
        self.folder = folder
        self.split = split
        self._samples: BlendedSamples | None = None
        self._wrapped = False
        # one step ahead, and the step after it started
        self._prefetch = Prefetcher(self.micro_batch_at, depth=min(256, 2 * self.micro_per_step))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self._prefetch.get(self.position)
            self.position += 1
            yield batch

    @property
    def samples(self) -> BlendedSamples:
        if self._samples is None:
            self._samples = RunIndex(self.folder).split(self.split)
            log.info("data: reading the %s samples of %s", self.split, self.folder)
        return self._samples

    def sample(self, index: int) -> tuple[np.ndarray, None]:
        samples = self.samples
        if index >= samples.num_samples:
            # Only past the planned run (rollbacks move the data forward): start over.
            if not self._wrapped:
                log.warning(
                    "data: sample %d is past the %d the %s index was built for; "
                    "reading it from the start again",
                    index,
                    samples.num_samples,
                    self.split,
                )
                self._wrapped = True
            index %= samples.num_samples
        return samples[index], None
