"""The README's default run, measured: ``python launch/run.py`` as a user types it.

Starts the run in a fresh run directory (``run.dir`` under a temporary folder
unless ``--keep DIR``), with any overrides given after ``--``, and prints what
the README quotes: the machine, the wall time from the command to its exit,
the start-up time (command to the first logged step), the validation loss at
step 0 and at the end, the last training loss, and the measured tokens/s per
device next to the plan's figure from the banner. Nothing is taken from
anywhere but the run's own output and ``metrics.jsonl``.

    python bench/default_run.py                      # the README's run, 400 steps
    python bench/default_run.py -- train.steps=50    # a shorter check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    model = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = (
        "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    )
    return f"{model}, {os.cpu_count()} vCPUs, native bf16: {bf16}, {platform.python_version()}"


def _records(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run directory to use and keep")
    parser.add_argument("overrides", nargs="*", help="config overrides, after --")
    args = parser.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="default_run_")
    run_dir = args.keep or Path(tmp.name) / "run"  # type: ignore[union-attr]
    command = [sys.executable, "launch/run.py", f"run.dir={run_dir}", *args.overrides]
    began = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - began
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        print(f"error: the run exited {proc.returncode}", file=sys.stderr)
        return 1
    records = _records(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    first_step_at = float(train[0]["time"]) - float(train[0]["step_time_s"])  # type: ignore[arg-type]
    launched_at = time.time() - (time.monotonic() - began)
    steady = [float(r["tokens_per_s_per_device"]) for r in train[len(train) // 4 :]]  # type: ignore[arg-type]
    planned = re.search(r"throughput: ([\d,.]+|[^\n]*not modelled[^\n]*) ", proc.stdout)
    print(f"machine: {machine()}")
    print(f"command: python launch/run.py {' '.join(args.overrides)}".rstrip())
    print(f"steps: {train[-1]['step']}; wall time {wall:.0f} s ({wall / 60:.1f} min)")
    print(f"start-up (command to the first step's start): {first_step_at - launched_at:.0f} s")
    if valid:
        print(
            f"valid_loss: {float(valid[0]['valid_loss']):.3f} at step {valid[0]['step']} -> "  # type: ignore[arg-type]
            f"{float(valid[-1]['valid_loss']):.3f} at step {valid[-1]['step']}"  # type: ignore[arg-type]
        )
    print(f"last train loss: {float(train[-1]['loss']):.3f}")  # type: ignore[arg-type]
    print(
        f"tokens/s per device: measured {statistics.median(steady):,.0f} (median of the last "
        f"{len(steady)} logged steps); planned {planned.group(1) if planned else 'not printed'}"
    )
    print(f"console lines: {len(proc.stdout.splitlines())}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
