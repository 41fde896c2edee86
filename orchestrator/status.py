"""``python -m orchestrator.status RUN_DIR [--follow] [--plot out.png]``: how is a run doing?

Reads only the run directory (and asks SLURM's ``scontrol`` about a SLURM
job); it never writes into the run directory nor signals a process, so it is
safe on a live run. It shows:

* the job state: SLURM's (``scontrol show job``) when the run directory holds
  a job id (``job_id``, or sbatch's ``logs/slurm-<id>.out``), else ``local``
  with what the heartbeats say (running, finished, stopped, not responding);
* the last logged step, loss, tokens/s, MFU and ETA (``metrics.jsonl``);
* the latest complete checkpoint and its age;
* hang suspects: ranks that have not ended and whose heartbeat
  (``heartbeats/rank_N.json``) is older than ``--stale-after``;
* stragglers: ranks whose recent busy time (the step minus its waits inside
  collectives, ``orchestrator.commwait``) is over 1.3 x the median, and ranks
  whose heartbeat step is behind the others. In lockstep training a slow rank
  holds everyone back, so all step times are equal; the others wait for the
  slow one, and it waits least. Heartbeats without a busy time (older runs)
  fall back to the step time; the step lag catches a rank that stopped;
* the last warnings and errors in ``logs/rank_N.log``.

``--follow`` refreshes with a progress bar until the run ends; ``--plot``
writes a PNG of loss (train and validation), learning rate, tokens/s and MFU.
A path that is not a run directory is one ``error:`` line and exit code 2.
This module gathers the status; ``orchestrator.status_view`` draws the text
and the plot.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from orchestrator.checkpoint import checkpoint_dir, latest_tag
from orchestrator.metrics import format_duration, read_metrics
from orchestrator.status_view import plot, render

EXIT_BAD_INPUT = 2
JOB_ID_FILES = ("job_id", "slurm_job_id")  # a plain job id, if the submitter recorded one
STRAGGLER_FACTOR = 1.3
STRAGGLER_MIN_SHARE = 0.05  # of the step time
_SLURM_OUT = re.compile(r"^slurm-(\d+)\.out$")
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")
_PROBLEM = re.compile(r"\] (WARNING|ERROR|CRITICAL) |\b\w*(Error|Exception)\b:|^Traceback|^error:")


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
    busy_s: float | None = None  # step time minus waits in collectives (orchestrator.commwait)

    @property
    def exited(self) -> bool:
        return self.phase == "exited"


@dataclass
class RunStatus:
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


def check_run_dir(run_dir: Path) -> None:
    """Raise ``ValueError`` (one line) unless ``run_dir`` is a run directory."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.yaml)")


def collect(run_dir: Path, *, stale_after_s: float | None = None) -> RunStatus:
    """Everything ``status`` shows, read from ``run_dir`` (and SLURM when it is a SLURM job)."""
    check_run_dir(run_dir)
    config = OmegaConf.load(run_dir / "config.yaml")
    total = int(OmegaConf.select(config, "train.steps", default=0))
    metrics_path = run_dir / "metrics.jsonl"
    train = read_metrics(metrics_path) if metrics_path.exists() else []
    valid = read_metrics(metrics_path, kind="valid") if metrics_path.exists() else []
    beats = read_heartbeats(run_dir)
    if stale_after_s is None:
        hang_timeout = float(OmegaConf.select(config, "faults.hang_timeout_s", default=900.0))
        stale_after_s = default_stale_after(beats, hang_timeout_s=hang_timeout)
    stale = [b for b in beats if not b.exited and b.age_s > stale_after_s]
    last = train[-1] if train else None
    job, ended = job_state(run_dir, beats, stale, last_step=_last_step(last), total=total)
    return RunStatus(
        run_dir=run_dir,
        total_steps=total,
        job=job,
        ended=ended,
        last=last,
        last_valid=valid[-1] if valid else None,
        checkpoint=describe_checkpoint(run_dir),
        beats=beats,
        stale=stale,
        stragglers=[] if ended else find_stragglers(beats),
        errors=last_errors(run_dir),
    )


def _last_step(last: dict[str, Any] | None) -> int:
    return int(last["step"]) if last else 0


def read_heartbeats(run_dir: Path) -> list[RankBeat]:
    now = time.time()
    beats = []
    for path in (run_dir / "heartbeats").glob("rank_*.json"):
        try:
            b = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        step_time, memory = b.get("step_time_s"), b.get("peak_mem_gb")
        beats.append(
            RankBeat(
                rank=int(b["rank"]),
                host=str(b.get("host", "?")),
                pid=int(b.get("pid", 0)),
                step=int(b["step"]),
                phase=str(b.get("phase", "?")),
                age_s=max(0.0, now - float(b["time"])),
                step_time_s=None if step_time is None else float(step_time),
                peak_mem_gb=None if memory is None else float(memory),
                busy_s=None if b.get("busy_s") is None else float(b["busy_s"]),
            )
        )
    return sorted(beats, key=lambda b: b.rank)


def default_stale_after(beats: list[RankBeat], *, hang_timeout_s: float) -> float:
    """Ten recent step times, at least a minute, at most the watchdog's timeout."""
    times = [b.step_time_s for b in beats if b.step_time_s]
    typical = 10 * statistics.median(times) if times else 0.0
    return min(hang_timeout_s, max(60.0, typical))


