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
This module gathers the status; ``orchestrator.status_view`` draws the text
and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from orchestrator.checkpoint import checkpoint_dir, latest_tag
from orchestrator.metrics import MetricsTail, format_duration
from orchestrator.status_view import plot, render

EXIT_BAD_INPUT = 2
JOB_ID_FILES = ("job_id", "slurm_job_id")  # a plain job id, if the submitter recorded one
STRAGGLER_FACTOR = 1.3
STRAGGLER_MIN_SHARE = 0.05  # of the step time
STEP_LAG_STEPS = 2.0  # a rank more steps than this behind the others, at one time, is named
STEP_LAG_SHARE = 0.2  # plus this share of the steps carried forward by a recent mean step time
HEARTBEAT_INTERVAL_S = 5.0  # faults.heartbeat_interval_s when the config has none
BEAT_LATE_S = 2.0  # a held-back beat is written by the watchdog's tick (1 s), clocks differ
TRAINING_PHASE = "training"  # the phase of a rank in a step: "training step N"
LOG_TAIL_BYTES = 64 * 1024  # read from the end of each rank's log for its last errors
READ_THREADS = 16  # files read at once (logs, heartbeats)
_T = TypeVar("_T")
_SLURM_OUT = re.compile(r"^slurm-(\d+)\.out$")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")  # at a line's start
_PROBLEM = re.compile(r"\] (WARNING|ERROR|CRITICAL) |\b\w*(Error|Exception)\b:|^Traceback|^error:")
_PROBLEM_WORD = re.compile(r"WARNING|ERROR|CRITICAL|Error|Exception|Traceback")  # and error:


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
    time: float = 0.0  # of the beat (Unix seconds)
    phase_s: float = 0.0  # in this phase so far: since ``phase_since``, else since the beat

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


def read_heartbeats(run_dir: Path) -> list[RankBeat]:
    """Every rank's last heartbeat; a file being replaced right now is left out."""
    folder = run_dir / "heartbeats"
    try:
        names = [n for n in os.listdir(folder) if n.startswith("rank_") and n.endswith(".json")]
    except FileNotFoundError:
        return []
    now = time.time()
    beats = []
    for data in _read_all(lambda name: _read_or_none(folder / name), names):
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


@dataclass
class _LogTail:
    ident: tuple[int, int]  # (device, inode): a new file under the same name is read anew
    offset: int = 0  # the end of the last whole line read
    stamp: str = ""  # the newest timestamp read so far
    found: list[tuple[str, str]] = field(default_factory=list)  # newest problems, oldest first


class LogTails:
    """The newest warning and error lines of every ``*.log`` in a folder, each read from its tail.

    The first read of a log takes its last ``tail_bytes`` from the first whole
    line on; later reads (``--follow``) take only the bytes appended since, at
    most ``tail_bytes`` again, so a problem further back than that from a log's
    end is not seen. A log that shrank or was replaced is read anew. A last line
    still being written (no newline yet) waits for the next read.
    """

    def __init__(self, folder: Path, *, tail_bytes: int = LOG_TAIL_BYTES, limit: int = 5) -> None:
        self.folder = folder
        self.tail_bytes = tail_bytes
        self.limit = limit
        self._tails: dict[str, _LogTail] = {}

    def refresh(self) -> list[str]:
        """The newest ``limit`` problem lines over all logs, oldest first (``name: line``)."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.endswith(".log"))
        except FileNotFoundError:
            names = []
        tails = {}
        for name, got in zip(names, _read_all(self._fetch, names), strict=True):
            if got is not None:
                tails[name] = self._take(*got)
        self._tails = tails
        found = [(stamp, name, text) for name, t in tails.items() for stamp, text in t.found]
        found.sort(key=lambda item: item[0])  # stable: a file's own order among equal stamps
        return [f"{name}: {text}" for _, name, text in found[-self.limit :]]

    def _fetch(self, name: str) -> tuple[_LogTail, int, bytes] | None:
        """A log's state (new if the file is) and the bytes to read on: from where, which."""
        path = self.folder / name
        tail = self._tails.get(name)
        try:
            st = os.stat(path)
            ident = (st.st_dev, st.st_ino)
            if tail is None or tail.ident != ident or st.st_size < tail.offset:
                tail = _LogTail(ident)
            if st.st_size == tail.offset:
                return tail, tail.offset, b""
            start = max(tail.offset, st.st_size - self.tail_bytes)
            if start > tail.offset:  # bytes skipped: a whole line starts after the byte before
                start -= 1
            with path.open("rb") as f:
                f.seek(start)
                return tail, start, f.read(st.st_size - start)
        except OSError:
            return None

    def _take(self, tail: _LogTail, start: int, data: bytes) -> _LogTail:
        """Read on in ``tail`` with ``data``, the bytes from ``start`` to the end of the log."""
        first = data.find(b"\n") + 1 if start > tail.offset else 0
        end = data.rfind(b"\n") + 1
        if end <= first:  # no whole line yet: read on from the first whole one next time
            tail.offset = start + first if first else tail.offset
            return tail
        tail.offset = start + end
        found, tail.stamp = _problems(data[first:end].decode(errors="replace"), tail.stamp)
        tail.found = (tail.found + found)[-self.limit :]
        return tail


def _read_all(read: Callable[[str], _T], names: list[str]) -> list[_T]:
    """``read`` of every name, in ``READ_THREADS`` threads, each a run of the names: a cold
    disk or a parallel file system makes each file wait, and the waits overlap (reading
    releases the GIL)."""
    if len(names) < 2 * READ_THREADS:
        return [read(name) for name in names]
    size = -(-len(names) // READ_THREADS)
    runs = [names[i : i + size] for i in range(0, len(names), size)]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return [got for run in pool.map(lambda run: [read(n) for n in run], runs) for got in run]


def _problems(text: str, stamp: str) -> tuple[list[tuple[str, str]], str]:
    """The warning and error lines of ``text`` (whole lines), each with the timestamp of
    the newest line at or before it (``stamp`` before the first), and the last timestamp.
    """
    found = []
    done = 0  # timestamps are known up to here
    for start in _candidate_lines(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        if _PROBLEM.search(line):
            stamp, done = _stamp_before(text, end, done, stamp), end
            found.append((stamp, line.strip()))
    return found, _stamp_before(text, len(text), done, stamp)


def _candidate_lines(text: str) -> list[int]:
    """Where the lines start that hold a word of ``_PROBLEM``, in order.

    A search for the words (in C) picks them, so most lines are never looked at
    from Python; ``error:`` is searched apart, at line starts only (in the same
    pattern it would halve the search's speed: ``e`` is everywhere).
    """
    hits = [m.start() for m in _PROBLEM_WORD.finditer(text)]
    at = text.find("\nerror:")
    while at >= 0:
        hits.append(at + 1)
        at = text.find("\nerror:", at + 1)
    if text.startswith("error:"):
        hits.append(0)
    return sorted({text.rfind("\n", 0, hit) + 1 for hit in hits})


def _stamp_before(text: str, end: int, done: int, stamp: str) -> str:
    """The timestamp of the newest line of ``text`` that starts in ``[done, end]``, else ``stamp``."""
    pos = end
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        if start < done:
            break
        if m := _TIMESTAMP.match(text, start):
            return m.group(0)
        pos = start - 1
    return stamp


def last_errors(run_dir: Path, *, limit: int = 5, tail_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    """The newest warning and error lines over all ranks' logs, oldest first.

    Each log is read from its last ``tail_bytes`` only (``LogTails``).
    """
    return LogTails(run_dir / "logs", tail_bytes=tail_bytes, limit=limit).refresh()


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
