"""Raw documents to many token shards: one per input file, restartable, parallel.

For corpora of thousands of files (RedPajama's ``.jsonl.zst``): each shard is
made by ``orchestrator.data.preprocess.preprocess`` from one input file, or
from a group of ``--files-per-shard K`` consecutive ones. Which shards there
are, their names, and when one is finished: ``orchestrator.data.shard_plan``
(a rerun skips finished shards and remakes the others from scratch, so the
result is byte-identical to one clean run).

Parallelism: whole shards go to ``--workers`` forked processes, the largest
first; a task with a single shard to make uses the batch-parallel
``preprocess`` instead. SLURM array jobs: task i of N (``--array-task-id`` /
``--array-task-count``, else the ``SLURM_ARRAY_TASK_*`` variables) takes shards
i, i+N, i+2N, ... of the sorted list. ``--render-sbatch FILE`` writes such an
array job (``render_array_script``) instead of running: submitting it again
after a failure or a time limit makes only what is missing.

Exit status: 0; 1 when a shard failed (unreadable input, or a malformed record
under ``--strict``: that shard is not written, the others are); 2 for bad
arguments (nothing written); 130 when interrupted.

Command line::

    python -m orchestrator.data.preprocess_many --input 'cc/*.jsonl.zst' [FILE|GLOB ...] \\
        --output-dir OUT --tokenizer MODEL [--workers N] [--files-per-shard K] [--strict] \\
        [--text-split {file,lines}] [--array-task-id I --array-task-count N] [--no-progress]
    python -m orchestrator.data.preprocess_many ... --render-sbatch FILE \\
        [--array-size N] [--cpus-per-task C] [--partition P] [--time T] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from orchestrator.data.documents import TEXT_SPLITS, check_inputs, expand_inputs
from orchestrator.data.preprocess import _START_METHOD, preprocess
from orchestrator.data.preprocess_report import RaisingArgumentParser, Summary
from orchestrator.data.preprocess_sbatch import render_array_script
from orchestrator.data.shard_plan import (
    Shard,
    is_finished,
    plan_shards,
    remove_partial,
    task_shards,
)
from orchestrator.data.tokenizer import load_tokenizer
from orchestrator.runtime import dist_env


@dataclass(frozen=True)
class ShardResult:
    name: str
    input_bytes: int
    summary: Summary | None  # None when it failed
    error: str | None = None


@dataclass
class RunSummary:
    num_shards_in_all: int = 0
    num_shards: int = 0  # in this task
    task: tuple[int, int] | None = None
    made: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before this run
    failed: list[ShardResult] = field(default_factory=list)
    totals: Summary = field(default_factory=Summary)  # over the shards made now
    input_bytes_todo: int = 0  # of the shards to make
    elapsed_s: float = 0.0

    def format(self) -> str:
        task = f"task {self.task[0]} of {self.task[1]}, " if self.task else ""
        shards = (
            f"shards     {self.num_shards:,} ({task}{self.num_shards_in_all:,} in all): "
            f"{len(self.made):,} made, {len(self.skipped):,} already finished, "
            f"{len(self.failed):,} failed"
        )
        return f"{shards}\n{self.totals.format()}"  # the totals over the shards made now


@dataclass(frozen=True)
class _Job:
    shard: Shard
    prefix: Path
    tokenizer_path: Path
    workers: int
    strict: bool
    text_split: str


def _make_shard(job: _Job) -> ShardResult:
    try:
        summary = preprocess(
            job.shard.inputs,
            job.prefix,
            job.tokenizer_path,
            workers=job.workers,
            strict=job.strict,
            text_split=job.text_split,
        )
    except (ValueError, OSError) as e:  # MalformedInputError is a ValueError
        return ShardResult(job.shard.name, job.shard.input_bytes, None, str(e))
    return ShardResult(job.shard.name, job.shard.input_bytes, summary)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform == "linux":  # die with the parent, even a SIGKILLed one
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)


def _run_jobs(jobs: Sequence[_Job], workers: int) -> Generator[ShardResult, None, None]:
    """The jobs' results as they finish; in this process for one worker or one job."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield _make_shard(job)
        return
    context = multiprocessing.get_context(_START_METHOD)
    # The largest first, so that no large shard is left for last on one worker.
    by_size = sorted(jobs, key=lambda job: -job.shard.input_bytes)
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_make_shard, by_size, chunksize=1)


