"""Progress lines and ``metrics.jsonl`` (written by one rank)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO


@dataclass
class StepMetrics:
    step: int  # optimiser steps completed
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    consumed_tokens: int
    step_time_s: float
    skipped_steps: int = 0  # non-finite steps not applied, so far


def progress_line(m: StepMetrics, *, total_steps: int) -> str:
    """One greppable line per logging interval."""
    grad_norm = "n/a" if m.grad_norm is None else f"{m.grad_norm:.4f}"
    return (
        f"step {m.step}/{total_steps} | loss {m.loss:.4f} | lr {m.lr:.3e} | "
        f"grad_norm {grad_norm} | tokens/s {m.tokens_per_s:,.0f} | "
        f"consumed_tokens {m.consumed_tokens:,} | step_time {m.step_time_s:.3f}s | "
        f"skipped {m.skipped_steps}"
    )


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, m: StepMetrics) -> None:
        self._file.write(json.dumps(asdict(m)) + "\n")
        self._file.flush()

    def write_eval(self, step: int, valid_loss: float) -> None:
        record = {
            "step": step,
            "valid_loss": valid_loss,
            "valid_ppl": math.exp(min(valid_loss, 50.0)),
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path, *, kind: str = "train") -> list[dict[str, float]]:
    """The training records (``kind="train"``) or validation records (``"valid"``) of a run."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = "valid_loss" if kind == "valid" else "loss"
    return [r for r in records if key in r]
