"""The per-host file of measured numbers (``cpu_probe``'s peaks and gloo costs).

One JSON file per host, ``cpu_peaks_<hostname>.json`` under
``$LLAMA_ORCHESTRATOR_CACHE_DIR`` (default ``~/.cache/llama-orchestrator``),
an entry per key. A miss measures under a file lock, so ranks that miss at
once measure once: one measures, the rest read its answer. Written whole
through a temporary file, so a reader never sees half an entry.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "LLAMA_ORCHESTRATOR_CACHE_DIR"


def cache_path(*, host: str | None = None) -> Path:
    """This host's cache file."""
    base = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "llama-orchestrator")
    return Path(base) / f"cpu_peaks_{host or socket.gethostname()}.json"


def cached(path: Path, key: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``path``'s entry for ``key``; on a miss ``measure()`` under a file lock, stored."""
    entry = _read(path).get(key)
    if entry is not None:
        return dict(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        entries = _read(path)  # another process may have measured while we waited
        if key not in entries:
            entries[key] = measure()
            _write(path, entries)
        return dict(entries[key])


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, entries: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
