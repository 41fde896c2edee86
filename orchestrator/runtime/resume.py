"""A rank's run once built, and what it does with checkpoints: save, resume, roll back.

``Run`` holds what the checkpoint operations need (instead of long argument
lists); ``restore`` loads a checkpoint of this layout through DeepSpeed's
loader (bit-exact) and one of another layout through the layout-free form
(``orchestrator.state.reshard``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_parallel.groups import ProcessGroups
from orchestrator.config.schema import Config
from orchestrator.data import MicroBatchSource
from orchestrator.planning.plan import Plan
from orchestrator.state import checkpoint, reshard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One rank's run: its config and plan, groups, folder, engine and training data."""

    cfg: Config
    plan: Plan
    groups: ProcessGroups
    run_dir: Path
    engine: Any
    data: MicroBatchSource

    @property
    def layout(self) -> checkpoint.LayoutRecord:
        return checkpoint.LayoutRecord.from_plan(self.plan)

    def consumed_tokens(self) -> int:
        """Tokens of every sample handed out so far (rollbacks move data forward, not back)."""
        micro_batches = int(self.data.state_dict()["position"])
        plan = self.plan
        return micro_batches * plan.micro_batch_size * plan.dp * plan.seq_len


def needs_reshard(run: Run, tag: str) -> bool:
    """Whether checkpoint ``tag`` was written by another layout (``restore`` re-shards it)."""
    saved = checkpoint.read_layout(checkpoint.checkpoint_dir(run.run_dir) / tag)
    return saved is not None and saved != run.layout


def save(run: Run, step: int) -> Path:
    """Checkpoint ``step`` (raises ``checkpoint.CheckpointSaveError`` on every rank)."""
    state = checkpoint.TrainingState(step, run.consumed_tokens(), run.data.state_dict(), run.layout)
    path = checkpoint.save(run.engine, run.run_dir, state, keep=run.cfg.checkpoint.keep)
    log.info("step %d/%d | checkpoint %s", step, run.cfg.train.steps, path)
    return path


def restore(run: Run, tag: str) -> int:
    """Load checkpoint ``tag`` into the engine and the data position; the step to go on from."""
    path = checkpoint.checkpoint_dir(run.run_dir) / tag
    saved = checkpoint.read_layout(path)
    current = run.layout
    if saved is None or saved == current:
        state = checkpoint.load(run.engine, run.run_dir, tag)
        log.info("resumed from %s at step %d", tag, state.step)
    else:
        plan = run.plan
        state, source = reshard.load_resharded(
            run.engine,
            path,
            args=run.cfg.model.to_args(),
            pp=plan.pp,
            tp_group=run.groups.tp_group,
            dp=plan.dp,
            micro_batch=plan.micro_batch_size,
        )
        log.info(
            "resumed from %s at step %d, re-sharded from %s to %s (this rank read %.1f MiB)",
            tag,
            state.step,
            saved.describe(),
            current.describe(),
            source.bytes_read / 2**20,
        )
    run.data.load_state_dict(state.data)
    return state.step


def roll_back(run: Run, why: str, step: int) -> int:
    """Reload the last checkpoint; the data stream goes on past the offending batches."""
    tag = checkpoint.find_resumable(run.run_dir, run.layout)
    if tag is None:
        raise RuntimeError(f"step {step}: {why}, and there is no checkpoint to roll back to")
    position = run.data.state_dict()
    restored = restore(run, tag)
    run.data.load_state_dict(position)
    log.warning(
        "step %d | %s: rolled back to %s (step %d); data continues past the bad batches",
        step,
        why,
        tag,
        restored,
    )
    return restored
