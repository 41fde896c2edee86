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
  collectives, ``orchestrator.runtime.commwait``) is over 1.3 x the median, and ranks
  whose step is behind the others at one common time. In lockstep training a
  slow rank holds everyone back, so all step times are equal; the others wait
  for the slow one, and it waits least. Heartbeats without a busy time (older
  runs) fall back to the step time; the step lag catches a rank that stopped.
  A training rank beats at most every ``faults.heartbeat_interval_s``, so its
  step is carried forward from its beat by the step time before comparing;
* while ranks start up, how many are in which start-up phase, for how long;
* the last warnings and errors in ``logs/rank_N.log``, read from the last
  ``LOG_TAIL_BYTES`` of each log.

It reads the tails of the logs and of ``metrics.jsonl``, not the whole files,
so gathering the status takes about a second at 2,048 ranks, whatever the
logs' size (``bench/status_scale.py``).
``--follow`` refreshes with a progress bar until the run ends; between
refreshes it keeps what it read (``StatusReader``), so a refresh reads the
heartbeats and only the bytes appended to the logs and metrics since the last
one. ``--plot`` writes a PNG of loss (train and validation), learning rate,
tokens/s and MFU (from the whole of ``metrics.jsonl``).
A path that is not a run directory is one ``error:`` line and exit code 2.
This module gathers the status; ``orchestrator.status.view`` draws the text
and the plot.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from orchestrator.state.run_files import checkpoint_dir, latest_tag
from orchestrator.status.logs import LogTails
from orchestrator.status.metrics import MetricsTail, format_duration
from orchestrator.status.ranks import (
    HEARTBEAT_INTERVAL_S,
    RankBeat,
    find_stragglers,
    read_heartbeats,
)
from orchestrator.status.view import RunStatus, plot, render

EXIT_BAD_INPUT = 2
JOB_ID_FILES = ("job_id", "slurm_job_id")  # a plain job id, if the submitter recorded one
_SLURM_OUT = re.compile(r"^slurm-(\d+)\.out$")


def check_run_dir(run_dir: Path) -> None:
    """Raise ``ValueError`` (one line) unless ``run_dir`` is a run directory."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such directory")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.yaml)")


@dataclass(frozen=True)
class Settings:
    """What ``status`` takes from the run's ``config.yaml``."""

    total_steps: int
    hang_timeout_s: float
    heartbeat_interval_s: float

    @classmethod
    def read(cls, run_dir: Path) -> Settings:
        config = OmegaConf.load(run_dir / "config.yaml")
        return cls(
            total_steps=int(OmegaConf.select(config, "train.steps", default=0)),
            hang_timeout_s=float(OmegaConf.select(config, "faults.hang_timeout_s", default=900.0)),
            heartbeat_interval_s=float(
                OmegaConf.select(
                    config, "faults.heartbeat_interval_s", default=HEARTBEAT_INTERVAL_S
                )
            ),
        )


class StatusReader:
    """Reads a run directory's status; kept across ``--follow`` refreshes, it rereads little.

    It keeps the settings (until ``config.yaml`` changes), the last records of
    ``metrics.jsonl`` and each log's last problems, and reads on from where the
    last refresh stopped; the heartbeats (one small file per rank) are read
    whole every time.
    """

    def __init__(self, run_dir: Path, *, stale_after_s: float | None = None) -> None:
        check_run_dir(run_dir)
        self.run_dir = run_dir
        self.stale_after_s = stale_after_s
        self.metrics = MetricsTail(run_dir / "metrics.jsonl")
        self.logs = LogTails(run_dir / "logs")
        self._settings: tuple[int, Settings] | None = None  # (config.yaml's mtime, settings)

    def settings(self) -> Settings:
        mtime = (self.run_dir / "config.yaml").stat().st_mtime_ns
        if self._settings is None or self._settings[0] != mtime:
            self._settings = (mtime, Settings.read(self.run_dir))
        return self._settings[1]

    def collect(self) -> RunStatus:
        """Everything ``status`` shows, read from the run directory (and SLURM for a SLURM job)."""
        check_run_dir(self.run_dir)
        settings = self.settings()
        self.metrics.refresh()
        beats = read_heartbeats(self.run_dir)
        stale_after_s = self.stale_after_s
        if stale_after_s is None:
            stale_after_s = default_stale_after(
                beats,
                hang_timeout_s=settings.hang_timeout_s,
                heartbeat_interval_s=settings.heartbeat_interval_s,
            )
        # The longest silent first: in a hang, the rank that stopped first is the likely culprit.
        stale = sorted((b for b in beats if not b.exited and b.age_s > stale_after_s), key=_silence)
        last, total = self.metrics.train, settings.total_steps
        job, ended = job_state(self.run_dir, beats, stale, last_step=_last_step(last), total=total)
        interval_s = settings.heartbeat_interval_s
        return RunStatus(
            run_dir=self.run_dir,
            total_steps=total,
            job=job,
            ended=ended,
            last=last,
            last_valid=self.metrics.valid,
            checkpoint=describe_checkpoint(self.run_dir),
            beats=beats,
            stale=stale,
            stragglers=[] if ended else find_stragglers(beats, heartbeat_interval_s=interval_s),
            errors=self.logs.refresh(),
        )


def collect(run_dir: Path, *, stale_after_s: float | None = None) -> RunStatus:
    """Everything ``status`` shows, read from ``run_dir`` (and SLURM when it is a SLURM job)."""
    return StatusReader(run_dir, stale_after_s=stale_after_s).collect()


def _silence(b: RankBeat) -> tuple[float, int]:
    return -b.age_s, b.rank


def _last_step(last: dict[str, Any] | None) -> int:
    return int(last["step"]) if last else 0


def default_stale_after(
    beats: list[RankBeat],
    *,
    hang_timeout_s: float,
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
) -> float:
    """Ten step times or three beat intervals, at least a minute, at most the watchdog's timeout."""
    times = [b.step_time_s for b in beats if b.step_time_s]
    typical = 10 * statistics.median(times) if times else 0.0
    return min(hang_timeout_s, max(60.0, typical, 3 * heartbeat_interval_s))


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


def follow(run_dir: Path, *, interval_s: float, stale_after_s: float | None) -> int:
    """Print the status every ``interval_s`` until the run ends (Ctrl-C stops watching)."""
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""
    reader = StatusReader(run_dir, stale_after_s=stale_after_s)
    try:
        while True:
            status = reader.collect()
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
