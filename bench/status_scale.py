"""``python -m orchestrator.status`` on a 2,048-rank run: one status and a ``--follow`` refresh.

A synthetic run folder is written for N ranks: ``config.yaml`` (the schema's
defaults with ``train.steps`` set, as a real run writes it), one heartbeat per
rank, staggered over the heartbeat interval as rate-limited beats are, with one
rank silent for ``STALE_AGE_S``; ``logs/rank_N.log`` of a given size in our log
format (progress lines, a few warnings, an error at the very start that lies
beyond the tail window); ``metrics.jsonl`` with M rows as ``MetricsWriter``
writes them (an evaluation row every ``EVAL_EVERY`` rows, the last one
``EVAL_EVERY // 2`` rows before the end). The log bytes are real: a block of
lines repeated up to the size, then a fresh tail with the newest lines.

Then it times, in this process:

- ``collect`` + ``render`` on a warm page cache (best of ``--repeat``), and on
  a cold one after ``echo 3 > /proc/sys/vm/drop_caches`` (root only; else n/a;
  best and worst of three);
- a ``--follow`` refresh: the run appends a few lines to every log, rewrites
  every heartbeat and appends metrics rows (what 10 s of a run writes), then
  one refresh of the same ``StatusReader`` (best and worst of ``--repeat``);
- the command itself (``python -m orchestrator.status DIR``, warm), most of it
  importing torch (``orchestrator.state.checkpoint`` and ``orchestrator.status.metrics``
  import it).

It checks that the stale rank is named as a hang suspect, that a warning near
the end of a log is among the last errors and that the error at the start of
the logs is not. It prints a table and the growth per doubling of ranks and
of log size.

    python bench/status_scale.py --ranks 512 1024 2048 --log-kib 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from orchestrator.config.schema import Config, FaultsConfig  # noqa: E402
from orchestrator.status.metrics import StepMetrics, progress_line  # noqa: E402
from orchestrator.status.report import StatusReader  # noqa: E402
from orchestrator.status.view import render  # noqa: E402

TOTAL_STEPS = 250_000
STEP = 120_000  # where the run is
STEP_TIME_S = 1.2
HEARTBEAT_INTERVAL_S = FaultsConfig().heartbeat_interval_s  # what config.yaml says
STALE_AGE_S = 300.0  # the stale rank's last beat
EVAL_EVERY = 1_000  # metrics rows between evaluation rows
RANKS_PER_NODE = 8
RANK = "@RANK@"  # placeholder in the log templates
START_ERROR = "ERROR only at the start of the log"
TAIL_WARNING = "WARNING data: shard read took"


def host(rank: int) -> str:
    return f"node{rank // RANKS_PER_NODE:03d}"


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def write_config(run_dir: Path, *, total_steps: int = TOTAL_STEPS) -> None:
    cfg = OmegaConf.structured(Config)
    cfg.train.steps = total_steps
    cfg.train.global_batch_size = 2048
    cfg.train.lr = 1.5e-4
    cfg.run.dir = str(run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))


def write_heartbeats(
    run_dir: Path, *, num_ranks: int, now: float, stale_rank: int | None, seed: int = 0
) -> None:
    """Beats staggered over one interval (rate-limited), ``stale_rank`` silent for minutes."""
    folder = run_dir / "heartbeats"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for rank in range(num_ranks):
        age = rng.uniform(0.0, HEARTBEAT_INTERVAL_S)
        if rank == stale_rank:
            age = STALE_AGE_S
        step = STEP - round(age / STEP_TIME_S)
        record = {
            "rank": rank,
            "step": step,
            "phase": f"training step {step + 1}",
            "time": now - age,
            "host": host(rank),
            "pid": 10_000 + rank,
            "step_time_s": STEP_TIME_S,
            "busy_s": STEP_TIME_S * rng.uniform(0.85, 0.95),
            "peak_mem_gb": 61.0 + rng.uniform(0.0, 2.0),
            "phase_since": now - age,
        }
        (folder / f"rank_{rank}.json").write_text(json.dumps(record))


def _step_metrics(step: int, t: float) -> StepMetrics:
    return StepMetrics(
        step=step,
        loss=2.0 + 1.0 / math.sqrt(step + 1),
        lr=1.5e-4,
        grad_norm=0.31,
        tokens_per_s=2048 * 2048 / STEP_TIME_S,
        consumed_tokens=step * 2048 * 2048,
        step_time_s=STEP_TIME_S,
        total_steps=TOTAL_STEPS,
        tokens_per_s_per_device=2048 / STEP_TIME_S,
        tflops_per_device=171.3,
        mfu=0.55,
        peak_mem_gb=62.1,
        eta_s=(TOTAL_STEPS - step) * STEP_TIME_S,
        time=t,
    )


def _log_lines(first_step: int, last_step: int, *, now: float) -> str:
    """Our log format for steps ``first_step..last_step`` ending at ``now``, with warnings."""
    lines = []
    for step in range(first_step, last_step + 1):
        t = now - (last_step - step) * STEP_TIME_S
        m = _step_metrics(step, t)
        lines.append(f"{stamp(t)} [rank {RANK}] INFO {progress_line(m, total_steps=TOTAL_STEPS)}")
        if step % 97 == 0 or step == last_step - 5:
            lines.append(f"{stamp(t)} [rank {RANK}] {TAIL_WARNING} 2.3s (slow file system?)")
    return "\n".join(lines) + "\n"


def write_logs(
    run_dir: Path, *, num_ranks: int, log_bytes: int, now: float, stale_rank: int | None
) -> None:
    """Each log: an error line, a repeated block of older lines, then the newest 128 KiB."""
    folder = run_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    per_line = len(_log_lines(STEP, STEP, now=now))
    tail_steps = 128 * 1024 // per_line
    tail = _log_lines(STEP - tail_steps, STEP, now=now).encode()
    stale_tail = _log_lines(STEP - tail_steps, STEP, now=now - STALE_AGE_S).encode()
    block = _log_lines(1000, 1000 + 64 * 1024 // per_line, now=now - 86_400).encode()
    head = f"{stamp(now - 90_000)} [rank {RANK}] {START_ERROR}\n".encode()
    for rank in range(num_ranks):
        name = f"{rank} {host(rank)}".encode()
        end = (stale_tail if rank == stale_rank else tail).replace(RANK.encode(), name)
        start = head.replace(RANK.encode(), name)
        body = block.replace(RANK.encode(), name)
        fill = max(0, log_bytes - len(start) - len(end))
        middle = (body * (fill // len(body) + 1))[:fill]
        middle = middle[: middle.rfind(b"\n") + 1]
        (folder / f"rank_{rank}.log").write_bytes(start + middle + end)


def write_metrics(run_dir: Path, *, rows: int, now: float) -> None:
    """``rows`` training rows up to ``STEP`` and an evaluation row every ``EVAL_EVERY`` rows."""
    out = []
    for i in range(rows):
        step = STEP - rows + 1 + i
        out.append(json.dumps(asdict(_step_metrics(step, now - (STEP - step) * STEP_TIME_S))))
        if (rows - i) % EVAL_EVERY == EVAL_EVERY // 2:
            out.append(json.dumps({"step": step, "valid_loss": 2.1, "valid_ppl": 8.17}))
    (run_dir / "metrics.jsonl").write_text("\n".join(out) + "\n")


def make_run(
    run_dir: Path,
    *,
    num_ranks: int,
    log_bytes: int,
    metrics_rows: int,
    stale_rank: int | None = None,
    now: float | None = None,
) -> None:
    """A synthetic run folder that ``orchestrator.status.report`` reads as a live run."""
    now = time.time() if now is None else now
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir)
    write_heartbeats(run_dir, num_ranks=num_ranks, now=now, stale_rank=stale_rank)
    write_logs(run_dir, num_ranks=num_ranks, log_bytes=log_bytes, now=now, stale_rank=stale_rank)
    write_metrics(run_dir, rows=metrics_rows, now=now)


def drop_caches() -> bool:
    """Empty the page cache (root only); whether it could."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed_status(reader: StatusReader) -> tuple[float, str]:
    start = time.perf_counter()
    text = render(reader.collect())
    return time.perf_counter() - start, text


