"""Shards in Megatron's format, whole-run indexes and the blend: exact proportions,
sources of many shards, no overlap between data-parallel ranks, the cache, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.data import doc_order, megatron_helpers, sample_indices
from orchestrator.data import run_index as run_index_module
from orchestrator.data.blend import Blend, blend_period, integer_weights
from orchestrator.data.indexed import (
    LEGACY_MAGIC,
    IndexedDataset,
    IndexedDatasetWriter,
    convert,
    shard_paths,
)
from orchestrator.data.packing import SampleOrder
from orchestrator.data.run_index import (
    CorruptIndex,
    IndexSpec,
    RunIndex,
    SourceSpec,
    cache_key,
    ensure_index,
)
from orchestrator.data.shards import check_shard, expand_source
from orchestrator.data.sources import BlendedSource

LLAMA_WEIGHTS = [67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]
REPO = Path(__file__).resolve().parents[1]


def _documents(num_docs: int, seed: int, *, base: int = 3, span: int = 997) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(base, base + span, int(rng.integers(1, 60))) for _ in range(num_docs)]


def _shard(prefix: Path, docs: list[np.ndarray], vocab: int = 1000) -> str:
    writer = IndexedDatasetWriter(prefix, vocab_size=vocab)
    for doc in docs:
        writer.add_document(doc)
    writer.finish()
    return str(prefix)


def _spec(sources: list[SourceSpec], **overrides: object) -> IndexSpec:
    fields: dict[str, object] = dict(
        seq_len=16, seed=5, split_seed=9, valid_fraction=0.1, num_train_samples=600
    )
    fields.update(num_valid_samples=40)
    fields.update(overrides)
    return IndexSpec(sources=tuple(sources), **fields)  # type: ignore[arg-type]


def _two_sources(tmp_path: Path) -> list[SourceSpec]:
    a = _shard(tmp_path / "a", _documents(120, 1))
    b = _shard(tmp_path / "b", _documents(80, 2))
    return [SourceSpec("a", 3.0, (a,)), SourceSpec("b", 1.0, (b,))]


# --- Megatron's indexed format ---------------------------------------------------------------


def test_megatron_shards_and_ours_read_the_same_tokens(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [*_documents(50, 3, span=31000), np.zeros(0, dtype=np.int64)]
    builder = IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "meg.idx"))
    _shard(tmp_path / "ours", docs, vocab=32000)
    ours, theirs = IndexedDataset(tmp_path / "meg"), MegatronDataset(str(tmp_path / "ours"))
    assert len(ours) == len(theirs) == len(docs)
    for i, doc in enumerate(docs):
        assert np.array_equal(ours[i], doc) and np.array_equal(theirs[i], doc)
    for suffix in (".bin", ".idx"):  # byte for byte what Megatron writes
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"meg{suffix}").read_bytes()
    assert ours.num_tokens == sum(len(d) for d in docs)


def test_int32_shards_for_large_vocabularies(tmp_path: Path) -> None:
    docs = _documents(10, 4, base=100_000, span=28_000)
    shard = IndexedDataset(_shard(tmp_path / "big", docs, vocab=128_256))
    assert shard.dtype == np.int32
    assert all(np.array_equal(shard[i], d) for i, d in enumerate(docs))


def _legacy_shard(prefix: Path, docs: list[np.ndarray]) -> None:
    """The project's earlier format: LLMIDX magic, uint16 code 1, count, token offsets."""
    offsets = np.zeros(len(docs) + 1, dtype="<i8")
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    bin_path, idx_path = shard_paths(prefix)
    bin_path.write_bytes(np.concatenate(docs).astype(np.uint16).tobytes())
    idx_path.write_bytes(
        LEGACY_MAGIC + bytes([1]) + len(docs).to_bytes(8, "little") + offsets.tobytes()
    )


