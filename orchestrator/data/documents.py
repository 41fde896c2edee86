"""Reading raw documents: input formats, records, and what makes one malformed.

Inputs, by file name (each may end in ``.gz`` or ``.zst``; a ``.zst`` file may
hold several frames, as zstd's ``--long``/multi-threaded writers make them):

* ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line, the document
  in its ``text`` field (the RedPajama format; other fields are ignored).
* ``.txt``: with ``text_split="file"`` (the default) the whole file is one
  document, byte for byte; with ``text_split="lines"`` each line is one, its
  line ending removed.

A record (a JSONL line, a text file, a text line) is malformed when it is bad
JSON, has no ``text``, a ``text`` that is not a string, or invalid UTF-8.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

log = logging.getLogger("orchestrator.data.documents")

MAX_REPORTED_MALFORMED = 10
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "text"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
_GLOB_CHARS = frozenset("*?[")
_ZST_CHUNK = 1 << 18  # compressed bytes decompressed at a time
TEXT_SPLITS = ("file", "lines")
Record = tuple[int, int, bytes]  # (source index, 1-based line number, raw bytes)


@dataclass(frozen=True)
class Source:
    path: Path
    format: str  # "jsonl" or "text"
    compression: str | None  # None, "gz" or "zst"
    size: int  # bytes on disk


@dataclass(frozen=True)
class Malformed:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def check_inputs(inputs: Sequence[Path], *, text_split: str = "file") -> list[Source]:
    """The inputs as ``Source``s; raises for a missing file or an unknown format."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split={text_split!r}: must be one of {', '.join(TEXT_SPLITS)}")
    if not inputs:
        raise ValueError("no input files")
    sources = []
    for path in map(Path, inputs):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        compression = COMPRESSIONS.get(path.suffix)
        suffixes = path.suffixes[-2:] if compression else path.suffixes[-1:]
        fmt = _FORMATS.get(suffixes[0] if suffixes else "")
        if fmt is None:
            known = ", ".join(_FORMATS)
            raise ValueError(
                f"{path}: unknown input format (expected {known}, optionally .gz or .zst)"
            )
        sources.append(Source(path, fmt, compression, path.stat().st_size))
    return sources


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """The files named by command-line ``patterns`` (globs too), sorted by path, each once.

    A glob that matches nothing is an error; a plain name is kept, for
    ``check_inputs`` to report when it is missing.
    """
    paths: set[Path] = set()
    for pattern in patterns:
        if _GLOB_CHARS.isdisjoint(pattern):
            paths.add(Path(pattern))
            continue
        matches = glob.glob(pattern)
        if not matches:
            raise ValueError(f"--input {pattern!r}: matches no file")
        paths.update(map(Path, matches))
    return sorted(paths, key=str)


class Reader:
    """The records of every source, in order; ``bytes_read`` tracks the position."""

    def __init__(self, sources: Sequence[Source], *, text_split: str) -> None:
        self.sources = sources
        self.text_split = text_split
        self._done = 0
        self._raw: IO[bytes] | None = None

    @property
    def bytes_read(self) -> int:
        return self._done + (self._raw.tell() if self._raw is not None else 0)

    def __iter__(self) -> Iterator[Record]:
        for i, source in enumerate(self.sources):
            try:
                with source.path.open("rb") as raw:
                    self._raw = raw
                    stream = _decompressed(raw, source.compression)
                    if source.format == "text" and self.text_split == "file":
                        yield (i, 1, stream.read())
                    else:
                        yield from ((i, n, line) for n, line in enumerate(stream, 1))
                    self._raw = None
            # EOFError: a truncated .gz or .zst
            except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
                raise OSError(f"{source.path}: cannot read ({e})") from e
            self._done += source.size


def _decompressed(
    raw: IO[bytes], compression: str | None
) -> IO[bytes] | gzip.GzipFile | io.BufferedReader:
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zst":
        return io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 16)
    return raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in ``raw``, streamed.

    Not ``ZstdDecompressor().stream_reader``: that one returns a truncated
    file's bytes as if it were complete. Raises ``EOFError`` when the input
    ends inside a frame.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame: zstandard.ZstdDecompressionObj | None = None  # None between frames
        self._out = b""
        self._pos = 0  # in _out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            if not self._decompress_chunk():
                return 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress_chunk(self) -> bool:
        """Decompresses the next chunk of input into ``_out``; False at the end."""
        chunk = self._raw.read(_ZST_CHUNK)
        if not chunk:
            if self._frame is not None:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            return False
        parts = []
        while chunk:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            parts.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # the chunk may hold the start of the next frame
                chunk, self._frame = self._frame.unused_data, None
        self._out, self._pos = b"".join(parts), 0
        return True


def read_documents(inputs: Sequence[Path], *, text_split: str = "file") -> Iterator[str]:
    """The non-empty document texts of ``inputs``, in order; malformed records are logged."""
    sources = check_inputs(inputs, text_split=text_split)
    num_malformed = 0
    for source, line, data in Reader(sources, text_split=text_split):
        fmt = sources[source].format
        try:
            text, _ = parse_record(fmt, data, text_split=text_split)
        except MalformedRecord as e:
            num_malformed += 1
            if num_malformed <= MAX_REPORTED_MALFORMED:
                path = sources[source].path
                log.warning("%s:%d: %s (skipped)", path, line + e.line_offset, e.reason)
            continue
        if text:
            yield text
    if num_malformed:
        log.warning("%d malformed records skipped", num_malformed)


class MalformedRecord(Exception):
    def __init__(self, reason: str, line_offset: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line_offset = line_offset


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number"}
_JSON_TYPES |= {list: "an array", dict: "an object"}


def parse_record(fmt: str, data: bytes, *, text_split: str) -> tuple[str, int]:
    """A record's document text ("" when empty) and its size in UTF-8 bytes.

    Raises ``MalformedRecord``.
    """
    if fmt == "jsonl" or text_split == "lines":
        data = data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_offset = data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise MalformedRecord(
            f"invalid UTF-8 (byte {data[e.start]:#04x} at column {column})", line_offset
        ) from None
    if fmt == "text":
        return decoded, len(data)
    if not decoded.strip():
        return "", 0
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise MalformedRecord(
            f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
        ) from None
    if not isinstance(record, dict):
        raise MalformedRecord(f"not a JSON object but {_JSON_TYPES.get(type(record), '?')}")
    if "text" not in record:
        raise MalformedRecord("no 'text' field")
    text = record["text"]
    if not isinstance(text, str):
        raise MalformedRecord(f"'text' is {_JSON_TYPES.get(type(text), '?')}, not a string")
    if text.isascii():
        return text, len(text)
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError as e:  # JSON can escape a lone surrogate: "\ud800"
        raise MalformedRecord(f"'text' has a lone surrogate ({text[e.start]!r})") from None
