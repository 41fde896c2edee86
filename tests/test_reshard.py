"""Re-sharding: a checkpoint moves between tp/pp/dp layouts with its optimiser state.

The reference is one uninterrupted run. The same run stopped at step 3,
resumed under a second layout to step 6, then under a third to step 9, must
give the same losses and end with the same weights *and Adam moments*
(within fp32 tolerance: another layout sums in another order).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.checkpoint import checkpoint_dir, latest_tag, read_layout
from orchestrator.config import load_config
from orchestrator.metrics import read_metrics
from orchestrator.reshard import main as reshard_main
from orchestrator.reshard import write_universal
from tests.launch import run_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMMON = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.steps=9",
    "train.eval_interval=0",
]
L1 = ["parallel=tp2pp2", "parallel.dp=2"]
L2 = ["parallel=tp1pp2", "parallel.dp=4"]
L3 = ["parallel=tp4pp2", "parallel.pp=1", "parallel.dp=1", "parallel.zero_stage=2"]


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run_launch(*COMMON, f"run.dir={run_dir}", *overrides, timeout=600)


def _universal(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    path = write_universal(
        checkpoint_dir(run_dir) / tag, load_config(run_dir / "config.yaml").model.to_args()
    )
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    return out


def test_three_layouts_continue_the_same_run(tmp_path: Path) -> None:
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    _run(straight, *L1)
    _run(moved, *L1, "train.exit_at_step=3")
    second = _run(moved, *L2, "train.exit_at_step=6")
    assert "re-sharded from tp2pp2dp2 zero1 mb1 to tp1pp2dp4 zero1 mb1" in second.stdout
    third = _run(moved, *L3)
    assert "re-sharded from tp1pp2dp4 zero1 mb1 to tp4pp1dp1 zero2 mb1" in third.stdout
    final = checkpoint_dir(moved) / "step_00000009"
    assert read_layout(final) is not None and read_layout(final).tp == 4  # type: ignore[union-attr]

    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(moved / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 10))
    assert a[-1]["loss"] < a[0]["loss"] - 0.1, a  # it trains: the comparison means something
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3), x["step"]
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12), x["step"]

    want, got = _universal(straight, "step_00000009"), _universal(moved, "step_00000009")
    assert want.keys() == got.keys()
    assert {k.rsplit("/", 1)[1] for k in want} == {"fp32", "exp_avg", "exp_avg_sq"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reshard_command_and_unsupported_zero_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _run(run, "parallel=tp2pp1", "parallel.zero_stage=0", "train.steps=2")
    assert reshard_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "parallel.zero_stage=0" in err and err.count("\n") == 1
    assert not (checkpoint_dir(run) / latest_tag(run) / "universal.partial").exists()  # type: ignore[operator]