def test_earlier_shards_are_read_and_converted(tmp_path: Path) -> None:
    docs = _documents(30, 5)
    _legacy_shard(tmp_path / "old", docs)
    assert [d.tolist() for d in IndexedDataset(tmp_path / "old")] == [d.tolist() for d in docs]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.data.indexed",
            "convert",
            str(tmp_path / "old"),
            str(tmp_path / "new"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new.idx").read_bytes().startswith(b"MMIDIDX\x00\x00")
    new = IndexedDataset(tmp_path / "new")
    assert [d.tolist() for d in new] == [d.tolist() for d in docs]
    assert convert(tmp_path / "old", tmp_path / "old") == len(docs)  # in place
    assert (tmp_path / "old.idx").read_bytes() == (tmp_path / "new.idx").read_bytes()


def test_truncated_index_is_refused(tmp_path: Path) -> None:
    prefix = _shard(tmp_path / "t", _documents(20, 6))
    _, idx = shard_paths(prefix)
    idx.write_bytes(idx.read_bytes()[:-9])
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(prefix)


# --- the blend ------------------------------------------------------------------------------


def _prefix_deviation(dataset: np.ndarray, weights: np.ndarray) -> float:
    """The largest |count_d - w_d n| over every prefix n of a blend."""
    counts = np.zeros((len(dataset), len(weights)))
    counts[np.arange(len(dataset)), dataset] = 1
    counts = np.cumsum(counts, axis=0)
    return float(np.abs(counts - np.outer(np.arange(1, len(dataset) + 1), weights)).max())


def test_blend_hits_the_llama_weights_at_every_prefix(tmp_path: Path) -> None:
    sources = [
        SourceSpec(f"s{i}", w, (_shard(tmp_path / f"s{i}", _documents(40, i)),))
        for i, w in enumerate(LLAMA_WEIGHTS)
    ]
    n = 5000
    index = RunIndex(ensure_index(_spec(sources, num_train_samples=n), tmp_path / "cache"))
    blend = index.split("train").blend
    assert blend is not None and blend.q == 200  # one period stored, not n samples
    dataset, sample = blend.arrays(n)
    pairs = list(zip(dataset.tolist(), sample.tolist(), strict=True))
    assert [blend.locate(k) for k in range(n)] == pairs
    assert blend.counts(n).tolist() == np.bincount(dataset).tolist()
    weights = np.asarray(LLAMA_WEIGHTS) / sum(LLAMA_WEIGHTS)
    assert _prefix_deviation(dataset, weights) < 1.0
    assert np.bincount(dataset[:1000]).tolist() == [670, 150, 45, 45, 45, 25, 20]
    for d in range(len(weights)):  # each source's samples are taken in order 0, 1, 2, ...
        assert np.array_equal(sample[dataset == d], np.arange((dataset == d).sum()))
    # the rule, argmax(w * (i + 1) - count) in exact fractions (lowest index on a tie)
    exact = [Fraction(w) / Fraction(sum(LLAMA_WEIGHTS)) for w in LLAMA_WEIGHTS]
    counts = [0] * len(exact)
    for i in range(n):
        behind = [w * (i + 1) - c for w, c in zip(exact, counts, strict=True)]
        d = behind.index(max(behind))
        assert dataset[i] == d, i
        counts[d] += 1
    # Megatron's rule aims at w * max(i, 1): a sample behind, and past one sample on these
    theirs, theirs_sample = np.empty(n, np.int16), np.empty(n, np.int64)
    megatron_helpers.helpers().build_blending_indices(
        theirs, theirs_sample, weights, len(weights), n, False
    )
    assert _prefix_deviation(theirs, weights) > 1.0


@pytest.mark.parametrize("seed", range(6))
def test_blend_of_random_weights_stays_within_one_sample(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.01, 10, int(rng.integers(2, 12))).round(int(rng.integers(1, 4)))
    integers = integer_weights(list(raw))
    assert np.allclose(np.asarray(integers) / sum(integers), raw / raw.sum())
    n = 3 * sum(integers) + 7  # several periods and a part
    dataset, sample = Blend.of(list(raw)).arrays(n)
    assert _prefix_deviation(dataset, raw / raw.sum()) <= 1.0 + 1e-9
    for d in range(len(raw)):
        assert np.array_equal(sample[dataset == d], np.arange((dataset == d).sum()))
    # the spelled-out blend is one period repeated
    period = blend_period(integers)
    assert np.array_equal(dataset, np.tile(period, 4)[:n])


def test_bad_weights() -> None:
    with pytest.raises(ValueError, match="blend weights"):
        integer_weights([])
    with pytest.raises(ValueError, match="blend weights"):
        integer_weights([1.0, -1.0])


def test_sample_index_is_megatrons(tmp_path: Path) -> None:
    from megatron.core.datasets.helpers import build_sample_idx  # megatron-core's own import

    rng = np.random.default_rng(0)
    for _ in range(10):
        sizes = rng.integers(0, 300, int(rng.integers(5, 2000))).astype(np.int32)
        sizes[0] = 1
        doc = rng.permutation(len(sizes)).astype(np.int32)
        seq_len, tokens = int(rng.integers(2, 200)), int(sizes.sum())
        if tokens <= seq_len + 1:
            continue
        theirs = build_sample_idx(sizes, doc, seq_len, 1, tokens, True, True)
        num_samples = (tokens - 1) // seq_len
        ours = megatron_helpers.build_sample_idx(
            sizes, doc, seq_len=seq_len, num_samples=num_samples
        )
        assert np.array_equal(ours, theirs)
        part = int(rng.integers(0, num_samples))
        cut = megatron_helpers.build_sample_idx(sizes, doc, seq_len=seq_len, num_samples=part)
        assert np.array_equal(cut, theirs[: part + 1])


def _reference_stream(index: RunIndex, split: str, slot: int, source: SourceSpec) -> np.ndarray:
    """The source's tokens in its document order, concatenated (dense reference)."""
    documents = [d for prefix in source.shards for d in IndexedDataset(prefix)]
    return np.concatenate([documents[int(g)] for g in index.document_order(split, slot)])


def test_samples_pack_documents_across_boundaries(tmp_path: Path) -> None:
    sources = _two_sources(tmp_path)
    index = RunIndex(ensure_index(_spec(sources, num_train_samples=1500), tmp_path / "cache"))
    samples = index.split("train")
    streams = [_reference_stream(index, "train", i, s) for i, s in enumerate(sources)]
    assert samples.blend is not None
    seq = 16
    for k in range(samples.num_samples):
        d, s = samples.blend.locate(k)
        j = samples.orders[d][s]
        assert np.array_equal(samples[k], streams[d][j * seq : j * seq + seq + 1]), k
    # every epoch is a permutation of the source's training documents
    for i, source in enumerate(sources):
        num_docs = len(IndexedDataset(source.shards[0]))
        order = index.document_order("train", i)
        rng = run_index_module._seed(9, source.name, run_index_module._KIND_SPLIT, 0)
        valid = doc_order.held_out_documents(num_docs, 0.1, rng)
        train_docs = np.setdiff1d(np.arange(num_docs), valid)
        assert len(valid) == round(num_docs * 0.1)
        assert np.isin(index.document_order("valid", i), valid).all()  # validation reads only those
        whole = len(order) // len(train_docs)
        assert whole >= 2  # the run needs several epochs of these small sources
        for e in range(whole):
            epoch = order[e * len(train_docs) : (e + 1) * len(train_docs)]
            assert np.array_equal(np.sort(epoch), train_docs)
        assert not np.array_equal(
            order[: len(train_docs)], order[len(train_docs) : 2 * len(train_docs)]
        )


@pytest.mark.parametrize("n", [1, 5, 16, 100, 4099])
def test_an_epoch_is_a_permutation_of_runs_of_documents(n: int) -> None:
    run = doc_order.DOC_RUN
    order = np.empty(n, dtype=np.int32)
    doc_order.epoch_order(n, np.random.default_rng(3), out=order)
    assert np.array_equal(np.sort(order), np.arange(n))
    # cut where a run ends in the order: each piece is one whole run, in some order
    runs_in_order = order // run
    pieces = np.split(order, np.flatnonzero(np.diff(runs_in_order)) + 1)
    assert len(pieces) == -(-n // run)
    for piece in pieces:
        first = int(piece.min()) // run * run
        assert np.array_equal(np.sort(piece), np.arange(first, min(first + run, n)))
    if n >= 100:  # the runs are shuffled, and so are the documents inside them
        assert not np.array_equal(np.sort(runs_in_order), runs_in_order)
        assert sum(not np.array_equal(np.sort(x), x) for x in pieces) > len(pieces) // 2
        again = np.empty(n, dtype=np.int32)
        doc_order.epoch_order(n, np.random.default_rng(4), out=again)
        assert not np.array_equal(order, again)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3])
