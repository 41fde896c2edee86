"""Pre-training data: a weighted blend of indexed shards, split into train and validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from orchestrator.data import SampleSource
from orchestrator.data.blend import BlendedIndex, PackedDataset, split_documents
from orchestrator.data.indexed import IndexedDataset


@dataclass(frozen=True)
class ShardSpec:
    name: str
    prefix: str
    weight: float


def packed_splits(
    spec: ShardSpec, *, seq_len: int, valid_fraction: float, split_seed: int, seed: int
) -> tuple[PackedDataset, PackedDataset | None]:
    """The train and (when held out) validation samples of one shard."""
    shard = IndexedDataset(spec.prefix)
    train_docs, valid_docs = split_documents(
        len(shard), valid_fraction=valid_fraction, seed=split_seed
    )
    train = PackedDataset(shard, train_docs, seq_len=seq_len, seed=seed)
    valid = (
        PackedDataset(shard, valid_docs, seq_len=seq_len, seed=seed) if len(valid_docs) else None
    )
    return train, valid


class BlendedSource(SampleSource):
    """Samples drawn from several packed datasets in exact proportion to their weights."""

    def __init__(
        self,
        datasets: Sequence[PackedDataset],
        weights: Sequence[float],
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        super().__init__(
            global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
        )
        self.datasets = list(datasets)
        self.index = BlendedIndex(weights)

    def sample(self, index: int) -> tuple[np.ndarray, None]:
        dataset, sample = self.index[index]
        return self.datasets[dataset][sample], None
