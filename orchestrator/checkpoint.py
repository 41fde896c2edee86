"""Checkpoints in the run directory, committed atomically, resumed exactly.

Layout::

    RUN_DIR/checkpoints/step_00000010/   DeepSpeed's files (model, optimiser,
                                         ZeRO shards, lr schedule) + our state
    RUN_DIR/checkpoints/latest           the name of the newest complete one

Every rank writes into ``step_N.partial``; after a barrier, rank 0 renames
it to ``step_N`` and only then replaces ``latest`` (write to a temporary
file, then ``os.replace``). A run killed while saving therefore leaves
``latest`` on the previous complete checkpoint, and a ``.partial`` directory
that the next save removes.

Besides DeepSpeed's state a checkpoint holds the step, consumed tokens, the
data position and the RNG states (``client_state``), and ``layout.json``: the
layout that wrote it. DeepSpeed's loader takes a checkpoint only under that
layout; ``orchestrator.reshard`` moves it to any other.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from orchestrator.plan import Plan

_NAME = re.compile(r"^step_(\d{8})$")
LAYOUT_FILE = "layout.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    """The newest complete checkpoint's name, or None."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


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
    """Write a checkpoint of every rank (a collective) and point ``latest`` at it."""
    root = checkpoint_dir(run_dir)
    tag = tag_for(state.step)
    partial = f"{tag}.partial"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / partial, ignore_errors=True)
    dist.barrier()
    client_state = {
        "step": state.step,
        "consumed_tokens": state.consumed_tokens,
        "data": state.data,
        "rng": _rng_state(),
    }
    engine.save_checkpoint(str(root), tag=partial, client_state=client_state, save_latest=False)
    if rank == 0 and state.layout is not None:
        write_layout(root / partial, state.layout)
    dist.barrier()  # every rank has written its part
    if rank == 0:
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / partial, final)
        pointer = root / "latest.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / "latest")
        _prune(root, keep=keep)
    dist.barrier()
    return root / tag


def _prune(root: Path, *, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and stale partial ones."""
    complete = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def load(engine: Any, run_dir: Path, tag: str) -> TrainingState:
    """Restore DeepSpeed's state and ours from checkpoint ``tag`` (a collective)."""
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None or client_state is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {checkpoint_dir(run_dir)}")
    _set_rng_state(client_state["rng"])
    return TrainingState(
        step=int(client_state["step"]),
        consumed_tokens=int(client_state["consumed_tokens"]),
        data=dict(client_state["data"]),
    )
