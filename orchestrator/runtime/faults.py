"""Stopping cleanly when the scheduler asks, and not hanging when a peer dies.

SLURM sends SIGUSR1 (``--signal=USR1@grace``) before a time limit and SIGTERM
before preemption. The handler only records the request; at the end of the
current step all ranks agree (one all-reduce), write a checkpoint and exit
with ``EXIT_REQUEUE`` so the launcher can requeue the job. A second signal
while saving changes nothing: the request is already recorded, and the save
is atomic anyway. (In start-up, before the first step, a signal ends the rank
at once: ``orchestrator.runtime.startup``.)

Each rank writes a heartbeat (at most every ``faults.heartbeat_interval_s``
in training, at once on any other phase change) and runs a watchdog from
process start: a rank that stays in one start-up phase longer than
``faults.startup_timeout_s``, or makes no progress in training for
``faults.hang_timeout_s`` (a stopped or dead peer, a collective that never
completes), exits naming what it waited in; rank 0 alone reads every
heartbeat to name the ranks that fell behind, so a hang of 2,048 ranks costs
2,048 reads, not 2,048 squared. The job fails in minutes instead of hanging
for hours.
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
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.protocol import (
    EXIT_HANG,
    STOP_SIGNALS,
    WATCHDOG_TICK_S,
    Laggards,
    describe_laggards,
    laggards,
)

_TRAINING = "training step"  # the phase prefix whose beats are rate-limited


class StopRequest:
    """Records SIGUSR1/SIGTERM; ``agreed()`` tells every rank whether any rank got one.

    Made when training begins: until then ``startup.StartupSignals`` holds the
    signals (blocked), and one that arrived as start-up ended lands here.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
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


class Heartbeat:
    """``RUN_DIR/heartbeats/rank_N.json``: this rank's last step, phase and time.

    Also what ``note`` last recorded: the mean of the recent step times
    (``step_time_s``), busy time and peak memory, from which
    ``orchestrator.status.report`` finds stragglers, and ``phase_since``, when the
    current phase began. The last beat of a rank that ended normally has the
    phase ``exited``.

    Beats in training (phase ``training step N``) are written at most every
    ``interval_s``; the latest one waits in memory and ``flush_due`` (the
    watchdog's tick) writes it once the interval has passed, so the file lags
    the rank by at most ``interval_s`` plus a tick. Any other phase change is
    written at once, and repeated every interval while the phase lasts.

    ``alive`` is when the file was last written: the watchdog thread rewrites
    it every interval whatever the main thread does, so a rank waiting in a
    collective stays alive while a frozen one (SIGSTOP, a wedged host, a
    kernel stuck in the driver) goes quiet -- the culprit of a hang, even when
    the race of a collective's last message left its step ahead of its peers'.
    """

    def __init__(self, run_dir: Path, rank: int, *, interval_s: float = 5.0) -> None:
        self.dir = run_dir / "heartbeats"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"rank_{rank}.json"
        self.rank = rank
        self.interval_s = interval_s
        self.extra: dict[str, float] = {}
        self.phase_since = time.time()
        self.writes = 0
        self._kind: str | None = None
        self._pending: dict[str, Any] | None = None
        self._last: dict[str, Any] | None = None
        self._written_at = -math.inf
        self._lock = threading.Lock()

    def note(self, **fields: float) -> None:
        """Fields carried by the next beats (e.g. ``step_time_s``, ``peak_mem_gb``)."""
        self.extra.update(fields)

    def beat(self, step: int, phase: str) -> None:
        kind = _TRAINING if phase.startswith(_TRAINING) else phase
        now = time.time()
        changed = kind != self._kind
        if changed:
            self._kind, self.phase_since = kind, now
        record = {
            "rank": self.rank,
            "step": step,
            "phase": phase,
            "time": now,
            "phase_since": self.phase_since,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "interval_s": self.interval_s,
            **self.extra,
        }
        with self._lock:
            self._pending = record
            if changed or time.monotonic() - self._written_at >= self.interval_s:
                self._write()

    def flush_due(self) -> None:
        """Once an interval has passed since the last write: write the beat held back by
        the rate limit, or, in a phase outside training (start-up, a save, an
        evaluation), the same beat again with the time now, so that a long phase is
        not mistaken for a dead rank. In training a rank that stops stepping keeps
        its beat's ``time`` (the age is the time since its last step began) and only
        ``alive`` moves on.
        """
        with self._lock:
            if time.monotonic() - self._written_at < self.interval_s:
                return
            if self._pending is not None:
                if self._kind != _TRAINING:
                    self._pending["time"] = time.time()
                self._write()
            elif self._last is not None and self._kind != "exited":
                # Nothing new: the same beat, still alive. In training its ``time``
                # stays the step's, outside training the phase is still going on.
                self._pending = dict(self._last)
                if self._kind != _TRAINING:
                    self._pending["time"] = time.time()
                self._write()

    def _write(self) -> None:
        assert self._pending is not None
        self._pending["alive"] = time.time()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._pending))
        os.replace(tmp, self.path)
        self._last, self._pending = self._pending, None
        self._written_at = time.monotonic()
        self.writes += 1

    def laggards(self, *, world_size: int, since: float) -> Laggards:
        return laggards(self.dir, world_size=world_size, since=since)


class Watchdog:
    """Ends this rank when it is stuck: in one start-up phase, or without training progress.

    From process start to the end of the first step (``end_startup``) the
    limit is ``startup_timeout_s`` per phase; then ``timeout_s`` between
    calls of ``progress``. The message names the phase, this rank and,
    on the ``reporter`` rank, the ranks that fell behind; the exit makes the
    launcher stop the whole job instead of leaving it hanging for hours.
    """

    def __init__(
        self,
        heartbeat: Heartbeat,
        *,
        timeout_s: float,
        startup_timeout_s: float,
        world_size: int,
        reporter: bool,
    ) -> None:
        self.heartbeat = heartbeat
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self.world_size, self.reporter = world_size, reporter
        self.step, self.phase = 0, "start-up: process start"
        self.in_startup = True
        self.started_at = time.time()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def progress(self, step: int, phase: str) -> None:
        """Entering ``phase`` (a start-up phase, a training step, a save...): the clock restarts."""
        self.step, self.phase, self._last = step, phase, time.monotonic()
        self.heartbeat.beat(step, phase)

    def end_startup(self) -> None:
        self.in_startup = False

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(
            min(WATCHDOG_TICK_S, self.timeout_s / 4, self.startup_timeout_s / 4)
        ):
            self.heartbeat.flush_due()
            limit = self.startup_timeout_s if self.in_startup else self.timeout_s
            idle = time.monotonic() - self._last
            if idle > limit:
                print(self._message(idle), file=sys.stderr, flush=True)
                os._exit(EXIT_HANG)

    def _message(self, idle: float) -> str:
        rank = self.heartbeat.rank
        if self.in_startup:
            head = (
                f"StartupTimeoutError: rank {rank} spent {idle:.0f}s in {self.phase!r} "
                f"(faults.startup_timeout_s={self.startup_timeout_s:g})"
            )
        else:
            head = (
                f"HangError: rank {rank} made no progress for {idle:.0f}s "
                f"(faults.hang_timeout_s={self.timeout_s:g}) in {self.phase} at step {self.step}"
            )
        if not self.reporter:
            return f"{head}; rank 0 names the ranks behind"
        found = self.heartbeat.laggards(world_size=self.world_size, since=self.started_at - 60)
        return f"{head}; {describe_laggards(found, skip=rank)}"
