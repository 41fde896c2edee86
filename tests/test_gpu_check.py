"""The single-GPU configs and bench/gpu_check.py, on CPU.

The GPU numbers themselves need a GPU (bench/RESULTS.md, "GPU checks"); here:
the H100/H200 cluster configs, the 1B model's size and the plan for the run
the check makes, and the check's plumbing end to end with the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import COMMON_TRAIN, GPU_TRAIN
from bench.train_throughput import MODELS
from orchestrator.planning.memory import GIB
from orchestrator.planning.perf import estimate
from orchestrator.planning.plan import validate_config
from tests.test_config import load

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("name", "memory"), [("h100_80g", 79.6), ("h200", 140.4)])
def test_single_gpu_clusters(name: str, memory: float) -> None:
    c = load(f"cluster={name}").cluster
    assert (c.nodes, c.gpus_per_node, c.device_memory_gb, c.peak_tflops) == (1, 1, memory, 989)
    assert c.scheduler == "none"
    c.validate()


def test_1b_model() -> None:
    cfg = load("model=1b", "parallel=tp1pp1", "cluster=h100_80g", "dry_run=true")
    plan = validate_config(cfg)
    assert plan.world_size == 1 and plan.seq_len == 2048
    # 22 x (4·2048² + 3·2048·5632 + 2·2048) + 2·32000·2048 + 2048
    assert cfg.model.to_args().hidden_dim == 5632
    assert plan.num_params == 1_261_529_088
    bench, _, seq = MODELS["1b"]  # the throughput bench's 1B has the same shape
    args = cfg.model.to_args()
    shape = ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim")
    assert [getattr(bench, k) for k in shape] == [getattr(args, k) for k in shape]
    assert seq == args.max_seq_len


def test_the_checks_trainer_run_fits_one_h100() -> None:
    cfg = load(*GPU_TRAIN, *COMMON_TRAIN, "cluster=h100_80g")
    plan = validate_config(cfg)
    assert (plan.micro_batch_size, plan.num_micro_batches, plan.zero_stage) == (4, 2, 1)
    est = estimate(plan, cfg.model, cfg.cluster)
    assert est.fits
    # bf16 ZeRO-1 at dp 1: 2 + 2 + 4 + 12 bytes a parameter, plus four sequences' activations.
    peak = est.peak
    assert peak.params + peak.grads + peak.optimizer == pytest.approx(20 * plan.num_params)
    assert 40 * GIB < peak.total < 50 * GIB


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_smoke(tmp_path: Path) -> None:
    """The check's driver, parts and summary with the tiny model (compiled parts left out)."""
    parts = ["env", "memory", "throughput_eager"]
    cmd = [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path)]
    result = subprocess.run(
        [*cmd, "--parts", *parts], cwd=REPO, capture_output=True, text=True, timeout=500
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == {part: "ok" for part in parts}
    assert summary["memory"]["measured_peak_gib"] > 0
    assert summary["memory"]["within_tolerance"] is None  # CPU: printed, not judged
    assert set(summary["bench_tokens_per_s"]) == {"ours", "hf"}
    assert "gloo all_reduce at world size 1: ok" in summary["env"]["collective"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "== summary (cpu-smoke, cluster=local)" in log
    assert "measured / plan without allowance" in log


def test_the_checks_fp16_run_is_a_valid_gpu_config() -> None:
    from bench.gpu_check import FP16_NAN_STEP, FP16_SCALER_SKIPS, fp16_overrides

    cfg = load(*fp16_overrides("h100_80g"))
    plan = validate_config(cfg)
    assert cfg.train.precision == "fp16" and plan.world_size == 1
    assert cfg.faults.inject_inf_grad_at_steps == list(range(2, 2 + FP16_SCALER_SKIPS))
    assert cfg.faults.max_consecutive_skips < FP16_SCALER_SKIPS  # a rollback, were they bad
    assert cfg.faults.inject_nan_at_steps == [FP16_NAN_STEP]
