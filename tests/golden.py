"""The golden loss curve every layout is compared with (tests/test_train_end_to_end.py).

The tiny model, seed 0 (train.seed), the synthetic data's 16 repeating
samples, 10 steps at tp1pp1 in fp32: per step the loss, the gradient norm
(before clipping, which engages from step 3) and the lr. The invariance tests
compare each layout with a tp1pp1 run made in the same session and with this
file, so a change that moves every layout together (the loss, the data order,
the initialisation, the schedule) fails too.

Regenerate only for a change that is meant to move the curve, and say why in
the commit:

    python -m tests.golden          # writes tests/golden/tiny_tp1pp1_fp32.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.status.metrics import read_metrics
from tests.launch import run_launch

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_tp1pp1_fp32.json"
STEPS = 10
# 16 samples repeating, a short warmup and a high peak: the loss falls from 7.6
# to about 6.4 in 10 steps, so a wrong gradient anywhere shows in the curve.
LR, WARMUP = 3e-3, 2
LEARNABLE = ["data.num_samples=16", f"train.warmup_steps={WARMUP}", f"train.lr={LR}"]
KEYS = ("step", "loss", "grad_norm", "lr")


def base_overrides(run_dir: Path, *extra: str) -> list[str]:
    """The tiny model on synthetic data for ``STEPS`` steps, each logged; then ``extra``."""
    return [
        "model=tiny",
        "data=synthetic",
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        "train.log_interval=1",
        *extra,
    ]


def overrides(run_dir: Path, *extra: str) -> list[str]:
    """A test run's settings: the golden curve's, then ``extra`` (a layout, a precision)."""
    return base_overrides(run_dir, *LEARNABLE, *extra)


def read() -> list[dict[str, float]]:
    return list(json.loads(GOLDEN.read_text())["steps"])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "golden"
        run_launch(*overrides(run_dir, "parallel=tp1pp1", "train.precision=fp32"))
        rows = [{k: m[k] for k in KEYS} for m in read_metrics(run_dir / "metrics.jsonl")]
    record: dict[str, Any] = {
        "regenerate": "python -m tests.golden",
        "overrides": overrides(Path("RUN_DIR"), "parallel=tp1pp1", "train.precision=fp32"),
        "steps": rows,
    }
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    for row in rows:
        print(f"step {row['step']}: loss {row['loss']:.6f} grad_norm {row['grad_norm']:.6f}")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
