"""The DeepSpeed JSON of a run: a pure function of the config and the plan.

Built on the login node (the run folder's ``deepspeed.json``, the checks before
submission) and on every rank (``orchestrator.runtime.engine``) from the same
inputs, so the two agree; importing it loads neither torch nor DeepSpeed.
"""

from __future__ import annotations

import copy
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.planning.plan import Plan

# A silent engine: our own logger prints progress lines.
_STEPS_PER_PRINT = 2**31 - 1


def deepspeed_config(cfg: Config, plan: Plan, *, on_gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg``, with ``cfg.deepspeed.extra`` merged in.

    An extra key that contradicts a value set here raises ``ValueError``.
    """
    train = cfg.train
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.num_micro_batches,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {
            "stage": plan.zero_stage,
            "overlap_comm": on_gpu and plan.zero_stage > 0,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        # Megatron's practice: accumulate gradients over micro-batches in fp32,
        # not in bf16 (a step of a large run sums thousands of micro-batches),
        # and reduce them over dp in fp32 too. DeepSpeed's default for bf16 is
        # to cast the fp32 accumulation buffers to bf16 for the all-reduce and
        # copy the rounded sums back, which undoes the fp32 accumulation.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    if plan.pp > 1:
        # With sequence parallelism each tp rank holds a different slice of the
        # activation, so DeepSpeed must not split-and-regather it over tp.
        partitioned = not cfg.parallel.sequence_parallel
        ds["pipeline"] = {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}
    return _merge_extra(ds, cfg.deepspeed.extra)


def _merge_extra(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_extra(out[key], value, prefix=f"{name}.")
        elif out[key] != value:
            raise ValueError(
                f"deepspeed.extra.{name}={value}: conflicts with {out[key]} set from the config "
                "(change the config field instead)"
            )
    return out
