"""The plan's tokens/s per device against short real runs on this machine.

Each case is a ``launch/run.py`` command. The planned figure is the plan's
(``orchestrator.planning.perf.estimate`` of the composed config, as the command prints
it, with this host's measured peaks and gloo costs from the cache or probed
now); the measured one is the median ``step_time_s`` of the run's
``metrics.jsonl`` over the logged intervals after ``--skip`` steps, as tokens
per second per device. Cases run one after another, ``--repeat`` rounds, and
the load average is printed before and after each.

    python bench/plan_accuracy.py                       # default and 60m-fp32
    python bench/plan_accuracy.py --cases default tiny-tp1pp1 60m-bf16 --repeat 2

``default`` is the README's ``python launch/run.py`` (model tiny, tp2pp2, 4
CPU worker processes) with fewer steps; ``60m-*`` are the 60M-parameter
tp1pp1 run of ``bench/RESULTS.md`` (dim 512, 8 layers, vocab 32000, seq 512,
global batch 4, synthetic data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.config.compose import compose_config  # noqa: E402
from orchestrator.planning import perf  # noqa: E402
from orchestrator.planning.plan import validate_config  # noqa: E402

SIXTY_M = (
    "model=tiny",
    "model.dim=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.vocab_size=32000",
    "model.multiple_of=256",
    "model.max_seq_len=512",
    "data=synthetic",
    "train.global_batch_size=4",
    "parallel=tp1pp1",
    "train.warmup_steps=2",
)
TINY_SHORT = ("train.steps=30", "train.log_interval=5")
SIXTY_M_SHORT = ("train.steps=10", "train.log_interval=2")
# name: (overrides, steps skipped)
CASES: dict[str, tuple[tuple[str, ...], int]] = {
    "default": (TINY_SHORT, 5),
    "tiny-tp1pp1": (("parallel=tp1pp1", *TINY_SHORT), 5),
    "tiny-tp2pp1": (("parallel=tp2pp1", *TINY_SHORT), 5),
    "tiny-tp1pp2": (("parallel=tp1pp2", *TINY_SHORT), 5),
    "60m-fp32": ((*SIXTY_M, "train.precision=fp32", *SIXTY_M_SHORT), 2),
    "60m-bf16": ((*SIXTY_M, "train.precision=bf16", *SIXTY_M_SHORT), 2),
}


@dataclass(frozen=True)
class Row:
    case: str
    planned: float  # tokens/s per device
    measured: float
    planned_step: float  # seconds
    measured_step: float
    load_before: float
    load_after: float

    @property
    def ratio(self) -> float:
        return self.planned / self.measured


def planned(overrides: tuple[str, ...]) -> tuple[perf.Estimate, list[str], int]:
    """The plan's estimate, its step-time lines, and tokens per step per device."""
    cfg = compose_config(overrides, conf_dir=REPO / "conf")
    plan = validate_config(cfg)
    est = perf.estimate(plan, cfg.model, cfg.cluster)
    wanted = ("step time", "peak", "collective", "warning")
    lines = [line for line in perf.format_estimate(est, cfg.cluster) if line.startswith(wanted)]
    return est, lines, plan.global_batch_size * plan.seq_len // plan.world_size


def measured_step(run_dir: Path, *, skip: int) -> float:
    """Median step time over the logged intervals that start after step ``skip``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    steps = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > skip]
    if not steps:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: no logged step after step {skip}")
    return float(statistics.median(steps))


def run_case(name: str, work: Path) -> tuple[Row, list[str]]:
    overrides, skip = CASES[name]
    est, lines, tokens_per_device = planned(overrides)
    run_dir = work / f"{name}-{time.time_ns()}"
    load_before = os.getloadavg()[0]
    command = [sys.executable, str(REPO / "launch" / "run.py"), *overrides, f"run.dir={run_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    load_after = os.getloadavg()[0]
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{name}: exit {done.returncode}: {' | '.join(tail)}")
    step = measured_step(run_dir, skip=skip)
    row = Row(
        name,
        est.tokens_per_s_per_device,
        tokens_per_device / step,
        est.time.total,
        step,
        load_before,
        load_after,
    )
    return row, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=["default", "60m-fp32"]
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all cases")
    opts = parser.parse_args()
    rows, plans = [], {}
    print(_header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="plan_accuracy_") as tmp:
        for _ in range(opts.repeat):
            for name in opts.cases:
                row, plans[name] = run_case(name, Path(tmp))
                rows.append(row)
                print(_format(row), flush=True)
    print()
    for name, lines in plans.items():
        for line in lines:
            print(f"{name}: {line}")
    return 0


def _header() -> str:
    return (
        "case            planned tok/s/dev  measured tok/s/dev  planned/measured"
        "  step planned s  step measured s  load before/after"
    )


def _format(r: Row) -> str:
    return (
        f"{r.case:<15} {r.planned:17,.1f}  {r.measured:18,.1f}  {r.ratio:16.2f}"
        f"  {r.planned_step:14.3f}  {r.measured_step:15.3f}  {r.load_before:.2f}/{r.load_after:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
