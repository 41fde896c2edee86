"""The ranks of a run as their heartbeats tell it: who is behind, who is slow.

``read_heartbeats`` reads every ``heartbeats/rank_N.json``; ``find_stragglers``
names ranks whose busy time is over the others' and ranks whose step, carried
to one time, is behind (training heartbeats are rate-limited, see
``orchestrator.runtime.faults.Heartbeat``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.status.logs import read_all

STRAGGLER_FACTOR = 1.3
STRAGGLER_MIN_SHARE = 0.05  # of the step time
STEP_LAG_STEPS = 2.0  # a rank more steps than this behind the others, at one time, is named
STEP_LAG_SHARE = 0.2  # plus this share of the steps carried forward by a recent mean step time
HEARTBEAT_INTERVAL_S = 5.0  # faults.heartbeat_interval_s when the config has none
BEAT_LATE_S = 2.0  # a held-back beat is written by the watchdog's tick (1 s), clocks differ
TRAINING_PHASE = "training"  # the phase of a rank in a step: "training step N"


@dataclass
class RankBeat:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    age_s: float
    step_time_s: float | None
    peak_mem_gb: float | None
    busy_s: float | None = (
        None  # step time minus waits in collectives (orchestrator.runtime.commwait)
    )
    time: float = 0.0  # of the beat (Unix seconds)
    phase_s: float = 0.0  # in this phase so far: since ``phase_since``, else since the beat

    @property
    def exited(self) -> bool:
        return self.phase == "exited"


def read_heartbeats(run_dir: Path) -> list[RankBeat]:
    """Every rank's last heartbeat; a file being replaced right now is left out."""
    folder = run_dir / "heartbeats"
    try:
        names = [n for n in os.listdir(folder) if n.startswith("rank_") and n.endswith(".json")]
    except FileNotFoundError:
        return []
    now = time.time()
    beats = []
    for data in read_all(lambda name: _read_or_none(folder / name), names):
        try:
            beats.append(_beat(json.loads(data or b""), now=now))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(beats, key=lambda b: b.rank)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _beat(b: dict[str, Any], *, now: float) -> RankBeat:
    step_time, memory, busy = b.get("step_time_s"), b.get("peak_mem_gb"), b.get("busy_s")
    beat_time = float(b["time"])
    since = b.get("phase_since")
    return RankBeat(
        rank=int(b["rank"]),
        host=str(b.get("host", "?")),
        pid=int(b.get("pid", 0)),
        step=int(b["step"]),
        phase=str(b.get("phase", "?")),
        age_s=max(0.0, now - beat_time),
        step_time_s=None if step_time is None else float(step_time),
        peak_mem_gb=None if memory is None else float(memory),
        busy_s=None if busy is None else float(busy),
        time=beat_time,
        phase_s=max(0.0, now - (beat_time if since is None else float(since))),
    )


def find_stragglers(
    beats: list[RankBeat], *, heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
) -> list[str]:
    """Ranks whose busy time (else step time) is over ``STRAGGLER_FACTOR`` x the median,
    then ranks behind the others (``lagging_ranks``).

    Synchronous ranks share one step time, so the busy time (the step minus
    the waits in collectives) is what tells the slow rank: the others wait for
    it. A difference under ``STRAGGLER_MIN_SHARE`` of the step is noise.
    """
    live = [b for b in beats if not b.exited]
    out = _slow_ranks(live, busy=all(b.busy_s is not None for b in live))
    return out + lagging_ranks(live, heartbeat_interval_s=heartbeat_interval_s)


def lagging_ranks(live: list[RankBeat], *, heartbeat_interval_s: float) -> list[str]:
    """Ranks more than ``STEP_LAG_STEPS`` behind the leading rank, both estimated at one time.

    A training rank beats at most every ``heartbeat_interval_s``, so beats are
    up to an interval apart; each training rank's step is carried forward from
    its beat to the newest beat by its step time (the median's when it has
    none). A rank quiet for longer than an interval, ``BEAT_LATE_S`` and two
    steps has not gone on (it would have beaten), nor has a rank outside
    training (start-up, evaluation, a checkpoint save): they keep their step. The step time is a
    recent mean, so the slack grows by ``STEP_LAG_SHARE`` of the steps carried.
    """
    if len(live) < 2:
        return []
    known = [b.step_time_s for b in live if b.step_time_s]
    typical = statistics.median(known) if known else None
    now = max(b.time for b in live)
    interval = heartbeat_interval_s
    at = {
        b.rank: _step_at(b, now, step_time=b.step_time_s or typical, interval_s=interval)
        for b in live
    }
    lead = max(live, key=lambda b: at[b.rank][0])
    top, top_carried = at[lead.rank]
    out = []
    for b in live:
        step, carried = at[b.rank]
        lag = top - step
        if lag > STEP_LAG_STEPS + STEP_LAG_SHARE * max(top_carried, carried):
            out.append(
                f"rank {b.rank} ({b.host}): at step {b.step}, about {lag:.0f} steps behind "
                f"the others (rank {lead.rank} at step {lead.step})"
            )
    return out


def _step_at(
    b: RankBeat, now: float, *, step_time: float | None, interval_s: float
) -> tuple[float, float]:
    """(this rank's step estimated at ``now``, the steps of it carried forward from its beat)."""
    quiet_s = now - b.time
    training = b.phase.startswith(TRAINING_PHASE)
    if not step_time or not training or quiet_s > interval_s + BEAT_LATE_S + 2 * step_time:
        return float(b.step), 0.0
    return b.step + quiet_s / step_time, quiet_s / step_time


def _slow_ranks(live: list[RankBeat], *, busy: bool) -> list[str]:
    values = {b.rank: (b.busy_s if busy else b.step_time_s) or 0.0 for b in live}
    if len([v for v in values.values() if v]) < 2:
        return []
    median = statistics.median(values.values())
    step = max(b.step_time_s or 0.0 for b in live)
    out = []
    for b in live:
        value = values[b.rank]
        if value > STRAGGLER_FACTOR * median and value - median > STRAGGLER_MIN_SHARE * step:
            step_time = b.step_time_s or 0.0
            what = (
                f"busy {value:.3f}s of a {step_time:.3f}s step"
                if busy
                else f"{value:.3f}s per step"
            )
            out.append(
                f"rank {b.rank} ({b.host}): {what}, {value / max(median, 1e-9):.1f} x the "
                f"median {median:.3f}s"
            )
    return out