def advance(run_dir: Path, *, num_ranks: int, stale_rank: int) -> None:
    """What 10 s of the run writes: lines in every log, new heartbeats, metrics rows."""
    now = time.time()
    lines = _log_lines(STEP + 1, STEP + 8, now=now)
    for rank in range(num_ranks):
        if rank != stale_rank:
            with (run_dir / "logs" / f"rank_{rank}.log").open("a") as f:
                f.write(lines.replace(RANK, f"{rank} {host(rank)}"))
    write_heartbeats(run_dir, num_ranks=num_ranks, now=now, stale_rank=stale_rank, seed=1)
    with (run_dir / "metrics.jsonl").open("a") as f:
        for step in range(STEP + 1, STEP + 9):
            f.write(json.dumps(asdict(_step_metrics(step, now))) + "\n")


def check(text: str, *, stale_rank: int) -> None:
    """Exit with one line unless the stale rank alone is a hang suspect and the right
    warnings are the last errors."""
    suspects = text.split("hang suspects:")[1].split("stragglers:")[0]
    errors = text.split("last errors:")[1]
    problems = []
    named = re.findall(r"^  rank (\d+) \(", suspects, flags=re.M)
    if named != [str(stale_rank)]:
        problems.append(f"hang suspects {named[:4]}..., not the stale rank {stale_rank} alone")
    if TAIL_WARNING not in errors:
        problems.append("the newest warnings not found")
    if START_ERROR in errors:
        problems.append("an error beyond the tail window shown")
    if problems:
        raise SystemExit(f"error: {'; '.join(problems)}\n{text}")


