"""Bad steps are not applied, bit for bit, at every ZeRO stage, in fp32 and bf16, pipeline or not.

One run per engine kind: after a checkpoint at step 3, batch 4 has a NaN loss
and batch 5 a finite loss with an Inf gradient, each on the last rank only (a
dp replica's batch, a tp shard's loss, the last pipeline stage's), so every
other rank must agree to skip: on one rank is the harder case, as the ranks
that saw nothing must still hold still (a fault on every rank sets every
rank's flag; it is also what the rollback tests in test_faults.py inject).
The checkpoint after step 5 must hold the same weights and optimiser state
(Adam's moments and step count, ZeRO partitions, bf16 master weights) as the
one after step 3, bit for bit, and the lr must not have moved: steps 4 and 5
both ran at the lr of the 4th update.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestrator.runtime.numerics import NumericsGuard
from orchestrator.runtime.schedule import lr_at
from orchestrator.state.checkpoint import checkpoint_dir
from orchestrator.status.metrics import read_metrics
from tests.checkpoint_files import weights_and_optimiser
from tests.launch import run_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STEPS, WARMUP, LR = 8, 2, 3e-3
# (layout overrides, world size): the one-rank fault goes to the last rank.
ENGINES = {
    "fp32_zero0_dp2": (["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=0"], 2),
    "fp32_zero0_pp2": (["parallel=tp1pp2", "parallel.zero_stage=0"], 2),
    "fp32_zero1_tp2pp2": (["parallel=tp2pp2", "parallel.zero_stage=1"], 4),
    "fp32_zero2_dp2": (["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=2"], 2),
    "fp32_zero3_dp2": (["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=3"], 2),
    "bf16_zero1_dp2": (["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=1"], 2),
    "bf16_zero1_pp2dp2": (["parallel=tp1pp2", "parallel.dp=2", "parallel.zero_stage=1"], 4),
    "bf16_zero2_tp2dp2": (["parallel=tp2pp1", "parallel.dp=2", "parallel.zero_stage=2"], 4),
    "bf16_zero3_dp2": (["parallel=tp1pp1", "parallel.dp=2", "parallel.zero_stage=3"], 2),
}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_bad_steps_change_nothing(engine: str, tmp_path: Path) -> None:
    layout, world = ENGINES[engine]
    precision = engine.split("_")[0]
    run_dir = tmp_path / engine
    proc = run_launch(
        "model=tiny",
        "data=synthetic",
        "data.num_samples=16",
        *layout,
        f"train.precision={precision}",
        f"train.steps={STEPS}",
        f"train.warmup_steps={WARMUP}",
        f"train.lr={LR}",
        "train.exit_at_step=5",
        "train.log_interval=1",
        "checkpoint.interval=3",
        "faults.inject_nan_at_steps=[4]",
        "faults.inject_inf_grad_at_steps=[5]",
        f"faults.inject_rank={world - 1}",
        f"run.dir={run_dir}",
    )
    assert "step 4/8 | skipped: loss nan" in proc.stdout
    assert "step 5/8 | skipped: loss " in proc.stdout
    metrics = {int(m["step"]): m for m in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(metrics) == [1, 2, 3, 4, 5]
    assert math.isnan(metrics[4]["loss"])  # rank 0's own loss was finite where tp > 1
    assert math.isfinite(metrics[5]["loss"])  # the Inf was in the gradient only
    assert [metrics[s]["skipped_steps"] for s in (3, 4, 5)] == [0, 1, 2]
    # the schedule held: both bad steps ran at the 4th update's lr
    expected = lr_at(3, peak=LR, warmup_steps=WARMUP, total_steps=STEPS, min_ratio=0.1)
    assert metrics[4]["lr"] == metrics[5]["lr"] == pytest.approx(expected, rel=1e-9)
    assert metrics[3]["lr"] != metrics[4]["lr"]
    before = weights_and_optimiser(checkpoint_dir(run_dir) / "step_00000003")
    after = weights_and_optimiser(checkpoint_dir(run_dir) / "step_00000005")
    assert before.keys() == after.keys() and len(before) > 4
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == [], changed


def test_fp16_scaler_skips_are_not_bad_steps() -> None:
    """DeepSpeed's loss scaler skips fp16 steps with finite losses by design: counted apart,
    never a rollback, even many in a row at start-up; a NaN loss is still a bad step."""
    guard = NumericsGuard(max_consecutive_skips=2, spike_factor=0.0, spike_window=3, fp16=True)
    for _ in range(10):  # 2^16 down to 2^6: ten overflows while the scale settles
        verdict = guard.observe(7.6, skipped=True)
        assert verdict.skipped and verdict.scaler and not verdict.rollback
    assert guard.scaler_skips == 10 and guard.skipped_total == 0
    assert guard.observe(float("nan"), skipped=True).skipped  # NaN: bad, scaler or not
    assert guard.observe(float("nan"), skipped=True).rollback == "2 consecutive non-finite steps"
    assert guard.skipped_total == 2
    # in fp32/bf16 the same finite-loss skips are bad steps
    plain = NumericsGuard(max_consecutive_skips=2, spike_factor=0.0, spike_window=3)
    plain.observe(7.6, skipped=True)
    assert plain.observe(7.6, skipped=True).rollback


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel=tp1pp2", "faults.inject_rank=0"],
            "faults.inject_rank=0: must be a rank of the last pipeline stage, where the loss "
            "is computed (1..1)",
        ),
        (
            ["parallel=tp2pp1", "faults.inject_rank=2"],
            "faults.inject_rank=2: must be a rank of the job (0..1)",
        ),
    ],
)
def test_a_fault_rank_that_computes_no_loss_is_refused(overrides: list[str], message: str) -> None:
    from orchestrator.planning.plan import validate_config
    from tests.test_config import load

    with pytest.raises(ValueError) as info:
        validate_config(load("model=tiny", *overrides))
    assert str(info.value) == message
