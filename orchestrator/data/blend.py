"""Packed sequences over indexed shards, and their blend by weights.

``PackedDataset``: a shard's documents (train or validation split) in a
seeded order per epoch, concatenated and cut into samples of ``seq_len + 1``
tokens across document boundaries (consecutive samples share one token, as
in Megatron: sample ``j`` starts at token ``j * seq_len``).

``BlendedIndex``: Megatron's blending index. Sample ``i`` of the blend comes
from the dataset whose share is furthest behind its weight,
``argmax_d(w_d * (i + 1) - count_d)``, so after any ``n`` samples every
dataset has had within one sample of ``w_d * n``: exact proportions, no
random drift. It is built incrementally as the run advances.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from orchestrator.data.indexed import IndexedDataset


def split_documents(
    num_docs: int, *, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document ids: a seeded permutation's head is held out."""
    order = np.random.default_rng(seed).permutation(num_docs)
    num_valid = int(round(num_docs * valid_fraction))
    if valid_fraction > 0 and num_docs > 1:
        num_valid = max(num_valid, 1)
    return np.sort(order[num_valid:]), np.sort(order[:num_valid])


class PackedDataset:
    """Samples of ``seq_len + 1`` tokens packed from ``docs`` of ``shard``; endless over epochs."""

    def __init__(self, shard: IndexedDataset, docs: np.ndarray, *, seq_len: int, seed: int) -> None:
        self.shard = shard
        self.docs = np.asarray(docs, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        num_tokens = int(shard.doc_lengths[self.docs].sum())
        self.samples_per_epoch = (num_tokens - 1) // seq_len
        if self.samples_per_epoch < 1:
            raise ValueError(
                f"{shard.prefix}: {num_tokens} tokens in {len(self.docs)} documents "
                f"are fewer than one sample of seq_len + 1 = {seq_len + 1}"
            )

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs per dataset
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token ends) of one epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.docs)
        return order, np.cumsum(self.shard.doc_lengths[order])

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, j = divmod(index, self.samples_per_epoch)
        order, ends = self._epoch(epoch)
        start, stop = j * self.seq_len, j * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(ends, start, side="right"))
        parts, pos = [], start
        doc = first
        while pos < stop:
            doc_start = int(ends[doc - 1]) if doc else 0
            tokens = self.shard[int(order[doc])]
            take = tokens[pos - doc_start : min(stop, int(ends[doc])) - doc_start]
            parts.append(take)
            pos += len(take)
            doc += 1
        return np.concatenate(parts).astype(np.int64)


class BlendedIndex:
    """Which dataset, and which of its samples, is sample ``i`` of the blend."""

    def __init__(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"blend weights {list(weights)}: need one or more, >= 0, sum > 0")
        self.weights = w / w.sum()
        self._dataset = np.zeros(0, dtype=np.int16)
        self._sample = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(len(w), dtype=np.int64)

    def _extend(self, size: int) -> None:
        start = len(self._dataset)
        datasets = np.empty(size - start, dtype=np.int16)
        samples = np.empty(size - start, dtype=np.int64)
        counts, weights = self._counts, self.weights
        for i in range(start, size):
            d = int(np.argmax(weights * (i + 1) - counts))
            datasets[i - start] = d
            samples[i - start] = counts[d]
            counts[d] += 1
        self._dataset = np.concatenate([self._dataset, datasets])
        self._sample = np.concatenate([self._sample, samples])

    def __getitem__(self, i: int) -> tuple[int, int]:
        if i >= len(self._dataset):
            self._extend(max(i + 1, 2 * len(self._dataset), 1024))
        return int(self._dataset[i]), int(self._sample[i])

    def counts(self, n: int) -> np.ndarray:
        """Samples of each dataset among the first ``n``."""
        self[n - 1]
        return np.bincount(self._dataset[:n], minlength=len(self.weights))
