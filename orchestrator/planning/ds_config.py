"""The DeepSpeed JSON of a run: a pure function of the config and the plan.

Built on the login node (the run folder's ``deepspeed.json``, the checks before
submission) and on every rank (``orchestrator.runtime.engine``) from the same
inputs, so the two agree; importing it loads neither torch nor DeepSpeed.
"""

from __future__ import annotations

import copy
from typing import Any

from orchestrator.config.schema import DeepSpeedSection, TrainConfig
from orchestrator.planning.plan import Plan

# A silent engine: our own logger prints progress lines.
_STEPS_PER_PRINT = 2**31 - 1


def deepspeed_config(
    plan: Plan, train: TrainConfig, deepspeed: DeepSpeedSection, *, on_gpu: bool = False
) -> dict[str, Any]:
    """The DeepSpeed JSON of ``plan`` and ``train``, with ``deepspeed.extra`` merged in.

    An extra key that contradicts a value set here raises ``ValueError``.
    """
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
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    ds.update(plan.precision.deepspeed_json())  # bf16: accumulate and reduce in fp32
    if plan.pp > 1:
        # With sequence parallelism each tp rank holds a different slice of the
        # activation, so DeepSpeed must not split-and-regather it over tp.
        partitioned = not plan.sequence_parallel
        ds["pipeline"] = {"pipe_partitioned": partitioned, "grad_partitioned": partitioned}
    return _merge_extra(ds, deepspeed.extra)


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
