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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.runtime.startup import EXIT_REQUEUE as EXIT_REQUEUE
from orchestrator.runtime.startup import STOP_SIGNALS as STOP_SIGNALS
from orchestrator.runtime.startup import startup_order

EXIT_HANG = 3
# A checkpoint could not be written (disk full, permission, I/O error): not requeued.
EXIT_SAVE_FAILED = 4
_TRAINING = "training step"  # the phase prefix whose beats are rate-limited
_TICK_S = 1.0  # the watchdog's longest tick: a beat is rewritten every interval plus this


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


@dataclass
class Laggards:
    """What the heartbeats say about a hang: who went quiet, who is behind, who never beat."""

    quiet: list[dict[str, Any]]  # alive once, then silent while the others kept beating
    behind: list[dict[str, Any]]  # the earliest start-up phase, else the lowest step
    missing: list[int]  # no beat in this start


def laggards(beat_dir: Path, *, world_size: int, since: float) -> Laggards:
    """The likely culprits of a hang, from one read of each rank's heartbeat.

    Quiet: a rank whose ``alive`` stamp is more than two of its own beat
    intervals (plus a watchdog tick) older than the newest one seen -- its
    process is frozen or gone while its peers still wait in a collective.
    Furthest behind, among the others: the earliest start-up phase, else the
    lowest step. A beat older than ``since`` (a unix time) is a previous
    start's: that rank has not written one in this start.
    """
    beats = {}
    for f in beat_dir.glob("rank_*.json"):
        try:
            b = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if float(b.get("time", 0)) >= since:
            beats[int(b["rank"])] = b
    missing = [r for r in range(world_size) if r not in beats]
    if not beats:
        return Laggards([], [], missing)
    newest = max(_alive(b) for b in beats.values())
    quiet = [
        b
        for _, b in sorted(beats.items())
        if b.get("phase") != "exited"
        and newest - _alive(b) > 2 * float(b.get("interval_s", 0.0)) + _TICK_S
        and "interval_s" in b
    ]
    for b in quiet:
        b["silent_s"] = newest - _alive(b)
    rest = {r: b for r, b in beats.items() if b not in quiet}
    if not rest:
        return Laggards(quiet, [], missing)
    lowest = min(_progress_key(b) for b in rest.values())
    behind = [b for r, b in sorted(rest.items()) if _progress_key(b) == lowest]
    return Laggards(quiet, behind, missing)


def describe_laggards(found: Laggards, *, skip: int = -1) -> str:
    """``not responding: rank 1 (...); furthest behind: rank 2 (host, step 0, phase), ...``."""

    def named(group: list[dict[str, Any]], extra: bool = False) -> str:
        shown = [b for b in group if b["rank"] != skip]
        text = ", ".join(
            f"rank {b['rank']} ({b.get('host', '?')}, step {b['step']}, {b['phase']}"
            + (f", silent {b['silent_s']:.0f}s" if extra else "")
            + ")"
            for b in shown[:8]
        )
        return text + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")

    parts = []
    if found.quiet:
        parts.append(f"not responding (the others kept beating): {named(found.quiet, True)}")
    parts.append(f"furthest behind: {named(found.behind) or 'none seen'}")
    text = "; ".join(parts)
    if found.missing:
        text += f"; no heartbeat from {len(found.missing)} rank(s): "
        text += ", ".join(str(r) for r in found.missing[:8])
        text += " ..." if len(found.missing) > 8 else ""
    return text


def _alive(beat: dict[str, Any]) -> float:
    return float(beat.get("alive", beat.get("time", 0.0)))


def _progress_key(beat: dict[str, Any]) -> tuple[int, int]:
    order = startup_order(str(beat.get("phase", "")))
    return (0, order) if order is not None else (1, int(beat["step"]))


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
        while not self._stop.wait(min(1.0, self.timeout_s / 4, self.startup_timeout_s / 4)):
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
