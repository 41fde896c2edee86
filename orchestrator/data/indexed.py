"""Indexed, memory-mapped token shards in Megatron-LM's format (``.bin`` + ``.idx``).

``PREFIX.bin``: the token ids of every document, concatenated, as ``uint16``
(vocabularies up to 65,536) or ``int32``.

``PREFIX.idx`` (Megatron-LM's ``MMIDIDX``, read and written byte for byte as
``megatron.core.datasets.indexed_dataset`` does, so shards made by
Megatron-LM, GPT-NeoX or Megatron-DeepSpeed train here and ours train there)::

    magic     9 bytes   b"MMIDIDX\\x00\\x00"
    version   8 bytes   little-endian uint64: 1
    dtype     1 byte    Megatron's code: 8 = uint16, 4 = int32 (others read too)
    count     8 bytes   uint64: number of sequences
    docs      8 bytes   uint64: number of document boundaries (documents + 1)
    lengths   count     int32: tokens of each sequence
    pointers  count     int64: byte offset of each sequence in .bin
    doc_idx   docs      int64: the first sequence of each document, then count

As Megatron's ``GPTDataset`` does, each *sequence* is one unit of packing
(our preprocessing writes one sequence per document; sentence-split shards
pack by sentence). Nothing is read into private memory: the arrays are views
of a read-only memory map, so the ranks of a node share their pages.

Shards of this project's earlier format (magic ``LLMIDX``) are still read;
``python -m orchestrator.data.indexed convert OLD NEW`` rewrites one as
Megatron's.

A shard is written under temporary names and renamed when complete, ``.bin``
first and ``.idx`` last, so an ``.idx`` exists only beside a finished
``.bin``: an interrupted run never leaves a shard that looks finished.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
LEGACY_MAGIC = b"LLMIDX\x00\x01"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# Megatron's DType enum (megatron/core/datasets/indexed_dataset.py)
_MEGATRON_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_MEGATRON_CODES = {dtype: code for code, dtype in _MEGATRON_DTYPES.items()}
_LEGACY_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The smallest dtype that holds ids of ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def shard_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Appends documents; ``finish()`` commits the shard, ``abort()`` removes the temporaries."""

    def __init__(self, prefix: str | Path, *, vocab_size: int) -> None:
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._bin = self._tmp_bin.open("wb")
        self._lengths: list[int] = []

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        source = np.asarray(tokens)
        if source.size and (source.min() < 0 or source.max() > np.iinfo(self.dtype).max):
            raise ValueError(
                f"token ids in [{source.min()}, {source.max()}] do not fit {self.dtype.name}"
            )
        array = source.astype(self.dtype, copy=False)
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(len(array))

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with self._tmp_idx.open("wb") as idx:
            write_index(idx, np.asarray(self._lengths, dtype=np.int32), self.dtype)
            idx.flush()
            os.fsync(idx.fileno())
        if self.idx_path.exists():
            self.idx_path.unlink()  # an old shard stops looking finished first
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)


def write_index(stream: Any, lengths: np.ndarray, dtype: np.dtype[Any]) -> None:
    """Megatron's ``.idx`` for sequences of ``lengths`` tokens, one document each."""
    count = len(lengths)
    pointers = np.zeros(count, dtype="<i8")
    if count > 1:
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    stream.write(MAGIC)
    stream.write(struct.pack("<Q", 1))
    stream.write(struct.pack("<B", _MEGATRON_CODES[np.dtype(dtype)]))
    stream.write(struct.pack("<Q", count))
    stream.write(struct.pack("<Q", count + 1))
    stream.write(np.asarray(lengths, dtype="<i4").tobytes(order="C"))
    stream.write(pointers.tobytes(order="C"))
    stream.write(np.arange(count + 1, dtype="<i8").tobytes(order="C"))


