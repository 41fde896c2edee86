"""How ``python -m orchestrator.status`` shows a run: the text report and the PNG of its curves."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.status.metrics import format_duration, read_metrics

if TYPE_CHECKING:
    from orchestrator.status.ranks import RankBeat

STARTUP_PHASE = "start-up"  # the phases of a rank before its first step: "start-up: rendezvous"
NAMED_RANKS = 8  # ranks named in the start-up line's smallest group
LISTED = 16  # hang suspects or stragglers listed, then a count of the rest


@dataclass
class RunStatus:
    """What ``orchestrator.status.report`` gathered about a run; ``render`` shows it."""

    run_dir: Path
    total_steps: int
    job: str
    ended: bool  # nothing more will happen without a new start
    last: dict[str, Any] | None
    last_valid: dict[str, Any] | None
    checkpoint: str
    beats: list[RankBeat]
    stale: list[RankBeat] = field(default_factory=list)
    stragglers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def progress_bar(step: int, total: int, width: int = 30) -> str:
    frac = min(1.0, step / total) if total else 0.0
    filled = int(round(frac * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}%"


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{suffix}"


def render(s: RunStatus) -> str:
    """The status as text, one ``key: value`` per line."""
    lines = [f"run: {s.run_dir}", f"job: {s.job}"]
    m = s.last
    if m is None:
        lines.append(f"progress: no step logged yet (of {s.total_steps})")
    else:
        age = time.time() - m["time"] if m.get("time") else None
        valid = s.last_valid["valid_loss"] if s.last_valid else None
        mfu = m.get("mfu")
        lines += [
            f"progress: {progress_bar(int(m['step']), s.total_steps)} "
            f"step {m['step']}/{s.total_steps}",
            f"last step: {m['step']} | loss {_fmt(m['loss'], '.4f')} | valid_loss "
            f"{_fmt(valid, '.4f')} | tokens/s {_fmt(m.get('tokens_per_s'), ',.0f')} | mfu "
            f"{_fmt(None if mfu is None else 100 * mfu, '.2f', '%')} | eta "
            f"{'done' if s.ended and m['step'] >= s.total_steps else format_duration(m.get('eta_s'))}"
            f" | logged {format_duration(age)} ago",
        ]
    lines.append(f"checkpoint: {s.checkpoint}")
    beats = f"heartbeats: {len(s.beats)} ranks, {sum(b.exited for b in s.beats)} exited"
    memory = [b for b in s.beats if b.peak_mem_gb is not None]
    if memory:
        top = max(memory, key=lambda b: b.peak_mem_gb or 0.0)
        beats += f"; peak memory {top.peak_mem_gb:.2f}GB (rank {top.rank}, the most)"
    lines.append(beats)
    if startup := startup_line(s.beats):
        lines.append(startup)
    suspects = [
        f"rank {b.rank} ({b.host}, pid {b.pid}): no heartbeat for {b.age_s:.0f}s, "
        f"in {b.phase} at step {b.step}{_gone(b)}"
        for b in s.stale[:LISTED]
    ]
    lines += _listed("hang suspects", suspects, len(s.stale))
    lines += _listed("stragglers", s.stragglers[:LISTED], len(s.stragglers))
    if s.errors:
        lines += ["last errors:", *(f"  {text}" for text in s.errors)]
    else:
        lines.append("last errors: none")
    return "\n".join(lines)


def _listed(title: str, items: list[str], total: int) -> list[str]:
    """``title: none``, or the title and one indented line per item, then how many more."""
    if not total:
        return [f"{title}: none"]
    more = [f"  ... and {total - len(items)} more"] if total > len(items) else []
    return [f"{title}:", *(f"  {text}" for text in items), *more]


def startup_line(beats: list[RankBeat]) -> str | None:
    """While any rank is starting up: how many ranks are in which phase, for how long at most.

    The largest group comes first; the ranks of the smallest (the likely laggards)
    are named, up to ``NAMED_RANKS``. None when no rank is in a start-up phase.
    """
    live = [b for b in beats if not b.exited]
    if not any(b.phase.startswith(STARTUP_PHASE) for b in live):
        return None
    groups: dict[str, list[RankBeat]] = {}
    for b in live:
        groups.setdefault(b.phase, []).append(b)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    parts = []
    for i, (phase, members) in enumerate(ordered):
        count = f"{len(members)} rank{'s' if len(members) > 1 else ''}" if i == 0 else len(members)
        longest = max(b.phase_s for b in members)
        parts.append(f'{count} in "{phase}" (up to {longest:.0f}s)')
    line = f"start-up: {', '.join(parts)}"
    if len(ordered) > 1:
        smallest = sorted(b.rank for b in ordered[-1][1])
        line += ": " + ", ".join(f"rank {r}" for r in smallest[:NAMED_RANKS])
        if len(smallest) > NAMED_RANKS:
            line += f" and {len(smallest) - NAMED_RANKS} more"
    return line


def _gone(b: RankBeat) -> str:
    """A note when the rank ran on this machine and its process no longer exists."""
    if b.host != socket.gethostname() or not Path("/proc").is_dir():
        return ""
    return "" if Path(f"/proc/{b.pid}").exists() else " (process gone)"


def plot(run_dir: Path, out: Path) -> None:
    """A PNG: loss (train and validation), learning rate, tokens/s and MFU over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = run_dir / "metrics.jsonl"
    train = read_metrics(metrics_path) if metrics_path.exists() else []
    if not train:
        raise ValueError(f"{metrics_path}: no training steps logged yet, nothing to plot")
    valid = read_metrics(metrics_path, kind="valid")
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in train], label="train")
    if valid:
        ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid")
    ax.set_title("loss")
    ax.legend()
    panels = [
        (axes[0][1], "lr", "learning rate", 1.0),
        (axes[1][0], "tokens_per_s", "tokens/s (all devices)", 1.0),
        (axes[1][1], "mfu", "MFU (%)", 100.0),
    ]
    for ax, key, title, scale in panels:
        points = [(r["step"], scale * r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True))
        ax.set_title(title)
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir.name))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
