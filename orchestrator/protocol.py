"""What the launchers and the ranks agree on: exit codes, stop signals, start-up
phases, the console pipe, and how the heartbeats are read.

A leaf: it imports nothing of ours, and neither torch nor DeepSpeed. Both
sides use it: the login node and the job scripts (``orchestrator.config``
checks ``faults.inject_stall_phase`` against the phases, ``orchestrator.launch``
requeues on ``EXIT_REQUEUE``, the local launcher names the ranks behind a
hang) and every rank (``orchestrator.runtime``: the start-up guard, the
watchdog, the training loop's exit code). So login-node code never imports
``orchestrator.runtime`` to learn a number.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- requeue.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# The phases of start-up, in the order a rank goes through them.
STARTUP_PHASES = (
    "process start",
    "rendezvous",
    "deepspeed comm",
    "data indexes",
    "model build",
    "pretrained weights",
    "engine",
    "checkpoint search",
    "checkpoint load",
    "re-shard",
    "first evaluation",
    "first step",
)
STARTUP_PREFIX = "start-up: "


def phase_label(phase: str) -> str:
    """The heartbeat's phase string of start-up phase ``phase``."""
    assert phase in STARTUP_PHASES, phase
    return STARTUP_PREFIX + phase


def startup_order(label: str) -> int | None:
    """Where a heartbeat's phase string lies in start-up (None: past start-up)."""
    if not label.startswith(STARTUP_PREFIX):
        return None
    name = label[len(STARTUP_PREFIX) :]
    return STARTUP_PHASES.index(name) if name in STARTUP_PHASES else 0


# A rank's watchdog ended it: no progress for faults.hang_timeout_s, or one start-up
# phase longer than faults.startup_timeout_s.
EXIT_HANG = 3
# A checkpoint could not be written (disk full, permission, I/O error): not requeued.
EXIT_SAVE_FAILED = 4
# The watchdog's longest tick: a heartbeat is rewritten every interval plus this.
WATCHDOG_TICK_S = 1.0

# The local launcher gives rank 0 a second pipe, the console: our own log lines
# go there as well as to the rank log, so the terminal shows the banner and the
# progress lines without DeepSpeed's and torch's messages (those stay in the log).
CONSOLE_FD_VAR = "ORCHESTRATOR_CONSOLE_FD"


def torchrun_vars(
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    node_rank: int,
    num_nodes: int,
    master_addr: str,
    master_port: int,
) -> dict[str, str]:
    """torchrun's variables for one rank: what the local launcher gives its workers
    and what every rank exports for DeepSpeed (``orchestrator.runtime.dist_env``
    reads them, like any torchrun launch's)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "GROUP_RANK": str(node_rank),
        "GROUP_WORLD_SIZE": str(num_nodes),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def ignore_stop_signals() -> None:
    """After training has returned: late SIGUSR1/SIGTERM must not turn the exit code into a death.

    Python puts the default handlers back while it shuts down, so a signal in
    the last moments would kill the process. Ignoring is process-wide (blocking
    would cover one thread only) and survives the shutdown.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


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
        and newest - _alive(b) > 2 * float(b.get("interval_s", 0.0)) + WATCHDOG_TICK_S
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
