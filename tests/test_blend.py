"""Packing, blending and sampling of indexed shards: exact proportions, no
overlap between data-parallel ranks, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.data import sample_indices
from orchestrator.data.blend import BlendedIndex, PackedDataset, split_documents
from orchestrator.data.indexed import IndexedDataset, IndexedDatasetWriter
from orchestrator.data.sources import BlendedSource

LLAMA_WEIGHTS = [67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]


def _shard(path: Path, num_docs: int, seed: int, vocab: int = 1000) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(path, vocab_size=vocab)
    for _ in range(num_docs):
        writer.add_document(rng.integers(3, vocab, int(rng.integers(1, 60))))
    writer.finish()
    return IndexedDataset(path)


def test_blend_hits_the_llama_weights_exactly() -> None:
    index = BlendedIndex(LLAMA_WEIGHTS)
    weights = np.asarray(LLAMA_WEIGHTS) / sum(LLAMA_WEIGHTS)
    # 1000 samples: every share is a whole number, and the blend hits it exactly.
    assert index.counts(1000).tolist() == [670, 150, 45, 45, 45, 25, 20]
    # and never drifts by a whole sample on the way (Megatron's guarantee)
    for n in range(1, 5001, 7):
        assert np.all(np.abs(index.counts(n) - weights * n) < 1.0), n
    # each dataset's samples are taken in order 0, 1, 2, ...
    seen = {d: -1 for d in range(len(LLAMA_WEIGHTS))}
    for i in range(2000):
        d, s = index[i]
        assert s == seen[d] + 1
        seen[d] = s


def test_bad_weights() -> None:
    with pytest.raises(ValueError, match="blend weights"):
        BlendedIndex([])
    with pytest.raises(ValueError, match="blend weights"):
        BlendedIndex([1.0, -1.0])


def test_split_is_disjoint_and_complete() -> None:
    train, valid = split_documents(1000, valid_fraction=0.05, seed=3)
    assert len(valid) == 50
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(1000))
    again_train, again_valid = split_documents(1000, valid_fraction=0.05, seed=3)
    assert np.array_equal(valid, again_valid) and np.array_equal(train, again_train)


def test_packing_concatenates_documents_across_boundaries(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "a", 200, seed=1)
    docs = np.arange(len(shard))
    seq_len = 16
    packed = PackedDataset(shard, docs, seq_len=seq_len, seed=7)
    order, _ = packed._epoch(0)
    stream = np.concatenate([shard[int(d)] for d in order])
    for j in range(packed.samples_per_epoch):
        sample = packed[j]
        assert len(sample) == seq_len + 1
        assert np.array_equal(sample, stream[j * seq_len : j * seq_len + seq_len + 1])
    # the next epoch is another order of the same documents
    assert not np.array_equal(packed[packed.samples_per_epoch], packed[0])


def _source(shards: list[IndexedDataset], *, dp_rank: int, dp_size: int) -> BlendedSource:
    packed = [PackedDataset(s, np.arange(len(s)), seq_len=8, seed=5) for s in shards]
    return BlendedSource(
        packed, [3.0, 1.0], global_batch=8, micro_batch=2, dp_rank=dp_rank, dp_size=dp_size
    )


def test_dp_ranks_split_the_global_batch_without_overlap(tmp_path: Path) -> None:
    shards = [_shard(tmp_path / "a", 100, seed=1), _shard(tmp_path / "b", 100, seed=2)]
    whole = iter(_source(shards, dp_rank=0, dp_size=1))
    ranks = [iter(_source(shards, dp_rank=r, dp_size=2)) for r in range(2)]
    for _step in range(3):
        reference = torch.cat([next(whole)[0] for _ in range(4)])  # 4 micro-batches of 2
        per_rank = [torch.cat([next(it)[0] for _ in range(2)]) for it in ranks]  # 2 each
        rows = {tuple(r.tolist()) for r in torch.cat(per_rank)}
        assert len(rows) == 8  # no sample twice in a step
        assert rows == {tuple(r.tolist()) for r in reference}  # together: the global batch
        assert not {tuple(r.tolist()) for r in per_rank[0]} & {
            tuple(r.tolist()) for r in per_rank[1]
        }
    # the index arithmetic itself
    got = [
        list(sample_indices(0, m, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2))
        for m in range(2)
        for r in range(2)
    ]
    assert sorted(i for g in got for i in g) == list(range(8))


def test_resumed_sampler_yields_the_same_next_batch(tmp_path: Path) -> None:
    shards = [_shard(tmp_path / "a", 100, seed=1), _shard(tmp_path / "b", 100, seed=2)]
    straight = iter(_source(shards, dp_rank=1, dp_size=2))
    first = _source(shards, dp_rank=1, dp_size=2)
    it = iter(first)
    for _ in range(5):
        next(straight)
        next(it)
    state = first.state_dict()
    resumed = _source(shards, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert state == {"position": 5}
    (a_in, a_lab), (b_in, b_lab) = next(iter(resumed)), next(straight)
    assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)


def test_labels_are_inputs_shifted_by_one(tmp_path: Path) -> None:
    shards = [_shard(tmp_path / "a", 50, seed=1), _shard(tmp_path / "b", 50, seed=2)]
    inputs, labels = next(iter(_source(shards, dp_rank=0, dp_size=1)))
    assert inputs.shape == labels.shape == (2, 8)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
