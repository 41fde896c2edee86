"""Checkpoint integrity: every file's size and CRC-32, recorded at save, checked at resume.

Each rank checksums the files it writes *while* writing them (DeepSpeed's
``checkpoint_engine.save`` is wrapped: ``torch.save`` streams into a file
object that updates a CRC-32 and counts bytes), then fsyncs them, so the
record costs one pass over bytes already in memory and nothing is read back.
Rank 0 gathers the records into ``manifest.json`` before the checkpoint is
committed::

    {"format": 1, "step": 400, "total_bytes": ...,
     "files": {"mp_rank_00_model_states.pt": {"bytes": 123, "crc32": "89abcdef"}, ...}}

A resume checks it with every rank taking a share of the files (each file is
read once, by one rank; the shares are balanced by size). A write that fails
(disk full, permission, I/O error) is recorded, not raised, so DeepSpeed's own
collectives in the save still line up on every rank; the caller learns of it
after the save returns.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
_CHUNK = 16 << 20
_OVERLAP = 1 << 20  # chunks at least this large are checksummed while they are written
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(?:optim|model)_states\.pt$")
_MP = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")


class _ChecksummedFile:
    """A binary file that keeps a running CRC-32 and byte count of what is written.

    A large chunk's CRC runs on a helper thread while the chunk is written
    (both release the GIL), so the checksum costs max(write, crc), not the sum.
    """

    def __init__(self, file: Any, pool: ThreadPoolExecutor) -> None:
        self.file = file
        self.pool = pool
        self.crc = 0
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        crc = self.pool.submit(zlib.crc32, view, self.crc) if len(view) >= _OVERLAP else None
        try:
            written = self.file.write(view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        finally:
            if crc is not None:
                self.crc = crc.result()
        if crc is None:
            self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return int(written)

    def flush(self) -> None:
        self.file.flush()


@dataclass
class SaveRecord:
    """What this rank wrote into one checkpoint folder, or the first error it met."""

    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # "PATH: [Errno 28] No space left on device"
    planned_bytes: int = 0  # tensor bytes of everything it was asked to write


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def write_checksummed(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` to ``path`` with its size and CRC-32, fsynced; raises OSError on failure."""
    with open(path, "wb") as raw, ThreadPoolExecutor(1) as pool:
        out = _ChecksummedFile(raw, pool)
        try:
            torch.save(obj, out)  # type: ignore[arg-type]
            raw.flush()
            os.fsync(raw.fileno())
        except RuntimeError as exc:  # torch's zip writer wraps the OSError of write()
            if out.error is not None:
                raise out.error from exc
            raise
    return {"bytes": out.size, "crc32": f"{out.crc:08x}"}


class Recorder:
    """Wraps ``engine.checkpoint_engine.save`` for one checkpoint save on this rank."""

    def __init__(self, engine: Any, folder: Path) -> None:
        self.engine, self.folder = engine, folder
        self.record = SaveRecord()
        self._original = engine.checkpoint_engine.save

    def __enter__(self) -> SaveRecord:
        self.engine.checkpoint_engine.save = self._save
        return self.record

    def __exit__(self, *exc: object) -> None:
        self.engine.checkpoint_engine.save = self._original

    def _save(self, state_dict: Any, path: str) -> None:
        self.record.planned_bytes += _tensor_bytes(state_dict)
        if self.record.error is not None:
            return  # the save already failed on this rank: write nothing more
        target = Path(path)
        try:
            entry = write_checksummed(state_dict, target)
        except OSError as exc:
            self.record.error = f"{target}: {exc}"
            target.unlink(missing_ok=True)
            return
        self.record.files[str(target.relative_to(self.folder))] = entry


def checksum_file(path: Path) -> dict[str, Any]:
    """Size and CRC-32 of a file on disk."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]], *, step: int) -> None:
    """``manifest.json`` of ``folder``: the records, plus any file no rank recorded."""
    files = dict(files)
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_file() and name not in files and name != MANIFEST:
            files[name] = checksum_file(path)  # small files written by rank 0 (layout.json)
    manifest = {
        "format": 1,
        "step": step,
        "total_bytes": sum(int(f["bytes"]) for f in files.values()),
        "files": dict(sorted(files.items())),
    }
    tmp = folder / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint (None for one written before manifests existed)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return dict(json.loads(path.read_text()))


def check_sizes(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Missing files and wrong sizes (stat only)."""
    problems = []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != int(entry["bytes"]):
            problems.append(
                f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            )
    return problems


def check_checksums(folder: Path, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Files among ``names`` whose CRC-32 differs from the manifest."""
    problems = []
    for name in names:
        want = manifest["files"][name]
        path = folder / name
        try:
            got = checksum_file(path)
        except OSError as exc:
            problems.append(f"{path}: {exc}")
            continue
        if got != {"bytes": int(want["bytes"]), "crc32": want["crc32"]}:
            problems.append(f"{path}: checksum {got['crc32']}, the manifest says {want['crc32']}")
    return problems


def owners(
    names: list[str], *, tp: int, pp: int, dp: int, stage_layers: list[list[int]]
) -> dict[str, int]:
    """The rank that loads each of DeepSpeed's files when resuming under the layout that wrote them.

    A file checked by that rank is then in its node's page cache when the
    loader reads it: the check adds CRC time, not a second read.
    """
    from model_parallel.layout import Layout

    grid = Layout(tp=tp, pp=pp, dp=dp)
    n_layers = stage_layers[-1][1] + 1

    def stage_of(pipeline_index: int) -> int:  # 0: embedding; 1..n_layers: blocks; then the head
        layer = min(max(pipeline_index - 1, 0), n_layers - 1)
        return next(s for s, (first, last) in enumerate(stage_layers) if first <= layer <= last)

    out = {}
    for name in names:
        if match := _OPTIM.match(name):
            dp_rank, mp = int(match.group(1)), int(match.group(2))
        elif match := _MP.match(name):
            dp_rank, mp = 0, int(match.group(1))
        elif match := _LAYER.match(name):
            dp_rank, mp = 0, stage_of(int(match.group(1))) * tp + int(match.group(2))
        else:
            continue
        stage, tp_rank = divmod(mp, tp)
        if stage < pp and dp_rank < dp and tp_rank < tp:
            out[name] = grid.rank(tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=stage)
    return out


def shares(
    manifest: dict[str, Any], world_size: int, owner: dict[str, int] | None = None
) -> list[list[str]]:
    """Files split over ranks, each file once: to its ``owner`` if it has one, else the
    largest first to the least-loaded rank."""
    owner = owner or {}
    load = [0] * world_size
    out: list[list[str]] = [[] for _ in range(world_size)]
    by_size = sorted(manifest["files"].items(), key=lambda kv: (-int(kv[1]["bytes"]), kv[0]))
    for name, entry in by_size:
        if name in owner and owner[name] < world_size:
            out[owner[name]].append(name)
            load[owner[name]] += int(entry["bytes"])
    for name, entry in by_size:
        if name in owner and owner[name] < world_size:
            continue
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[rank].append(name)
        load[rank] += int(entry["bytes"])
    return out


def verify(folder: Path) -> list[str]:
    """Every problem with one checkpoint folder, checked here alone (the command line)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no {MANIFEST} (written before checksums were recorded)"]
    problems = check_sizes(folder, manifest)
    if problems:
        return problems
    return check_checksums(folder, manifest, list(manifest["files"]))