class IndexedDataset:
    """Read-only view of a shard: ``ds[i]`` is sequence ``i``'s tokens (a memmap slice).

    ``lengths`` (int32) and ``pointers`` (byte offsets, int64) are views of the
    memory-mapped ``.idx``; opening costs O(1) whatever the number of documents.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        bin_path, idx_path = shard_paths(prefix)
        with idx_path.open("rb") as idx:
            head = idx.read(HEADER_BYTES)
        if head.startswith(MAGIC):
            self._open_megatron(idx_path, head)
        elif head.startswith(LEGACY_MAGIC):
            self._open_legacy(idx_path, head)
        else:
            raise ValueError(f"{idx_path}: not an MMIDIDX index file (magic {head[:9]!r})")
        expected = self.bin_bytes
        if bin_path.stat().st_size != expected:
            raise ValueError(
                f"{bin_path}: {bin_path.stat().st_size} bytes, the index says {expected}"
            )
        self.tokens = (  # a plain view of the map: no memmap overhead per slice
            np.asarray(np.memmap(bin_path, dtype=self.dtype, mode="r"))
            if expected
            else np.zeros(0, dtype=self.dtype)
        )

    def _open_megatron(self, idx_path: Path, head: bytes) -> None:
        if len(head) < HEADER_BYTES:
            raise ValueError(f"{idx_path}: truncated header")
        version, code, count, num_bounds = struct.unpack("<QBQQ", head[9:])
        if version != 1 or code not in _MEGATRON_DTYPES:
            raise ValueError(f"{idx_path}: version {version}, dtype code {code}: not readable")
        need = HEADER_BYTES + count * 12 + num_bounds * 8
        size = idx_path.stat().st_size
        if size < need:
            raise ValueError(f"{idx_path}: truncated ({size} bytes, the header says {need})")
        self.dtype = _MEGATRON_DTYPES[code]
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.lengths = np.frombuffer(index, dtype="<i4", count=count, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(
            index, dtype="<i8", count=count, offset=HEADER_BYTES + 4 * count
        )
        self.document_indices = np.frombuffer(
            index, dtype="<i8", count=num_bounds, offset=HEADER_BYTES + 12 * count
        )

    def _open_legacy(self, idx_path: Path, head: bytes) -> None:
        code, count = struct.unpack("<BQ", head[len(LEGACY_MAGIC) : len(LEGACY_MAGIC) + 9])
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        start = len(LEGACY_MAGIC) + 9
        if index.size < start + 8 * (count + 1):
            raise ValueError(f"{idx_path}: truncated ({index.size} bytes for {count} documents)")
        offsets = np.frombuffer(index, dtype="<i8", count=count + 1, offset=start)
        self.dtype = _LEGACY_DTYPES[code]
        self.lengths = np.diff(offsets).astype(np.int32)
        self.pointers = offsets[:-1] * self.dtype.itemsize
        self.document_indices = np.arange(count + 1, dtype=np.int64)

    @property
    def bin_bytes(self) -> int:
        """Size of ``.bin`` the index describes."""
        if not len(self.lengths):
            return 0
        return int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)} in {self.prefix}")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.lengths[i])]

    @property
    def doc_lengths(self) -> np.ndarray:
        return self.lengths

    @property
    def num_tokens(self) -> int:
        return self.bin_bytes // self.dtype.itemsize


def convert(source: str | Path, target: str | Path) -> int:
    """Rewrite shard ``source`` (either format) as Megatron's at ``target``; its documents."""
    shard = IndexedDataset(source)
    bin_path, idx_path = shard_paths(target)
    tmp_bin = bin_path.with_name(bin_path.name + ".tmp")
    tmp_idx = idx_path.with_name(idx_path.name + ".tmp")
    try:
        with tmp_bin.open("wb") as out:
            for start in range(0, len(shard.tokens), 1 << 24):  # 16M tokens at a time
                out.write(np.asarray(shard.tokens[start : start + (1 << 24)]).tobytes())
        with tmp_idx.open("wb") as idx:
            write_index(idx, np.asarray(shard.lengths, dtype=np.int32), shard.dtype)
        del shard  # the maps close before a rename over them
        idx_path.unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
        raise
    return len(IndexedDataset(target))


def main(argv: Sequence[str] | None = None) -> int:
    """``convert OLD_PREFIX NEW_PREFIX``: a shard of either format to Megatron's."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.data.indexed")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="rewrite a shard in Megatron's MMIDIDX format")
    conv.add_argument("source", help="prefix of the shard to read (PREFIX.bin/.idx)")
    conv.add_argument("target", help="prefix to write (may equal source)")
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.target)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.target}: {count} documents in Megatron's MMIDIDX format")
    return 0


if __name__ == "__main__":
    sys.exit(main())
