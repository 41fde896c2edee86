"""Progress lines and ``metrics.jsonl`` (written by one rank), and the numbers in them.

A progress line is ``key value`` pairs joined by `` | ``, starting with
``step N/T | loss X | lr Y | grad_norm Z``, so an operator can grep it and a
program can split it (``parse_progress_line``). Every field of the line is
also a key of the step's record in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where a rank measures memory: status starts without it
    import torch


@dataclass
class StepMetrics:
    step: int  # optimiser steps completed
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float  # all devices together, over the logging interval
    consumed_tokens: int
    step_time_s: float  # mean over the logging interval
    skipped_steps: int = 0  # non-finite steps not applied, so far
    total_steps: int = 0
    loss_scale: float | None = None  # fp16 only
    scaler_skips: int = 0  # fp16: steps the loss scaler skipped (not bad steps), so far
    tokens_per_s_per_device: float = 0.0
    tflops_per_device: float = (
        0.0  # model FLOPs (orchestrator.planning.flops) per second, in TFLOP/s
    )
    mfu: float = 0.0  # tflops_per_device / cluster.peak_tflops
    hfu: float | None = None  # with recomputation's extra forward (activation checkpointing)
    peak_mem_gb: float = 0.0  # this rank's device: CUDA max allocated, or CPU peak RSS
    eta_s: float | None = None
    time: float = 0.0  # wall clock (Unix seconds) when the step ended


def progress_line(m: StepMetrics, *, total_steps: int) -> str:
    """One greppable line per logging interval."""
    grad_norm = "n/a" if m.grad_norm is None else f"{m.grad_norm:.4f}"
    parts = [
        f"step {m.step}/{total_steps}",
        f"loss {m.loss:.4f}",
        f"lr {m.lr:.3e}",
        f"grad_norm {grad_norm}",
    ]
    if m.loss_scale is not None:
        parts.append(f"loss_scale {m.loss_scale:g}")
    mfu = f"{100 * m.mfu:.2f}%"
    if m.hfu is not None:
        mfu += f" (hfu {100 * m.hfu:.2f}%)"
    parts += [
        f"consumed_tokens {m.consumed_tokens:,}",
        f"skipped {m.skipped_steps}",
        f"step_time {m.step_time_s:.3f}s",
        f"tokens/s {m.tokens_per_s:,.0f}",
        f"tokens/s/device {m.tokens_per_s_per_device:,.1f}",
        f"tflops/device {m.tflops_per_device:.3f}",
        f"mfu {mfu}",
        f"peak_mem {m.peak_mem_gb:.2f}GB",
        f"eta {format_duration(m.eta_s)}",
    ]
    return " | ".join(parts)


def parse_progress_line(line: str) -> dict[str, str]:
    """The ``key value`` pairs of a progress line (values as printed)."""
    start = line.find("step ")
    fields = {}
    for part in line[start:].split(" | "):
        key, _, value = part.strip().partition(" ")
        fields[key] = value
    return fields


def format_duration(seconds: float | None) -> str:
    """``1d 02:03:04``, ``02:03:04``, or ``n/a``."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    s = max(0, round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours:02d}:{minutes:02d}:{s:02d}"
    return f"{days}d {text}" if days else text


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory on its device: CUDA's max allocated, else peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


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


def read_metrics(path: Path, *, kind: str = "train") -> list[dict[str, Any]]:
    """The training records (``kind="train"``) or validation records (``"valid"``) of a run.

    A last line still being written (no newline yet) is left out.
    """
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    key = "valid_loss" if kind == "valid" else "loss"
    return [r for r in records if key in r]


METRICS_TAIL_BYTES = 64 * 1024  # the first window read back from the end of metrics.jsonl


class MetricsTail:
    """The last training and the last validation record of ``metrics.jsonl``, read from its end.

    The first ``refresh`` reads windows back from the end (each twice the last) until
    it has found both or reached the start of the file, so a run of many steps costs
    a few of its last rows, not all of them. Later calls read only the lines appended
    since; a file that shrank or was replaced is read anew. A last line still being
    written (no newline yet) is left for the next call, as ``read_metrics`` leaves it out.
    """

    def __init__(self, path: Path, *, window: int = METRICS_TAIL_BYTES) -> None:
        self.path = path
        self.window = window
        self.train: dict[str, Any] | None = None
        self.valid: dict[str, Any] | None = None
        self._ident: tuple[int, int] | None = None
        self._offset = 0  # the end of the last complete line read

    def refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.train, self.valid, self._ident = None, None, None
            return
        ident = (st.st_dev, st.st_ino)
        with self.path.open("rb") as f:
            if ident != self._ident or st.st_size < self._offset:
                self.train = self.valid = None
                self._ident = ident
                self._read_back(f, st.st_size)
            elif st.st_size > self._offset:
                self._read_on(f, st.st_size)

    def _read_back(self, f: IO[bytes], size: int) -> None:
        hi, window, carry = size, self.window, b""
        end: int | None = None  # of the last complete line, once found
        while hi > 0 and (self.train is None or self.valid is None):
            lo = max(0, hi - window)
            f.seek(lo)
            data = f.read(hi - lo) + carry
            if end is None:
                cut = data.rfind(b"\n") + 1
                if cut == 0 and lo > 0:  # all of it belongs to a line still being written
                    hi, window, carry = lo, 2 * window, data
                    continue
                end, data = lo + cut, data[:cut]
            lines = data.split(b"\n")
            carry = lines.pop(0) if lo > 0 else b""  # the rest of it is in the next window
            train, valid = _newest(
                reversed(lines), need_train=self.train is None, need_valid=self.valid is None
            )
            self.train = self.train or train
            self.valid = self.valid or valid
            hi, window = lo, 2 * window
        self._offset = end or 0

    def _read_on(self, f: IO[bytes], size: int) -> None:
        f.seek(self._offset)
        data = f.read(size - self._offset)
        cut = data.rfind(b"\n") + 1
        self._offset += cut
        train, valid = _newest(reversed(data[:cut].split(b"\n")))
        self.train = train or self.train
        self.valid = valid or self.valid


def _newest(
    lines: Iterable[bytes], *, need_train: bool = True, need_valid: bool = True
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first training and validation records among ``lines`` (newest first).

    Only lines that hold the key looked for are parsed (``json.dumps`` writes it quoted).
    """
    train: dict[str, Any] | None = None
    valid: dict[str, Any] | None = None
    for line in lines:
        want_train = need_train and train is None and b'"loss"' in line
        want_valid = need_valid and valid is None and b'"valid_loss"' in line
        if want_train or want_valid:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            if want_train and "loss" in record:
                train = record
            if want_valid and "valid_loss" in record:
                valid = record
        if (train is not None or not need_train) and (valid is not None or not need_valid):
            break
    return train, valid
