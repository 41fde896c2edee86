"""What this project relies on in DeepSpeed beyond its public API, checked by name.

A DeepSpeed upgrade is the likeliest silent break (issue 20): each entry is an
attribute, a method or a piece of source text that one of our modules uses,
with where and why, so a missing one fails here by name, in seconds, instead
of as a wrong number deep in a training test. ``pyproject.toml`` pins
``deepspeed`` to the minor release these ran on.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

# (module, object, attribute, who relies on it and why)
ATTRIBUTES = [
    ("deepspeed.ops", None, "__compatible_ops__", "engine.init_deepspeed_comm: no shm op build"),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine",
        "buffered_allreduce_fallback",
        "engine._skip_fallback_all_reduce: a no-op at dp 1",
    ),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine",
        "clip_fp32_gradients",
        "engine._skip_non_finite_steps_at_zero0: the norm before the clip",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "_overflow_check_and_loss_scale_update",
        "engine._check_overflow_in_every_dtype: ZeRO-3 skips NaN steps in bf16/fp32",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "_loss_scale_update_and_overflow_cleanup",
        "engine._check_overflow_in_every_dtype",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "check_overflow",
        "engine._check_overflow_in_every_dtype",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "update_lp_params",
        "reshard._fill_zero12: bit16 weights from the fp32 slices",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer",
        "update_lp_params",
        "reshard._fill_zero12",
    ),
    (
        "deepspeed.utils.tensor_fragment",
        "tensor_fragment",
        "get_hp_fragment_address",
        "reshard._fill_zero12: a parameter's place in its dp slice",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule",
        "_partition_layers",
        "pipeline.LlamaPipeline: our stage split replaces DeepSpeed's",
    ),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_set_bounds", "LlamaPipeline"),
    (
        "deepspeed.runtime.pipe.topology",
        "PipeModelDataParallelTopology",
        "get_coord",
        "LlamaPipeline._partition_layers; test_layout's grid check",
    ),
]

# (module, object, text its source must contain, who relies on it and why)
SOURCE_TEXT = [
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._take_model_step",
        "self.optimizer.overflow",
        "engine._skip_non_finite_steps_at_zero0: a skip is counted and the lr held",
    ),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._take_model_step",
        "self.clip_fp32_gradients()",
        "engine._skip_non_finite_steps_at_zero0",
    ),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._take_model_step",
        "self.optimizer._global_grad_norm",
        "engine._skip_non_finite_steps_at_zero0: our norm reported as DeepSpeed's",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer.__init__",
        "self.single_partition_of_fp32_groups",
        "reshard._fill_zero12, test_perf: ZeRO-1/2's fp32 slices",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer.__init__",
        "self.bit16_groups",
        "reshard._fill_zero12",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "param_slice_mappings",
        "reshard_source: the slices' offsets in ZeRO-1/2 checkpoint files",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "base_optimizer_state",
        "reshard_source: Adam's moments in ZeRO-1/2 checkpoint files",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer.__init__",
        "self.fp32_groups_flat_partition",
        "reshard._fill_zero12: bf16's fp32 slices",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer.step",
        "is_invalid_grad_norm",
        "numerics: bf16 ZeRO-1 skips a NaN/Inf step",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3.__init__",
        "self.fp32_partitioned_groups_flat",
        "reshard._fill_zero3",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule.__init__",
        "self._topo = topology",
        "LlamaPipeline._partition_layers",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule.__init__",
        "self.forward_funcs",
        "pipeline.load_stage_state_dict: the stage's layers",
    ),
    (
        "deepspeed.runtime.fp16.loss_scaler",
        None,
        "cur_scale",
        "monitor.loss_scale: fp16's dynamic loss scale",
    ),
    (
        "deepspeed.checkpoint.constants",
        None,
        "PARAM_SHAPES = 'param_shapes'",
        "reshard_source: a checkpoint's parameter shapes",
    ),
]


def _resolve(module: str, name: str | None) -> object:
    target: object = importlib.import_module(module)
    for part in (name or "").split("."):
        if part:
            target = getattr(target, part)
    return target


@pytest.mark.parametrize(("module", "obj", "attribute", "why"), ATTRIBUTES)
def test_deepspeed_has_what_we_use(module: str, obj: str | None, attribute: str, why: str) -> None:
    target = _resolve(module, obj)
    where = f"{module}.{obj}" if obj else module
    assert hasattr(target, attribute), f"{where} has no {attribute} ({why})"


@pytest.mark.parametrize(("module", "obj", "text", "why"), SOURCE_TEXT)
def test_deepspeed_source_does_what_we_rely_on(
    module: str, obj: str | None, text: str, why: str
) -> None:
    target = _resolve(module, obj)
    source = inspect.getsource(target)  # type: ignore[arg-type]
    where = f"{module}.{obj}" if obj else module
    assert text in source, f"{where} no longer contains {text!r} ({why})"


def test_the_installed_deepspeed_is_the_pinned_one() -> None:
    from importlib.metadata import version

    major, minor = (int(x) for x in version("deepspeed").split(".")[:2])
    assert (major, minor) == (0, 19), "pyproject pins deepspeed>=0.19,<0.20"