def preprocess_many(
    inputs: Sequence[Path],
    output_dir: Path,
    tokenizer_path: Path,
    *,
    workers: int = 1,
    files_per_shard: int = 1,
    strict: bool = False,
    text_split: str = "file",
    task: tuple[int, int] | None = None,
    on_shard: Callable[[ShardResult, RunSummary], None] | None = None,
) -> RunSummary:
    """Makes array task ``task``'s unfinished shards of ``inputs`` in ``output_dir``.

    Checks every argument before writing anything (raises ``ValueError`` or
    ``OSError``); a shard that fails is reported in ``RunSummary.failed``, not
    raised. ``on_shard`` is called after each shard made or failed.
    """
    start = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir={output_dir}: is not a directory")
    check_inputs(inputs, text_split=text_split)
    load_tokenizer(tokenizer_path)  # a missing or bad model fails here, not in every worker
    shards = plan_shards(inputs, files_per_shard=files_per_shard)
    mine = task_shards(shards, task)
    run = RunSummary(len(shards), len(mine), task)
    jobs = []
    for shard in mine:
        prefix = output_dir / shard.name
        finished = is_finished(prefix)
        remove_partial(prefix, finished=finished)
        if finished:
            run.skipped.append(shard.name)
            continue
        jobs.append(_Job(shard, prefix, tokenizer_path, 1, strict, text_split))
    if len(jobs) == 1:  # one shard to make: batch-parallel instead
        jobs = [dataclasses.replace(jobs[0], workers=workers)]
    run.input_bytes_todo = sum(job.shard.input_bytes for job in jobs)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(_run_jobs(jobs, workers)) as results:  # ends the pool now
            for result in results:
                if result.summary is None:
                    run.failed.append(result)
                else:
                    run.made.append(result.name)
                    _add(run.totals, result.summary)
                run.elapsed_s = time.perf_counter() - start
                if on_shard is not None:
                    on_shard(result, run)
    except BaseException:
        for job in jobs:  # the workers are gone: what they left is of no use
            if not is_finished(job.prefix):
                remove_partial(job.prefix)
        raise
    run.elapsed_s = run.totals.elapsed_s = time.perf_counter() - start
    return run


def _add(total: Summary, summary: Summary) -> None:
    for name in ("num_records", "num_documents", "num_tokens", "num_text_bytes", "num_empty"):
        setattr(total, name, getattr(total, name) + getattr(summary, name))
    total.num_malformed += summary.num_malformed
    total.input_bytes += summary.input_bytes
    total.bytes_read += summary.bytes_read


class Progress:
    """A line per shard made or failed (and its malformed records), then an overall one."""

    def __init__(self, stream: TextIO, *, draw: bool = True) -> None:
        self.stream = stream
        self.draw = draw  # the overall line
        self.bytes_done = 0

    def __call__(self, result: ShardResult, run: RunSummary) -> None:
        self.bytes_done += result.input_bytes
        s = result.summary
        if s is None:
            print(f"error: shard {result.name} failed: {result.error}", file=self.stream)
        else:
            for malformed in s.malformed:
                print(f"warning: {malformed}", file=self.stream)
            if s.num_malformed > len(s.malformed):
                more = s.num_malformed - len(s.malformed)
                print(f"warning: ... and {more:,} more malformed records", file=self.stream)
            print(
                f"done {result.name}: {s.num_documents:,} documents, {s.num_tokens:,} tokens,"
                f" {s.elapsed_s:.1f} s, {s.tokens_per_s:,.0f} tokens/s",
                file=self.stream,
            )
        if self.draw:
            fraction = self.bytes_done / max(1, run.input_bytes_todo)
            eta = run.elapsed_s * (1 - fraction) / max(fraction, 1e-9)
            finished = len(run.skipped) + len(run.made) + len(run.failed)
            print(
                f"progress: {finished:,}/{run.num_shards:,} shards, {run.totals.num_tokens:,}"
                f" tokens, {run.elapsed_s:.0f} s elapsed, ETA {eta:.0f} s",
                file=self.stream,
            )
        self.stream.flush()