def test_split_documents_map_positions_to_numbers(fraction: float) -> None:
    n = 1000
    held = doc_order.held_out_documents(n, fraction, np.random.default_rng(0))
    gaps = held - np.arange(len(held), dtype=np.int32)
    train = np.setdiff1d(np.arange(n), held)
    for valid, numbers in ((False, train), (True, held)):
        members = doc_order.SplitDocuments(gaps, valid=valid)
        assert np.array_equal(members.numbers(np.arange(len(numbers))), numbers)
        assert [members.number(p) for p in range(len(numbers))] == numbers.tolist()


def test_samples_are_read_in_a_seeded_order_within_blocks() -> None:
    order = SampleOrder(1000, seed=1, name="cc", block=300)
    seen = [order[j] for j in range(1000)]
    for start in (0, 300, 600, 900):  # a permutation of each block, the last one partial
        block = seen[start : start + 300]
        assert sorted(block) == list(range(start, min(start + 300, 1000)))
        assert block != sorted(block)
    assert seen == [SampleOrder(1000, seed=1, name="cc", block=300)[j] for j in range(1000)]
    assert seen != [SampleOrder(1000, seed=2, name="cc", block=300)[j] for j in range(1000)]
    longer = SampleOrder(1200, seed=1, name="cc", block=300)  # a longer run keeps full blocks
    assert [longer[j] for j in range(900)] == seen[:900]
    assert SampleOrder(1, seed=1, name="x")[0] == 0
    with pytest.raises(IndexError):
        order[1000]