def command_s(*args: str) -> float:
    """Wall time of ``python ARGS`` in the repository (``-m orchestrator.status DIR``)."""
    start = time.perf_counter()
    cmd = [sys.executable, *args]
    subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - start


def measure(
    root: Path, *, num_ranks: int, log_kib: int, rows: int, repeat: int
) -> dict[str, float | str]:
    run_dir = root / f"run_{num_ranks}_{log_kib}"
    stale_rank = num_ranks // 3
    start = time.perf_counter()
    make_run(
        run_dir,
        num_ranks=num_ranks,
        log_bytes=log_kib * 1024,
        metrics_rows=rows,
        stale_rank=stale_rank,
    )
    made_s = time.perf_counter() - start
    os.sync()  # the logs are on the disk before anything is timed

    def beats_now() -> None:  # as the live run keeps them fresh
        write_heartbeats(run_dir, num_ranks=num_ranks, now=time.time(), stale_rank=stale_rank)

    cold: list[float] = []
    for _ in range(min(repeat, 3)):
        beats_now()
        if not drop_caches():
            break
        seconds, text = timed_status(StatusReader(run_dir))
        check(text, stale_rank=stale_rank)
        cold.append(seconds)
    warm = []
    for _ in range(repeat):
        beats_now()
        warm.append(timed_status(StatusReader(run_dir))[0])
    reader = StatusReader(run_dir)
    _, text = timed_status(reader)
    check(text, stale_rank=stale_rank)
    refresh = []
    for _ in range(repeat):
        advance(run_dir, num_ranks=num_ranks, stale_rank=stale_rank)
        seconds, text = timed_status(reader)
        check(text, stale_rank=stale_rank)
        refresh.append(seconds)
    beats_now()
    command = command_s("-m", "orchestrator.status", str(run_dir))
    shutil.rmtree(run_dir)
    return {
        "ranks": num_ranks,
        "log_kib": log_kib,
        "rows": rows,
        "made_s": made_s,
        "cold_s": min(cold) if cold else "n/a",
        "cold_worst_s": max(cold) if cold else "n/a",
        "warm_s": min(warm),
        "refresh_s": min(refresh),
        "refresh_worst_s": max(refresh),
        "command_s": command,
    }


def _cell(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.2f}"


def growth(results: list[dict[str, float | str]], key: str, by: str) -> str:
    """Time ratio per doubling of ``by``, from the smallest to the largest case."""
    rows = sorted((r for r in results if isinstance(r[key], float)), key=lambda r: float(r[by]))
    if len(rows) < 2:
        return "n/a"
    first, last = rows[0], rows[-1]
    doublings = math.log2(float(last[by]) / float(first[by]))
    ratio = float(last[key]) / max(float(first[key]), 1e-9)
    return f"x{ratio ** (1 / doublings):.2f} per doubling of {by} ({_cell(first[key])} -> {_cell(last[key])} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--log-kib", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--base-log-kib", type=int, default=1024, help="log size across ranks")
    parser.add_argument("--rows", type=int, default=30_000, help="metrics.jsonl rows")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="status_scale_", dir=args.out))
    cases = [(n, args.base_log_kib) for n in args.ranks]
    cases += [(max(args.ranks), k) for k in args.log_kib if k != args.base_log_kib]
    results = []
    try:
        for num_ranks, log_kib in cases:
            results.append(
                measure(
                    root, num_ranks=num_ranks, log_kib=log_kib, rows=args.rows, repeat=args.repeat
                )
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "\n| ranks | log | metrics rows | status cold (best, worst) | status warm "
        "| --follow refresh (best, worst) | command (warm) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["log_kib"], r["ranks"])):
        print(
            f"| {r['ranks']:,} | {r['log_kib']} KiB | {r['rows']:,} | {_cell(r['cold_s'])}, "
            f"{_cell(r['cold_worst_s'])} s | {_cell(r['warm_s'])} s | {_cell(r['refresh_s'])}, "
            f"{_cell(r['refresh_worst_s'])} s | {_cell(r['command_s'])} s |"
        )
    base = [r for r in results if r["log_kib"] == args.base_log_kib]
    wide = [r for r in results if r["ranks"] == max(args.ranks)]
    imports = min(command_s("-c", "import orchestrator.status.report") for _ in range(3))
    print(f"import orchestrator.status.report alone (in each command): {imports:.2f} s")
    for key in ("cold_s", "warm_s", "refresh_s"):
        print(f"{key}: {growth(base, key, 'ranks')}; {growth(wide, key, 'log_kib')}")


if __name__ == "__main__":
    main()
