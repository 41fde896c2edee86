"""Where a run directory keeps its checkpoints, for code that must not import torch.

The status command reads a run directory in about a second; importing torch
alone takes two. ``orchestrator.state.checkpoint`` writes and loads, and uses these.
"""

from __future__ import annotations

from pathlib import Path


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_tag(run_dir: Path) -> str | None:
    """The newest complete checkpoint's name, or None."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None
