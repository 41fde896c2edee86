"""Checkpoints in the run directory, committed atomically, resumed exactly.

Layout::

    RUN_DIR/checkpoints/step_00000010/   DeepSpeed's files (model, optimiser,
                                         ZeRO shards, lr schedule) + our state
    RUN_DIR/checkpoints/latest           the name of the newest complete one

Every rank writes into ``step_N.partial``, checksumming and fsyncing each
file as it writes it (``orchestrator.state.integrity``); rank 0 gathers the records
into ``manifest.json``, renames the folder to ``step_N`` and only then
replaces ``latest`` (write to a temporary file, then ``os.replace``). A run
killed while saving therefore leaves ``latest`` on the previous complete
checkpoint, and a ``.partial`` directory that the next save removes. A save
that fails on any rank (disk full, permission, I/O error) removes its partial
folder, leaves ``latest`` alone and raises :class:`CheckpointSaveError` on
every rank with one line: the path, the error and the space it needs.

A resume takes the newest checkpoint whose files match their manifest
(:func:`find_resumable`, every rank checking a share); a damaged one is
renamed ``step_N.damaged`` with a warning naming the file, and the next
older one is tried. ``python -m orchestrator.state.checkpoint verify RUN_DIR``
checks a run by hand.

Besides DeepSpeed's state a checkpoint holds the step, consumed tokens, the
data position and the RNG states (``client_state``), and ``layout.json``: the
layout that wrote it. DeepSpeed's loader takes a checkpoint only under that
layout; ``orchestrator.state.reshard`` moves it to any other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.state import integrity
from orchestrator.state.run_files import checkpoint_dir as checkpoint_dir
from orchestrator.state.run_files import latest_tag as latest_tag
from orchestrator.state.safe_load import use_safe_loading

if TYPE_CHECKING:
    from orchestrator.planning.plan import Plan

_NAME = re.compile(r"^step_(\d{8})$")
LAYOUT_FILE = "layout.json"
log = logging.getLogger("orchestrator.state.checkpoint")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; ``latest`` still names the previous one."""


class NoUsableCheckpoint(RuntimeError):
    """Every checkpoint of a run is damaged."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class LayoutRecord:
    """What must match for DeepSpeed's own loader to take a checkpoint."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    stage_layers: list[list[int]]

    @classmethod
    def from_plan(cls, plan: Plan) -> LayoutRecord:
        return cls(
            tp=plan.tp,
            pp=plan.pp,
            dp=plan.dp,
            zero_stage=plan.zero_stage,
            micro_batch_size=plan.micro_batch_size,
            stage_layers=[list(s) for s in plan.stage_layers],
        )

    def describe(self) -> str:
        return f"tp{self.tp}pp{self.pp}dp{self.dp} zero{self.zero_stage} mb{self.micro_batch_size}"


def write_layout(path: Path, record: LayoutRecord) -> None:
    (path / LAYOUT_FILE).write_text(json.dumps(asdict(record), indent=2) + "\n")


def read_layout(path: Path) -> LayoutRecord | None:
    """The layout a checkpoint was written with (None for one written before we recorded it)."""
    file = path / LAYOUT_FILE
    if not file.is_file():
        return None
    return LayoutRecord(**json.loads(file.read_text()))


@dataclass
class TrainingState:
    """What a resumed run needs besides DeepSpeed's own state."""

    step: int
    consumed_tokens: int
    data: dict[str, Any]
    layout: LayoutRecord | None = None  # recorded in layout.json (re-sharding reads it)


def _rng_state() -> dict[str, Any]:
    # Plain types and tensors only, so the file loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, run_dir: Path, state: TrainingState, *, keep: int) -> Path:
    """Write a checkpoint of every rank (a collective) and point ``latest`` at it.

    Raises :class:`CheckpointSaveError` on every rank if any rank failed to
    write its part; nothing of that checkpoint is left behind.
    """
    root = checkpoint_dir(run_dir)
    tag = tag_for(state.step)
    partial = root / f"{tag}.partial"
    rank = dist.get_rank()
    error: str | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        except OSError as exc:
            error = f"{root}: {exc}"
    _raise_if_any(_broadcast(error), tag)
    client_state = {
        "step": state.step,
        "consumed_tokens": state.consumed_tokens,
        "data": state.data,
        "rng": _rng_state(),
    }
    with integrity.Recorder(engine, partial) as record:
        engine.save_checkpoint(
            str(root), tag=partial.name, client_state=client_state, save_latest=False
        )
    if rank == 0 and state.layout is not None and record.error is None:
        try:
            write_layout(partial, state.layout)
        except OSError as exc:
            record.error = f"{partial / LAYOUT_FILE}: {exc}"
    records: list[integrity.SaveRecord] | None = (
        [integrity.SaveRecord()] * dist.get_world_size() if rank == 0 else None
    )
    dist.gather_object(record, records, dst=0)
    outcome: str | None = None
    if rank == 0:
        assert records is not None
        outcome = _commit(root, tag, records, step=state.step, keep=keep)
    _raise_if_any(_broadcast(outcome), tag)
    return root / tag


