"""Stopping cleanly when the scheduler asks, and not hanging when a peer dies.

SLURM sends SIGUSR1 (``--signal=USR1@grace``) before a time limit and SIGTERM
before preemption. The handler only records the request; at the end of the
current step all ranks agree (one all-reduce), write a checkpoint and exit
with ``EXIT_REQUEUE`` so the launcher can requeue the job. A second signal
while saving changes nothing: the request is already recorded, and the save
is atomic anyway.

Each rank also writes a heartbeat per step and runs a watchdog: a rank that
makes no progress for ``faults.hang_timeout_s`` (a stopped or dead peer, a
collective that never completes) exits naming what it waited in and which
ranks fell behind, so the job fails in minutes instead of hanging for hours.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- requeue.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_HANG = 3
# A checkpoint could not be written (disk full, permission, I/O error): not requeued.
EXIT_SAVE_FAILED = 4


class StopRequest:
    """Records SIGUSR1/SIGTERM; ``agreed()`` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        # The worker blocks them until now: one that arrived during start-up lands here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = self.signal or signum

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled (a collective)."""
        flag = torch.tensor([1 if self.signal else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals() -> None:
    """After training has returned: late SIGUSR1/SIGTERM must not turn the exit code into a death.

    Python puts the default handlers back while it shuts down, so a signal in
    the last moments would kill the process. Ignoring is process-wide (blocking
    would cover one thread only) and survives the shutdown.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Heartbeat:
    """``RUN_DIR/heartbeats/rank_N.json``: this rank's last step, phase and time.

    Also what ``note`` last recorded: the mean of the recent step times
    (``step_time_s``) and the peak memory (``peak_mem_gb``), from which
    ``orchestrator.status`` finds stragglers. The last beat of a rank that ended
    normally has the phase ``exited``.
    """

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.dir = run_dir / "heartbeats"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank_{rank}.json"
        self.rank = rank
        self.extra: dict[str, float] = {}

    def note(self, **fields: float) -> None:
        """Fields carried by the next beats (e.g. ``step_time_s``, ``peak_mem_gb``)."""
        self.extra.update(fields)

    def beat(self, step: int, phase: str) -> None:
        record = {
            "rank": self.rank,
            "step": step,
            "phase": phase,
            "time": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **self.extra,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def laggards(self) -> list[dict[str, Any]]:
        """The ranks whose heartbeat shows the lowest step (the likely culprits of a hang)."""
        beats = []
        for f in self.dir.glob("rank_*.json"):
            try:
                beats.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        if not beats:
            return []
        lowest = min(b["step"] for b in beats)
        return sorted((b for b in beats if b["step"] == lowest), key=lambda b: b["rank"])


class Watchdog:
    """Ends this rank when it makes no progress for ``timeout_s`` (a hung peer or collective).

    The message names what this rank was doing and, from the heartbeats, the
    ranks that fell behind; the exit makes the launcher stop the whole job
    instead of leaving it hanging for hours.
    """

    def __init__(self, heartbeat: Heartbeat, *, timeout_s: float) -> None:
        self.heartbeat = heartbeat
        self.timeout_s = timeout_s
        self.step, self.phase = 0, "start-up"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def progress(self, step: int, phase: str) -> None:
        self.step, self.phase, self._last = step, phase, time.monotonic()
        self.heartbeat.beat(step, phase)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                behind = ", ".join(
                    f"rank {b['rank']} ({b['host']}, step {b['step']}, {b['phase']})"
                    for b in self.heartbeat.laggards()
                    if b["rank"] != self.heartbeat.rank
                )
                print(
                    f"HangError: rank {self.heartbeat.rank} made no progress for {idle:.0f}s "
                    f"(faults.hang_timeout_s={self.timeout_s:g}) in {self.phase} at step "
                    f"{self.step}; furthest behind: {behind or 'none seen'}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_HANG)


@dataclass
class Verdict:
    skipped: bool = False
    rollback: str = ""  # why the run must roll back to its last checkpoint ("" when not)


class NumericsGuard:
    """The OPT/metaseq policy on bad steps.

    A step whose loss or gradient norm is NaN/Inf is not applied (DeepSpeed's
    ZeRO-1/2 optimiser and fp16 loss scaling skip it) and is counted here.
    After ``max_consecutive_skips`` such steps in a row, or a loss above
    ``spike_factor`` times the mean of the last ``spike_window`` good steps,
    the run rolls back to its last checkpoint and moves on past the batches
    that caused it.
    """

    def __init__(
        self, *, max_consecutive_skips: int, spike_factor: float, spike_window: int
    ) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.skipped_total = 0
        self.consecutive = 0

    def observe(self, loss: float, *, skipped: bool) -> Verdict:
        if skipped or not math.isfinite(loss):
            self.skipped_total += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive_skips:
                return Verdict(True, f"{self.consecutive} consecutive non-finite steps")
            return Verdict(skipped=True)
        self.consecutive = 0
        full = len(self.recent) == self.recent.maxlen
        if self.spike_factor and full:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return Verdict(False, f"loss spike {loss:.4f} > {self.spike_factor:g} x {mean:.4f}")
        self.recent.append(loss)
        return Verdict()

    def after_rollback(self) -> None:
        self.consecutive = 0
        self.recent.clear()
