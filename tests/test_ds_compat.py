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
import tokenize
from pathlib import Path

import pytest

# (module, object, attribute, who relies on it and why)
ATTRIBUTES = [
    ("deepspeed.ops", None, "__compatible_ops__", "ds_compat.never_build_shm_comm"),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine",
        "buffered_allreduce_fallback",
        "ds_compat.skip_fallback_all_reduce: a no-op at dp 1",
    ),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine",
        "clip_fp32_gradients",
        "ds_compat.skip_non_finite_steps_at_zero0: the norm before the clip",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "_overflow_check_and_loss_scale_update",
        "ds_compat.check_overflow_in_every_dtype: ZeRO-3 skips NaN steps in bf16/fp32",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "_loss_scale_update_and_overflow_cleanup",
        "ds_compat.check_overflow_in_every_dtype",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "check_overflow",
        "ds_compat.check_overflow_in_every_dtype",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "update_lp_params",
        "ds_compat.update_bit16_from_master: bit16 weights from the fp32 slices",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer",
        "update_lp_params",
        "ds_compat.master_slices",
    ),
    (
        "deepspeed.utils.tensor_fragment",
        "tensor_fragment",
        "get_hp_fragment_address",
        "ds_compat.master_slices: a parameter's place in its dp slice",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule",
        "_partition_layers",
        "ds_compat.pipeline.FixedSplitPipelineModule: our stage split replaces DeepSpeed's",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "get_param_id",
        "ds_compat.master_slices (ZeRO-3)",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "_get_param_partition_rank",
        "ds_compat.master_slices (ZeRO-3): which dp rank holds a parameter's partition",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule",
        "_set_bounds",
        "ds_compat.pipeline.FixedSplitPipelineModule",
    ),
    (
        "deepspeed.runtime.pipe.topology",
        "PipeModelDataParallelTopology",
        "get_coord",
        "ds_compat.pipeline.FixedSplitPipelineModule; test_layout's grid check",
    ),
]

# (module, object, text its source must contain, who relies on it and why)
SOURCE_TEXT = [
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._take_model_step",
        "self.optimizer.overflow",
        "ds_compat.skip_non_finite_steps_at_zero0: a skip is counted and the lr held",
    ),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._take_model_step",
        "self.clip_fp32_gradients()",
        "ds_compat.skip_non_finite_steps_at_zero0",
    ),
    (
        "deepspeed.runtime.engine",
        "DeepSpeedEngine._take_model_step",
        "self.optimizer._global_grad_norm",
        "ds_compat.skip_non_finite_steps_at_zero0: our norm reported as DeepSpeed's",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer.__init__",
        "self.single_partition_of_fp32_groups",
        "ds_compat.master_slices, test_perf: ZeRO-1/2's fp32 slices",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer.__init__",
        "self.bit16_groups",
        "ds_compat.master_slices",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "param_slice_mappings",
        "ds_compat's key names, read by reshard_source: the slices' offsets in ZeRO-1/2 checkpoint files",
    ),
    (
        "deepspeed.runtime.zero.stage_1_and_2",
        "DeepSpeedZeroOptimizer",
        "base_optimizer_state",
        "ds_compat's key names, read by reshard_source: Adam's moments in ZeRO-1/2 checkpoint files",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer.__init__",
        "self.fp32_groups_flat_partition",
        "ds_compat.master_slices: bf16's fp32 slices",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer.step",
        "is_invalid_grad_norm",
        "numerics (no access): bf16 ZeRO-1 skips a NaN/Inf step by itself",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3.__init__",
        "self.fp32_partitioned_groups_flat",
        "ds_compat.master_slices (ZeRO-3)",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3.__init__",
        "self.fp16_partitioned_groups_flat",
        "ds_compat.update_bit16_from_master (ZeRO-3)",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "self.grad_position",
        "ds_compat.master_slices (ZeRO-3): a parameter's place in its partition",
    ),
    (
        "deepspeed.runtime.zero.stage3",
        "DeepSpeedZeroOptimizer_Stage3",
        "self.fp16_groups",
        "ds_compat.master_slices (ZeRO-3)",
    ),
    (
        "deepspeed.runtime.bf16_optimizer",
        "BF16_Optimizer.__init__",
        "self.bf16_groups",
        "ds_compat.master_slices: bf16's parameter groups",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule.__init__",
        "self._topo = topology",
        "ds_compat.pipeline.FixedSplitPipelineModule",
    ),
    (
        "deepspeed.runtime.pipe.module",
        "PipelineModule.__init__",
        "self.forward_funcs",
        "ds_compat.pipeline.stage_modules: the stage's layers",
    ),
    (
        "deepspeed.runtime.fp16.loss_scaler",
        None,
        "cur_scale",
        "ds_compat.loss_scale: fp16's dynamic loss scale",
    ),
    (
        "deepspeed.checkpoint.constants",
        None,
        "PARAM_SHAPES = 'param_shapes'",
        "ds_compat's key names, read by reshard_source: a checkpoint's parameter shapes",
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


# The internals above, by the names our code spells them; only ds_compat may.
_INTERNAL_NAMES = sorted(
    {a for _, _, a, _ in ATTRIBUTES if a.startswith("_") or a in ("update_lp_params",)}
    | {t.split(".")[-1].split(" ")[0].rstrip("()") for _, _, t, _ in SOURCE_TEXT if "self." in t}
    | {"cur_scale", "param_shapes", "base_optimizer_state", "_hp_mapping", "ds_tensor"}
)


def _internal_uses(path: Path, shown: Path) -> list[str]:
    """``.name`` attribute accesses and ``"name"`` string keys of the internals in ``path``."""
    found, previous = [], None
    with tokenize.open(path) as f:
        for token in tokenize.generate_tokens(f.readline):
            name = None
            if token.type == tokenize.NAME and previous == ".":
                name = token.string
            elif token.type == tokenize.STRING and token.string[:1] in "\"'":
                name = token.string.strip("\"'")
            if name in _INTERNAL_NAMES:
                found.append(f"{shown}:{token.start[0]}: {name}")
            previous = token.string if token.type == tokenize.OP else None
    return found


def test_only_ds_compat_reaches_into_deepspeed() -> None:
    root = Path(__file__).resolve().parents[1]
    found = [
        hit
        for package in ("orchestrator", "model_parallel")
        for path in sorted((root / package).rglob("*.py"))
        if "ds_compat" not in path.relative_to(root).parts
        for hit in _internal_uses(path, path.relative_to(root))
    ]
    assert not found, "DeepSpeed internals outside ds_compat:\n" + "\n".join(found)