def _commit(
    root: Path, tag: str, records: list[integrity.SaveRecord], *, step: int, keep: int
) -> str | None:
    """Rank 0: manifest, rename, ``latest``; or remove the partial folder. The error, or None."""
    partial = root / f"{tag}.partial"
    errors = [r.error for r in records if r.error is not None]
    if not errors:
        files: dict[str, dict[str, Any]] = {}
        for r in records:
            files.update(r.files)
        try:
            integrity.write_manifest(partial, files, step=step)
            final = root / tag
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            pointer = root / "latest.tmp"
            with open(pointer, "w") as f:
                f.write(tag + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer, root / "latest")
            _fsync_dir(root)
        except OSError as exc:
            errors.append(f"{exc.filename or root}: {exc}")
            if latest_tag(root.parent) != tag:
                shutil.rmtree(root / tag, ignore_errors=True)
        else:
            _prune(root, keep=keep)
            return None
    shutil.rmtree(partial, ignore_errors=True)
    planned = sum(r.planned_bytes for r in records)
    free = shutil.disk_usage(root).free
    previous = latest_tag(root.parent)
    return (
        f"{errors[0]}; this checkpoint needs about {planned / 2**30:.2f} GiB, "
        f"{free / 2**30:.2f} GiB free in {root}; checkpoints/latest still names "
        f"{previous or 'no checkpoint'}"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_if_any(error: str | None, tag: str) -> None:
    if error is not None:
        raise CheckpointSaveError(f"checkpoint {tag} not saved: {error}")


def _complete(root: Path) -> list[str]:
    """The names of the complete checkpoint folders in ``root``, oldest first."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def _prune(root: Path, *, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and stale partial ones."""
    complete = [root / name for name in _complete(root)]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def find_resumable(run_dir: Path, layout: LayoutRecord | None = None) -> str | None:
    """The newest checkpoint whose files match their manifest (a collective), or None.

    Tries ``latest`` first, then older complete checkpoints. Given the run's
    ``layout``, a checkpoint of that layout has each file checked by the rank
    that will load it. Each damaged one
    is reported with the files that are wrong and renamed ``step_N.damaged``;
    raises :class:`NoUsableCheckpoint` when checkpoints exist but none is whole.
    """
    root = checkpoint_dir(run_dir)
    candidates: list[str] = []
    if dist.get_rank() == 0 and root.is_dir():
        newest = latest_tag(run_dir)
        candidates = [newest] if newest else []
        candidates += [t for t in reversed(_complete(root)) if t != newest]
    candidates = _broadcast(candidates)
    damaged: list[str] = []
    for tag in candidates:
        problems = verify_collective(root / tag, layout)
        if not problems:
            if damaged:
                log.warning("resuming from %s, the newest whole checkpoint", tag)
            return tag
        damaged.append(f"{tag} ({problems[0]})")
        if dist.get_rank() == 0:
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            log.warning(
                "checkpoint %s is damaged: %s%s; trying an older one", tag, problems[0], more
            )
            shutil.rmtree(root / f"{tag}.damaged", ignore_errors=True)
            os.replace(root / tag, root / f"{tag}.damaged")
            pointer = root / "latest"
            if pointer.is_file() and pointer.read_text().strip() == tag:
                pointer.unlink()
        dist.barrier()
    if damaged:
        raise NoUsableCheckpoint(f"{root}: every checkpoint is damaged: {'; '.join(damaged)}")
    return None


def verify_collective(folder: Path, layout: LayoutRecord | None = None) -> list[str]:
    """Problems with one checkpoint (a collective: each rank checksums a share of its files)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest, problems, same_layout = None, [], False
    if rank == 0:
        same_layout = layout is not None and read_layout(folder) == layout
        manifest = integrity.read_manifest(folder)
        if manifest is None:
            log.warning("%s: no %s, its files are not verified", folder, integrity.MANIFEST)
        else:
            problems = integrity.check_sizes(folder, manifest)
    manifest, problems, same_layout = _broadcast(
        (manifest if not problems else None, problems, same_layout)
    )
    if manifest is None or problems:
        return list(problems)
    owner = None
    if same_layout and layout is not None:
        owner = integrity.owners(
            list(manifest["files"]),
            tp=layout.tp,
            pp=layout.pp,
            dp=layout.dp,
            stage_layers=layout.stage_layers,
        )
    mine = integrity.check_checksums(
        folder, manifest, integrity.shares(manifest, world, owner)[rank]
    )
    everyone: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(everyone, mine)
    return [p for part in everyone for p in part]


def load(engine: Any, run_dir: Path, tag: str) -> TrainingState:
    """Restore DeepSpeed's state and ours from checkpoint ``tag`` (a collective)."""
    use_safe_loading(engine)
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None or client_state is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    _set_rng_state(client_state["rng"])
    return TrainingState(
        step=int(client_state["step"]),
        consumed_tokens=int(client_state["consumed_tokens"]),
        data=dict(client_state["data"]),
    )


def main(argv: list[str]) -> int:
    """``python -m orchestrator.state.checkpoint verify RUN_DIR [--tag step_N]``."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.state.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check every file of a run's checkpoints")
    check.add_argument("run_dir", type=Path)
    check.add_argument("--tag", default=None, help="one checkpoint (default: all complete ones)")
    ns = parser.parse_args(argv)
    root = checkpoint_dir(ns.run_dir)
    if not root.is_dir():
        print(f"error: run_dir={ns.run_dir}: no checkpoints folder", file=sys.stderr)
        return 2
    tags = [ns.tag] if ns.tag else _complete(root)
    if ns.tag and not (root / ns.tag).is_dir():
        print(f"error: --tag={ns.tag}: no such checkpoint in {root}", file=sys.stderr)
        return 2
    bad = 0
    for tag in tags:
        manifest = integrity.read_manifest(root / tag)
        if manifest is None:
            print(f"{tag}: not verified (no {integrity.MANIFEST}: saved before checksums)")
            continue
        problems = integrity.verify(root / tag)
        if problems:
            bad += 1
            print(f"{tag}: DAMAGED: " + "; ".join(problems))
        else:
            size = manifest["total_bytes"] / 2**30
            print(f"{tag}: ok ({len(manifest['files'])} files, {size:.3f} GiB)")
    print(f"latest: {latest_tag(ns.run_dir) or '(none)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
