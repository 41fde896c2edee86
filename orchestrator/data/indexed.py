"""Indexed, memory-mapped token shards (Megatron-style ``.bin`` + ``.idx``).

``PREFIX.bin``: the token ids of every document, concatenated, as ``uint16``
(vocabularies up to 65,536) or ``int32``.

``PREFIX.idx``::

    magic    8 bytes   b"LLMIDX\\x00\\x01"
    dtype    1 byte    1 = uint16, 2 = int32
    count    8 bytes   little-endian uint64: number of documents
    offsets  (count + 1) little-endian int64: token offset of each document
                       in .bin, then the total number of tokens

A shard is written under temporary names and renamed when complete, ``.bin``
first and ``.idx`` last, so an ``.idx`` exists only beside a finished
``.bin``: an interrupted run never leaves a shard that looks finished.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"LLMIDX\x00\x01"
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The smallest dtype that holds ids of ``vocab_size``."""
    return _DTYPES[1] if vocab_size <= 65536 else _DTYPES[2]


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
        self._offsets = [0]

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        source = np.asarray(tokens)
        if source.size and (source.min() < 0 or source.max() > np.iinfo(self.dtype).max):
            raise ValueError(
                f"token ids in [{source.min()}, {source.max()}] do not fit {self.dtype.name}"
            )
        array = source.astype(self.dtype, copy=False)
        self._bin.write(array.tobytes(order="C"))
        self._offsets.append(self._offsets[-1] + len(array))

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with self._tmp_idx.open("wb") as idx:
            idx.write(MAGIC)
            idx.write(struct.pack("<B", _CODES[self.dtype]))
            idx.write(struct.pack("<Q", len(self._offsets) - 1))
            idx.write(np.asarray(self._offsets, dtype="<i8").tobytes())
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


class IndexedDataset:
    """Read-only view of a shard: ``ds[i]`` is document ``i``'s tokens (a memmap slice)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        bin_path, idx_path = shard_paths(prefix)
        with idx_path.open("rb") as idx:
            magic = idx.read(len(MAGIC))
            if magic != MAGIC:
                raise ValueError(f"{idx_path}: not an index file of this format (magic {magic!r})")
            (code,) = struct.unpack("<B", idx.read(1))
            (count,) = struct.unpack("<Q", idx.read(8))
            self.offsets = np.frombuffer(idx.read(8 * (count + 1)), dtype="<i8")
        if len(self.offsets) != count + 1:
            raise ValueError(f"{idx_path}: truncated ({len(self.offsets)} of {count + 1} offsets)")
        self.dtype = _DTYPES[code]
        expected = int(self.offsets[-1]) * self.dtype.itemsize
        if bin_path.stat().st_size != expected:
            raise ValueError(
                f"{bin_path}: {bin_path.stat().st_size} bytes, the index says {expected}"
            )
        self.tokens = (
            np.memmap(bin_path, dtype=self.dtype, mode="r")
            if expected
            else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)} in {self.prefix}")
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])