def test_a_source_of_several_shards_reads_them_by_token_share(tmp_path: Path) -> None:
    # shard s holds token ids [100 s, 100 s + 100): a sample's tokens say where they came from
    sizes = [(60, 1), (120, 2), (300, 3)]
    shards = tuple(
        _shard(tmp_path / f"part-{s}", _documents(n, seed, base=100 * s, span=100))
        for s, (n, seed) in enumerate(sizes)
    )
    source = SourceSpec("cc", 1.0, shards)
    assert expand_source("part-*", tmp_path, field="f") == list(shards)
    tokens = np.array([IndexedDataset(p).num_tokens for p in shards], dtype=np.float64)
    per_epoch = (int(tokens.sum()) - 1) // 16  # all of one epoch
    spec = _spec([source], valid_fraction=0.0, num_train_samples=per_epoch, num_valid_samples=0)
    samples = RunIndex(ensure_index(spec, tmp_path / "cache")).split("train")
    seen = np.bincount(
        np.concatenate([samples[k][:-1] // 100 for k in range(samples.num_samples)]), minlength=3
    )
    # one epoch: every token of every shard exactly once, bar the last partial sample
    assert np.all(np.abs(seen - tokens) < 16), (seen, tokens)
    assert seen.sum() == per_epoch * 16
    first = np.bincount(np.concatenate([samples[k] // 100 for k in range(60)]), minlength=3)
    assert np.all(first > 0)  # shards interleave from the start, not one after another


# --- data-parallel ranks and resume ---------------------------------------------------------


def _source(folder: Path, *, dp_rank: int, dp_size: int, split: str = "train") -> BlendedSource:
    return BlendedSource(
        folder, split, global_batch=8, micro_batch=2, dp_rank=dp_rank, dp_size=dp_size
    )


def test_dp_ranks_split_the_global_batch_without_overlap(tmp_path: Path) -> None:
    folder = ensure_index(_spec(_two_sources(tmp_path)), tmp_path / "cache")
    whole = iter(_source(folder, dp_rank=0, dp_size=1))
    ranks = [iter(_source(folder, dp_rank=r, dp_size=2)) for r in range(2)]
    for _step in range(3):
        reference = torch.cat([next(whole)[0] for _ in range(4)])  # 4 micro-batches of 2
        per_rank = [torch.cat([next(it)[0] for _ in range(2)]) for it in ranks]  # 2 each
        rows = {tuple(r.tolist()) for r in torch.cat(per_rank)}
        assert len(rows) == 8  # no sample twice in a step
        assert rows == {tuple(r.tolist()) for r in reference}  # together: the global batch
    got = [
        list(sample_indices(0, m, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2))
        for m in range(2)
        for r in range(2)
    ]
    assert sorted(i for g in got for i in g) == list(range(8))


@pytest.mark.timeout(120)
def test_resume_at_a_late_step_gives_the_same_next_batch(tmp_path: Path) -> None:
    steps = 30_000  # dp rank 1 of 2: one micro-batch of 2 per step of 4 samples
    spec = _spec(_two_sources(tmp_path), num_train_samples=(steps + 2) * 4)
    folder = ensure_index(spec, tmp_path / "cache")

    def source() -> BlendedSource:
        return BlendedSource(folder, "train", global_batch=4, micro_batch=2, dp_rank=1, dp_size=2)

    straight = iter(source())
    for _ in range(steps):
        next(straight)
    resumed = source()
    resumed.load_state_dict({"position": steps})
    (a_in, a_lab), (b_in, b_lab) = next(iter(resumed)), next(straight)
    assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)
    assert torch.equal(a_in[:, 1:], a_lab[:, :-1])  # labels: inputs shifted by one


def test_a_source_opens_nothing_until_asked_for_a_batch(tmp_path: Path) -> None:
    folder = ensure_index(_spec(_two_sources(tmp_path)), tmp_path / "cache")
    source = _source(folder, dp_rank=0, dp_size=1)
    batches = iter(source)
    source.load_state_dict({"position": 3})
    assert source.state_dict() == {"position": 3}
    assert source._samples is None  # a middle pipeline stage never gets further
    next(batches)
    assert source._samples is not None


# --- the cache ------------------------------------------------------------------------------


def test_cache_is_found_again_and_rebuilt_when_a_shard_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = _two_sources(tmp_path)
    first = ensure_index(_spec(sources), tmp_path / "cache")
    built: list[Path] = []
    real_build = run_index_module._build
    monkeypatch.setattr(
        run_index_module,
        "_build",
        lambda spec, folder: built.append(folder) or real_build(spec, folder),
    )
    assert ensure_index(_spec(sources), tmp_path / "cache") == first and not built  # a hit
    assert cache_key(_spec(sources, seq_len=8)) != cache_key(_spec(sources))
    assert cache_key(_spec(sources, num_train_samples=601)) != cache_key(_spec(sources))
    _shard(Path(sources[1].shards[0]), _documents(80, 99))  # re-made with other documents
    second = ensure_index(_spec(sources), tmp_path / "cache")
    assert second != first and len(built) == 1
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_a_truncated_cache_file_is_never_used(tmp_path: Path) -> None:
    spec = _spec(_two_sources(tmp_path))
    folder = ensure_index(spec, tmp_path / "cache")
    good = RunIndex(folder).split("train")[7].copy()
    victim = folder / "train_0_sample.npy"
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(CorruptIndex, match="train_0_sample.npy"):
        RunIndex(folder)
    assert ensure_index(spec, tmp_path / "cache") == folder  # rebuilt in place of the damaged one
    assert np.array_equal(RunIndex(folder).split("train")[7], good)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["train_0_sample"]["bytes"] == victim.stat().st_size


def test_an_interrupted_build_leaves_nothing_that_looks_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(_two_sources(tmp_path))

    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_index_module.megatron_helpers, "build_sample_idx", fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_index(spec, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


# --- checks at the entry point --------------------------------------------------------------


def test_source_folders_and_globs_are_checked(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"f=empty: the folder .* holds no shard"):
        expand_source("empty", tmp_path, field="f")
    with pytest.raises(ValueError, match=r"f=nothing/\*: the glob .* matches no shard"):
        expand_source("nothing/*", tmp_path, field="f")
    _shard(tmp_path / "dir" / "x", _documents(3, 1))
    (tmp_path / "dir" / "y.bin.tmp").write_bytes(b"")  # an unfinished shard does not count
    assert expand_source("dir", tmp_path, field="f") == [str(tmp_path / "dir" / "x")]
    wide = _shard(tmp_path / "wide", _documents(3, 1, base=70_000, span=10), vocab=128_000)
    with pytest.raises(ValueError, match="int32 tokens, as made for a vocabulary over 65,500"):
        check_shard(wide, vocab_size=32_000, field="f")
    narrow = _shard(tmp_path / "narrow", _documents(3, 1, base=900, span=50), vocab=1000)
    with pytest.raises(ValueError, match="token id 9.., outside the tokenizer's vocabulary of 900"):
        check_shard(narrow, vocab_size=900, field="f")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("empty_dir", "data.sources[0].prefix=empty_dir: the folder"),
        ("none/*", "data.sources[0].prefix=none/*: the glob"),
        ("wide", "data.sources[0].prefix: shard"),
    ],
)
@pytest.mark.timeout(120)
def test_bad_sources_stop_the_launch_with_one_line(
    tmp_path: Path, prefix: str, message: str
) -> None:
    (tmp_path / "empty_dir").mkdir()
    _shard(tmp_path / "wide", _documents(3, 1, base=70_000, span=10), vocab=128_000)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "run.py"),
            "model=tiny",
            f"data.root={tmp_path}",
            f"data.sources=[{{name: a, prefix: '{prefix}', weight: 1}}]",
            f"run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=100,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
def test_prepare_builds_the_index_the_run_finds(tmp_path: Path) -> None:
    overrides = ["model=tiny", "train.steps=30", f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.data.prepare", *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.split("data index: ")[1].split()[0])
    assert folder.parent == tmp_path / "cache" and (folder / "manifest.json").is_file()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["spec"]["num_train_samples"] == (30 + 1) * 8  # steps (+1%) x global batch
    assert manifest["splits"]["valid"]["num_samples"] == 4 * 8  # eval_iters x global batch


def test_prefetched_batches_are_the_batches_across_jumps(tmp_path: Path) -> None:
    folder = ensure_index(_spec(_two_sources(tmp_path)), tmp_path / "cache")
    plain = _source(folder, dp_rank=1, dp_size=2)
    expected = [plain.micro_batch_at(p) for p in range(40)]
    source = _source(folder, dp_rank=1, dp_size=2)
    seen = []
    for jump in (0, 7, 3, 20):  # resumes, rollbacks, validation starting over
        source.load_state_dict({"position": jump})
        batches = iter(source)
        seen.append([(jump + i, next(batches)) for i in range(12)])
    for run in seen:
        for position, (inputs, labels) in run:
            assert torch.equal(inputs, expected[position][0]), position
            assert torch.equal(labels, expected[position][1]), position
    assert source.state_dict() == {"position": 32}


def test_a_failing_read_is_raised_in_the_loop(tmp_path: Path) -> None:
    folder = ensure_index(_spec(_two_sources(tmp_path)), tmp_path / "cache")
    source = _source(folder, dp_rank=0, dp_size=1)

    def broken(position: int) -> object:
        raise OSError(f"cannot read position {position}")

    source._prefetch.build = broken  # type: ignore[assignment]
    with pytest.raises(OSError, match="cannot read position 0"):
        next(iter(source))


def test_a_source_of_more_shards_than_the_open_file_limit(tmp_path: Path) -> None:
    import resource

    shards = tuple(_shard(tmp_path / f"s{i:03d}", _documents(2, i)) for i in range(300))
    spec = _spec([SourceSpec("many", 1.0, shards)], valid_fraction=0.0, num_valid_samples=0)
    folder = ensure_index(spec, tmp_path / "cache")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # 300 shards need 600
    try:
        samples = RunIndex(folder).split("train")
        for k in range(samples.num_samples):
            samples[k]
        reader = samples.readers[0]
        for shard in range(300):  # every shard open at once
            assert np.array_equal(
                reader.document(int(reader.starts[shard])), IndexedDataset(shards[shard])[0]
            )
        assert len(reader._open) == 300
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 256 + 600
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
