"""Whole-run data indexes: built once by one process, memory-mapped by every rank.

For each source (a list of shards, its documents numbered across them in
shard order) and each split (train, validation), in the manner of
Megatron's ``GPTDataset``:

* ``doc``: the document order, epoch after epoch; each epoch is a seeded
  permutation of the split's documents (seeded per epoch, so a longer run
  keeps the shorter one's epochs) made of runs of ``DOC_RUN`` documents: the
  split's documents cut into runs of 16 consecutive ones, the runs in a
  uniformly random order, each run in one of 256 random orders of its own
  (see ``doc_order.epoch_order`` for why not a uniform permutation of documents);
* ``sample``: Megatron's sample index (megatron-core's C++ builder): row ``j``
  is (position in ``doc``, token offset) where sample ``j`` starts; samples
  are ``seq_len + 1`` tokens across document boundaries, consecutive ones
  sharing a token;
and, stored as nothing, the order samples are read in (``packing.SampleOrder``:
a seeded permutation within fixed blocks). For each split, the blend over
the sources (``orchestrator.data.blend``: every prefix within one sample of
the weights).

The split holds out ``valid_fraction`` of each source's documents (a seeded
choice); a document is in exactly one split.

Everything is sized for the whole run (``num_samples`` per split) and written
as ``.npy`` files into ``CACHE/<key>/``, where the key hashes everything the
indexes depend on: the format version, each shard's path, sizes and
modification time, ``seq_len``, the seeds, the weights, the held-out
fraction and the sample counts. A changed input is a new key. The folder is
built under a temporary name and renamed when complete, with ``manifest.json``
(every file's shape, dtype and size) written last: a partial build is never
seen, and a file whose size no longer matches the manifest is refused.
Reading sample ``k`` is O(1): a resumed run at any step starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data import megatron_helpers
from orchestrator.data.blend import Blend
from orchestrator.data.doc_order import DOC_RUN, SplitDocuments, epoch_order, held_out_documents
from orchestrator.data.indexed import IndexedDataset, shard_paths
from orchestrator.data.packing import SampleOrder

log = logging.getLogger("orchestrator.data.run_index")

FORMAT_VERSION = 3  # 2: the blend is stored as one period; 3: documents in runs
SPLITS = ("train", "valid")
_KIND_EPOCH, _KIND_SPLIT = 0, 2


@dataclass(frozen=True)
class SourceSpec:
    name: str
    weight: float
    shards: tuple[str, ...]  # absolute prefixes, in their order


@dataclass(frozen=True)
class IndexSpec:
    """Everything the indexes are a function of (besides the shards' contents)."""

    sources: tuple[SourceSpec, ...]
    seq_len: int
    seed: int
    split_seed: int
    valid_fraction: float
    num_train_samples: int
    num_valid_samples: int


class CorruptIndex(ValueError):
    """A cache folder whose files do not match its manifest."""


def cache_key(spec: IndexSpec) -> str:
    """The cache folder's name: a hash of the spec and of each shard's identity."""
    shards = []
    for source in spec.sources:
        for prefix in source.shards:
            bin_path, idx_path = shard_paths(prefix)
            idx, data = idx_path.stat(), bin_path.stat()
            shards.append([prefix, idx.st_size, data.st_size, idx.st_mtime_ns, data.st_mtime_ns])
    blob = json.dumps([FORMAT_VERSION, asdict(spec), shards], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def split_seed(seed: int, split: str) -> int:
    """The seed of a split's document orders and sample order (validation: ``seed + 1``)."""
    return seed + (split == "valid")


def _seed(spec_seed: int, name: str, kind: int, n: int) -> np.random.Generator:
    return np.random.default_rng([spec_seed, zlib.crc32(name.encode()), kind, n])


def ensure_index(spec: IndexSpec, cache_dir: Path) -> Path:
    """The folder of ``spec``'s indexes in ``cache_dir``, built first if missing or corrupt."""
    folder = cache_dir / cache_key(spec)
    if folder.is_dir():
        try:
            RunIndex(folder)
            log.info("found the data index %s", folder)
            return folder
        except CorruptIndex as e:
            log.warning("data index %s is damaged (%s): building it again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        _build(spec, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same index first
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built the data index %s in %.1fs", folder, time.perf_counter() - start)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _build(spec: IndexSpec, folder: Path) -> None:
    files: dict[str, dict[str, Any]] = {}

    def save(name: str, array: np.ndarray) -> None:
        path = folder / f"{name}.npy"
        with path.open("wb") as f:
            np.save(f, array, allow_pickle=False)
        files[name] = {
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "bytes": path.stat().st_size,
        }

    splits: dict[str, Any] = {}
    sizes_per_source, held_out = [], []
    for i, source in enumerate(spec.sources):
        starts, sizes = _source_sizes(source)
        save(f"shard_starts_{i}", starts)
        sizes_per_source.append(sizes)
        rng = _seed(spec.split_seed, source.name, _KIND_SPLIT, 0)
        held_out.append(held_out_documents(len(sizes), spec.valid_fraction, rng))
        save(f"held_out_gaps_{i}", held_out[-1] - np.arange(len(held_out[-1]), dtype=np.int32))
    for split, want in zip(SPLITS, (spec.num_train_samples, spec.num_valid_samples), strict=True):
        valid = split == "valid"
        in_split = [
            len(h) if valid else len(z) - len(h)
            for h, z in zip(held_out, sizes_per_source, strict=True)
        ]
        members = [i for i, docs in enumerate(in_split) if want and docs]
        splits[split] = {"sources": members, "num_samples": want if members else 0}
        if not members:
            continue
        weights = np.asarray([spec.sources[i].weight for i in members], dtype=np.float64)
        blend = Blend.of(list(weights))
        save(f"{split}_blend_period", blend.period)
        save(f"{split}_blend_rank", blend.rank)
        counts = blend.counts(want)
        for slot, i in enumerate(members):
            sizes = sizes_per_source[i]
            split_sizes = sizes[held_out[i]] if valid else np.delete(sizes, held_out[i])
            tag = f"{split}_{slot}"
            doc, sample_idx = _source_index(
                spec.sources[i].name,
                split_sizes,
                seq_len=spec.seq_len,
                num_samples=int(counts[slot]),
                seed=split_seed(spec.seed, split),
            )
            save(f"{tag}_doc", doc)
            save(f"{tag}_sample", sample_idx)
    manifest = {
        "version": FORMAT_VERSION,
        "spec": asdict(spec),
        "splits": splits,
        "files": files,
    }
    # synced at the end, not file by file: the kernel writes the early files back
    # while the later ones are computed, and the manifest is written only after all
    for name in files:
        fd = os.open(folder / f"{name}.npy", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    with (folder / "manifest.json").open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _source_sizes(source: SourceSpec) -> tuple[np.ndarray, np.ndarray]:
    """(first document number of each shard, then the total; every document's length)."""
    lengths = [IndexedDataset(prefix).lengths for prefix in source.shards]  # views of the maps
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lengths], out=starts[1:])
    if starts[-1] > np.iinfo(np.int32).max - DOC_RUN:  # positions in runs stay int32
        raise ValueError(f"source {source.name}: {starts[-1]:,} documents, more than 2^31 - 17")
    sizes = (
        np.concatenate(lengths).astype(np.int32, copy=False) if lengths else np.zeros(0, np.int32)
    )
    return starts, sizes


def _source_index(
    name: str, sizes: np.ndarray, *, seq_len: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(document order, sample index) for ``num_samples`` samples of one source's split.

    ``sizes`` are the lengths of the split's documents; the order holds
    positions among them (``SplitDocuments`` turns them into numbers).
    """
    n = len(sizes)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    if tokens_per_epoch <= seq_len:
        raise ValueError(
            f"source {name}: {tokens_per_epoch} tokens in {n} documents are fewer "
            f"than one sample of seq_len + 1 = {seq_len + 1}"
        )
    # the fewest epochs that hold num_samples samples: E * T >= num_samples * seq_len + 1
    epochs = max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))
    doc = np.empty(epochs * n, dtype=np.int32)
    for epoch in range(epochs):
        epoch_order(n, _seed(seed, name, _KIND_EPOCH, epoch), out=doc[epoch * n : (epoch + 1) * n])
    sample_idx = megatron_helpers.build_sample_idx(
        sizes, doc, seq_len=seq_len, num_samples=num_samples
    )
    last = int(sample_idx[-1, 0]) + 1  # documents past the last sample are never read
    return doc[:last], sample_idx


class RunIndex:
    """A built cache folder, memory-mapped read-only; ``split(name)`` reads its samples."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            self.manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise CorruptIndex(f"{folder}/manifest.json: {e}") from None
        if self.manifest.get("version") != FORMAT_VERSION:
            raise CorruptIndex(f"{folder}: format {self.manifest.get('version')}")
        for name, meta in self.manifest["files"].items():
            path = folder / f"{name}.npy"
            size = path.stat().st_size if path.is_file() else None
            if size != meta["bytes"]:
                raise CorruptIndex(f"{path}: {size} bytes, the manifest says {meta['bytes']}")
        self.spec = self.manifest["spec"]

    def load(self, name: str) -> np.ndarray:
        meta = self.manifest["files"][name]
        try:
            array = np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CorruptIndex(f"{self.folder}/{name}.npy: {e}") from None
        if list(array.shape) != meta["shape"] or array.dtype.str != meta["dtype"]:
            raise CorruptIndex(f"{self.folder}/{name}.npy: not the array the manifest lists")
        return np.asarray(array)  # a plain view of the map: no memmap overhead per lookup

    def members(self, split: str, source: int) -> SplitDocuments:
        """Source ``source``'s documents in ``split``, by position."""
        return SplitDocuments(self.load(f"held_out_gaps_{source}"), valid=split == "valid")

    def document_order(self, split: str, slot: int) -> np.ndarray:
        """The document numbers the ``slot``-th source of ``split`` is read in (int64)."""
        source = self.manifest["splits"][split]["sources"][slot]
        return self.members(split, source).numbers(self.load(f"{split}_{slot}_doc"))

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_samples"])

    def split(self, split: str) -> BlendedSamples:
        return BlendedSamples(self, split)


class _SourceReader:
    """One source's documents across its shards, each shard opened on first use.

    An open shard holds two file descriptors (its two maps), and a long run
    opens them all: CommonCrawl's 2,000 shards alone need 4,000, past the
    common soft limit of 1,024, so the soft limit is raised toward the hard one.
    """

    def __init__(self, shards: Sequence[str], starts: np.ndarray) -> None:
        self.shards = list(shards)
        self.starts = starts
        self._open: dict[int, IndexedDataset] = {}
        _allow_open_files(2 * len(self.shards))

    def document(self, number: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, number, side="right")) - 1
        dataset = self._open.get(shard)
        if dataset is None:
            dataset = self._open[shard] = IndexedDataset(self.shards[shard])
        return dataset[number - int(self.starts[shard])]


def _allow_open_files(more: int) -> None:
    """Raise the soft limit on open files by ``more`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = soft + more if hard == resource.RLIM_INFINITY else min(hard, soft + more)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if hard != resource.RLIM_INFINITY and soft + more > hard:
        log.warning(
            "data: %d more open files may be needed, the hard limit is %d (ulimit -Hn)", more, hard
        )


class BlendedSamples:
    """Sample ``k`` of a split of the blend: ``seq_len + 1`` tokens (int64)."""

    def __init__(self, index: RunIndex, split: str) -> None:
        info = index.manifest["splits"][split]
        self.num_samples = int(info["num_samples"])
        self.seq_len = int(index.spec["seq_len"])
        self.blend = (
            Blend(index.load(f"{split}_blend_period"), index.load(f"{split}_blend_rank"))
            if self.num_samples
            else None
        )
        seed = split_seed(int(index.spec["seed"]), split)
        self.docs, self.samples, self.orders, self.readers = [], [], [], []
        self.members = []
        for slot, i in enumerate(info["sources"]):
            tag = f"{split}_{slot}"
            self.docs.append(index.load(f"{tag}_doc"))
            self.members.append(index.members(split, i))
            self.samples.append(index.load(f"{tag}_sample"))
            name = index.spec["sources"][i]["name"]
            self.orders.append(SampleOrder(len(self.samples[-1]) - 1, seed=seed, name=name))
            shards = index.spec["sources"][i]["shards"]
            self.readers.append(_SourceReader(shards, index.load(f"shard_starts_{i}")))

    def __getitem__(self, k: int) -> np.ndarray:
        assert self.blend is not None
        d, s = self.blend.locate(k)
        j = self.orders[d][s]
        (p0, o0), (p1, o1) = self.samples[d][j], self.samples[d][j + 1]
        p0, o0, p1, o1 = int(p0), int(o0), int(p1), int(o1)
        docs, number, reader = self.docs[d], self.members[d].number, self.readers[d]
        if p0 == p1:
            return reader.document(number(int(docs[p0])))[o0 : o1 + 1].astype(np.int64)
        parts = [reader.document(number(int(docs[p0])))[o0:]]
        parts.extend(reader.document(number(int(docs[p]))) for p in range(p0 + 1, p1))
        parts.append(reader.document(number(int(docs[p1])))[: o1 + 1])
        return np.concatenate(parts).astype(np.int64)
