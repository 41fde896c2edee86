"""The last warnings and errors of a run's rank logs, each log read from its tail.

At 2,048 ranks with 1 MiB logs a status command cannot read 2 GiB: each log
is read from its last ``LOG_TAIL_BYTES`` (from the first whole line on), and
``--follow`` reads only what was appended since. Files are read
``READ_THREADS`` at a time, so the waits of a cold page cache or a parallel
file system overlap. No torch here: the status command starts in a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

LOG_TAIL_BYTES = 64 * 1024  # read from the end of each rank's log for its last errors
READ_THREADS = 16  # files read at once (logs, heartbeats)
_T = TypeVar("_T")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")  # at a line's start
_PROBLEM = re.compile(r"\] (WARNING|ERROR|CRITICAL) |\b\w*(Error|Exception)\b:|^Traceback|^error:")
_PROBLEM_WORD = re.compile(r"WARNING|ERROR|CRITICAL|Error|Exception|Traceback")  # and error:


@dataclass
class _LogTail:
    ident: tuple[int, int]  # (device, inode): a new file under the same name is read anew
    offset: int = 0  # the end of the last whole line read
    stamp: str = ""  # the newest timestamp read so far
    found: list[tuple[str, str]] = field(default_factory=list)  # newest problems, oldest first


class LogTails:
    """The newest warning and error lines of every ``*.log`` in a folder, each read from its tail.

    The first read of a log takes its last ``tail_bytes`` from the first whole
    line on; later reads (``--follow``) take only the bytes appended since, at
    most ``tail_bytes`` again, so a problem further back than that from a log's
    end is not seen. A log that shrank or was replaced is read anew. A last line
    still being written (no newline yet) waits for the next read.
    """

    def __init__(self, folder: Path, *, tail_bytes: int = LOG_TAIL_BYTES, limit: int = 5) -> None:
        self.folder = folder
        self.tail_bytes = tail_bytes
        self.limit = limit
        self._tails: dict[str, _LogTail] = {}

    def refresh(self) -> list[str]:
        """The newest ``limit`` problem lines over all logs, oldest first (``name: line``)."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".log"))
        except FileNotFoundError:
            names = []
        tails = {}
        for name, got in zip(names, read_all(self._fetch, names), strict=True):
            if got is not None:
                tails[name] = self._take(*got)
        self._tails = tails
        found = [(stamp, name, text) for name, t in tails.items() for stamp, text in t.found]
        found.sort(key=lambda item: item[0])  # stable: a file's own order among equal stamps
        return [f"{name}: {text}" for _, name, text in found[-self.limit :]]

    def _fetch(self, name: str) -> tuple[_LogTail, int, bytes] | None:
        """A log's state (new if the file is) and the bytes to read on: from where, which."""
        path = self.folder / name
        tail = self._tails.get(name)
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino)
            if tail is None or tail.ident != ident or st.st_size < tail.offset:
                tail = _LogTail(ident)
            if st.st_size == tail.offset:
                return tail, tail.offset, b""
            start = max(tail.offset, st.st_size - self.tail_bytes)
            if start > tail.offset:  # bytes skipped: a whole line starts after the byte before
                start -= 1
            with path.open("rb") as f:
                f.seek(start)
                return tail, start, f.read(st.st_size - start)
        except OSError:
            return None

    def _take(self, tail: _LogTail, start: int, data: bytes) -> _LogTail:
        """Read on in ``tail`` with ``data``, the bytes from ``start`` to the end of the log."""
        first = data.find(b"\n") + 1 if start > tail.offset else 0
        end = data.rfind(b"\n") + 1
        if end <= first:  # no whole line yet: read on from the first whole one next time
            tail.offset = start + first if first else tail.offset
            return tail
        tail.offset = start + end
        found, tail.stamp = _problems(data[first:end].decode(errors="replace"), tail.stamp)
        tail.found = (tail.found + found)[-self.limit :]
        return tail


def read_all(read: Callable[[str], _T], names: list[str]) -> list[_T]:
    """``read`` of every name, in ``READ_THREADS`` threads, each a run of the names: a cold
    disk or a parallel file system makes each file wait, and the waits overlap (reading
    releases the GIL)."""
    if len(names) < 2 * READ_THREADS:
        return [read(name) for name in names]
    size = -(-len(names) // READ_THREADS)
    runs = [names[i : i + size] for i in range(0, len(names), size)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return [got for run in pool.map(lambda run: [read(n) for n in run], runs) for got in run]


def _problems(text: str, stamp: str) -> tuple[list[tuple[str, str]], str]:
    """The warning and error lines of ``text`` (whole lines), each with the timestamp of
    the newest line at or before it (``stamp`` before the first), and the last timestamp.
    """
    found = []
    done = 0  # timestamps are known up to here
    for start in _candidate_lines(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        if _PROBLEM.search(line):
            stamp, done = _stamp_before(text, end, done, stamp), end
            found.append((stamp, line.strip()))
    return found, _stamp_before(text, len(text), done, stamp)


def _candidate_lines(text: str) -> list[int]:
    """Where the lines start that hold a word of ``_PROBLEM``, in order.

    A search for the words (in C) picks them, so most lines are never looked at
    from Python; ``error:`` is searched apart, at line starts only (in the same
    pattern it would halve the search's speed: ``e`` is everywhere).
    """
    hits = [m.start() for m in _PROBLEM_WORD.finditer(text)]
    at = text.find("\nerror:")
    while at >= 0:
        hits.append(at + 1)
        at = text.find("\nerror:", at + 1)
    if text.startswith("error:"):
        hits.append(0)
    return sorted({text.rfind("\n", 0, hit) + 1 for hit in hits})


def _stamp_before(text: str, end: int, done: int, stamp: str) -> str:
    """The timestamp of the newest line of ``text`` that starts in ``[done, end]``, else ``stamp``."""
    pos = end
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        if start < done:
            break
        if m := _TIMESTAMP.match(text, start):
            return m.group(0)
        pos = start - 1
    return stamp


def last_errors(run_dir: Path, *, limit: int = 5, tail_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    """The newest warning and error lines over all ranks' logs, oldest first.

    Each log is read from its last ``tail_bytes`` only (``LogTails``).
    """
    return LogTails(run_dir / "logs", tail_bytes=tail_bytes, limit=limit).refresh()