def job_state(
    run_dir: Path, beats: list[RankBeat], stale: list[RankBeat], *, last_step: int, total: int
) -> tuple[str, bool]:
    """(the job state line, whether the run has ended)."""
    job_id = find_job_id(run_dir)
    local = local_state(beats, stale, last_step=last_step, total=total)
    if job_id is None:
        if (run_dir / "job.sh").is_file():
            return f"slurm (job.sh written, no job id found: not submitted?); ranks: {local[0]}", (
                local[1]
            )
        return f"local: {local[0]}", local[1]
    state = slurm_state(job_id)
    ended = local[1] and not state.startswith(("RUNNING", "PENDING", "REQUEUED", "CONFIGURING"))
    return f"slurm job {job_id}: {state}; ranks: {local[0]}", ended


def local_state(
    beats: list[RankBeat], stale: list[RankBeat], *, last_step: int, total: int
) -> tuple[str, bool]:
    if not beats:
        return "not started (no heartbeats yet)", False
    live = [b for b in beats if not b.exited]
    if not live:
        if last_step >= total > 0:
            return "finished", True
        return f"stopped at step {last_step} of {total} (every rank exited; resumable)", True
    if len(stale) == len(live):
        quiet = min(b.age_s for b in live)
        return f"not responding: no heartbeat for {quiet:.0f}s (hung or killed)", False
    return f"running ({len(live)} of {len(beats)} ranks active)", False


def find_job_id(run_dir: Path) -> str | None:
    for name in JOB_ID_FILES:
        path = run_dir / name
        if path.is_file():
            text = path.read_text().strip().split(";")[0]
            if text.isdigit():
                return text
    ids = [
        int(m.group(1))
        for p in (run_dir / "logs").glob("slurm-*.out")
        if (m := _SLURM_OUT.match(p.name))
    ]
    return str(max(ids)) if ids else None


def slurm_state(job_id: str) -> str:
    """``RUNNING``, ``PENDING (Priority)``, ... from ``scontrol show job``; or why not known."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "state unknown (no scontrol on this machine)"
    try:
        out = subprocess.run(
            [scontrol, "show", "job", job_id], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"state unknown (scontrol: {exc})"
    fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
    if out.returncode != 0 or "JobState" not in fields:
        reason = (out.stderr or out.stdout).strip().splitlines()
        return f"state unknown (scontrol: {reason[-1] if reason else out.returncode})"
    state = fields["JobState"]
    reason = fields.get("Reason", "None")
    return state if reason in ("None", "") else f"{state} ({reason})"


def describe_checkpoint(run_dir: Path) -> str:
    tag = latest_tag(run_dir)
    if tag is None:
        return "none yet"
    age = time.time() - (checkpoint_dir(run_dir) / tag).stat().st_mtime
    return f"{tag} ({format_duration(age)} old)"


def find_stragglers(beats: list[RankBeat]) -> list[str]:
    """Ranks whose busy time (else step time) is over ``STRAGGLER_FACTOR`` x the median.

    Synchronous ranks share one step time, so the busy time (the step minus
    the waits in collectives) is what tells the slow rank: the others wait for
    it. A difference under ``STRAGGLER_MIN_SHARE`` of the step is noise.
    """
    live = [b for b in beats if not b.exited]
    out = _slow_ranks(live, busy=all(b.busy_s is not None for b in live))
    if live:
        ahead = max(b.step for b in live)
        for b in live:
            if b.step < ahead - 1:
                out.append(f"rank {b.rank} ({b.host}): at step {b.step}, others at {ahead}")
    return out


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


def last_errors(run_dir: Path, *, limit: int = 5) -> list[str]:
    """The newest warning and error lines over all ranks' logs, oldest first."""
    found: list[tuple[str, str]] = []
    for path in sorted((run_dir / "logs").glob("*.log")):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        stamp = ""
        for line in lines:
            if m := _TIMESTAMP.match(line):
                stamp = m.group(1)
            if _PROBLEM.search(line):
                found.append((stamp, f"{path.name}: {line.strip()}"))
    found.sort(key=lambda item: item[0])  # stable: a file's own order among equal stamps
    return [text for _, text in found[-limit:]]


def follow(run_dir: Path, *, interval_s: float, stale_after_s: float | None) -> int:
    """Print the status every ``interval_s`` until the run ends (Ctrl-C stops watching)."""
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""
    try:
        while True:
            status = collect(run_dir, stale_after_s=stale_after_s)
            print(f"{clear}{render(status)}", flush=True)
            if status.ended:
                return 0
            time.sleep(interval_s)
            if not clear:
                print("-" * 40)
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.status", description="Summarise a run directory."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--follow", action="store_true", help="refresh until the run ends")
    parser.add_argument("--interval", type=float, default=10.0, help="--follow refresh, seconds")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="write a PNG of the curves")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=None,
        metavar="S",
        help="a heartbeat older than S seconds marks a hang suspect "
        "(default: 10 step times, 60 s to faults.hang_timeout_s)",
    )
    args = parser.parse_args(argv)
    try:
        if args.plot is not None:
            check_run_dir(args.run_dir)
            plot(args.run_dir, args.plot)
            print(f"plot: {args.plot}")
            if not args.follow:
                print(render(collect(args.run_dir, stale_after_s=args.stale_after)))
                return 0
        if args.follow:
            return follow(args.run_dir, interval_s=args.interval, stale_after_s=args.stale_after)
        print(render(collect(args.run_dir, stale_after_s=args.stale_after)))
        return 0
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