# -- command line ---------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = RaisingArgumentParser(
        prog="python -m orchestrator.data.preprocess_many",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--input", nargs="+", required=True, metavar="FILE_OR_GLOB")
    add("--output-dir", type=Path, required=True, metavar="DIR")
    add(
        "--tokenizer",
        type=Path,
        required=True,
        metavar="MODEL",
        help="a SentencePiece .model, or a tokenizer.json (or a folder holding one)",
    )
    add("--workers", type=int, default=len(os.sched_getaffinity(0)))
    add("--files-per-shard", type=int, default=1, metavar="K")
    add("--strict", action="store_true", help="fail a shard at a malformed record")
    add("--text-split", choices=TEXT_SPLITS, default="file")
    add("--no-progress", action="store_true", help="no overall progress line")
    add("--array-task-id", type=int, metavar="I")
    add("--array-task-count", type=int, metavar="N")
    add("--render-sbatch", type=Path, metavar="FILE", help="write an array job, run nothing")
    add("--array-size", type=int, metavar="N", help="array tasks (default: one per shard)")
    add("--cpus-per-task", type=int, default=8, metavar="C")
    add("--partition")
    add("--time", metavar="T")
    add("--log-dir", type=Path, help="sbatch output (default: FILE's folder/logs)")
    return parser.parse_args(argv)


def _task(args: argparse.Namespace) -> tuple[int, int] | None:
    given = (args.array_task_id, args.array_task_count)
    if given == (None, None):
        return dist_env.array_task()
    if None in given:
        raise ValueError("--array-task-id and --array-task-count: give both or neither")
    return given


def _render(args: argparse.Namespace) -> str:
    inputs = check_inputs(expand_inputs(args.input), text_split=args.text_split)
    shards = plan_shards([source.path for source in inputs], files_per_shard=args.files_per_shard)
    num_shards = len(shards)
    script: Path = args.render_sbatch
    log_dir = args.log_dir or script.parent / "logs"
    text = render_array_script(
        args.input,
        str(args.output_dir),
        str(args.tokenizer),
        array_size=args.array_size or num_shards,
        cpus_per_task=args.cpus_per_task,
        log_dir=str(log_dir.absolute()),
        files_per_shard=args.files_per_shard,
        strict=args.strict,
        text_split=args.text_split,
        partition=args.partition,
        time_limit=args.time,
        python=sys.executable,
        workdir=str(Path.cwd()),
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    return f"wrote {script} ({num_shards:,} shards, {args.array_size or num_shards:,} tasks)"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse_args(argv)
        if args.render_sbatch is not None:
            print(_render(args))
            return 0
        run = preprocess_many(
            expand_inputs(args.input),
            args.output_dir,
            args.tokenizer,
            workers=args.workers,
            files_per_shard=args.files_per_shard,
            strict=args.strict,
            text_split=args.text_split,
            task=_task(args),
            on_shard=Progress(sys.stderr, draw=not args.no_progress),
        )
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the shards finished so far are kept", file=sys.stderr)
        return 130
    print(run.format())
    if run.failed:
        names = ", ".join(result.name for result in run.failed)
        print(f"error: {len(run.failed)} shards failed: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
