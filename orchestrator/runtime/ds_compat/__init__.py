"""Every use of DeepSpeed beyond its public API, behind one door.

DeepSpeed's public API (``deepspeed.initialize``, the engine's ``backward``/
``step``/``train_batch``/``save_checkpoint``/``load_checkpoint``,
``deepspeed.pipe``'s ``PipelineModule`` and ``LayerSpec``) is used where it is
needed. Everything else we rely on, a private attribute, a method we replace,
a key in its checkpoint files, is reached only from here, each with the
reason, so a DeepSpeed upgrade has one file to read. ``pyproject.toml`` pins
``deepspeed`` to the minor release the tests ran on, and
``tests/test_ds_compat.py`` names every attribute and piece of source
this module relies on, so a missing one fails by name in seconds.

Grouped by who needs it: start-up (no shm op build), the engine's step
(NaN/Inf skips, the dp-1 all-reduce), the monitor (fp16's loss scale),
re-sharding (the optimiser's fp32 master slices), checkpoint files (key
names), and, in ``ds_compat.pipeline``, pipeline stages (our split instead of
DeepSpeed's).

This module imports DeepSpeed only inside the functions that need it
(``import deepspeed`` takes seconds and prints), so a tool that only reads
checkpoint files does not pay for it; ``ds_compat.pipeline`` subclasses
DeepSpeed's ``PipelineModule`` and so imports it. Neither imports the rest of
``orchestrator``: ``model_parallel.pipeline`` takes its base class from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# --- start-up ---------------------------------------------------------------------------


def never_build_shm_comm() -> None:
    """Mark DeepSpeed's CPU shared-memory comm op incompatible, so it is neither built nor loaded.

    ``deepspeed.init_distributed`` on a CPU otherwise JIT-builds it (a minute,
    under a ``lock`` file that a run killed mid-build leaves behind, on which
    every later start waits forever); only its inference all-reduce uses it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --- the engine's step ------------------------------------------------------------------


def skip_fallback_all_reduce(engine: Any) -> None:
    """At dp = 1, make DeepSpeed's fallback gradient all-reduce a no-op.

    The fallback (``buffered_allreduce_fallback``: ZeRO-0, and bf16's
    ``BF16_Optimizer`` at ZeRO-1, pipeline or not) flattens every gradient,
    all-reduces it over a data-parallel group of one and copies it back: 9% of
    a 60M bf16 step on CPU, for an identity. ZeRO-1/2's own reductions (which
    also move gradients into their partitions) are left alone.
    """
    engine.buffered_allreduce_fallback = lambda *args, **kwargs: None


def skip_non_finite_steps_at_zero0(engine: Any, grad_norm: Callable[[], float]) -> None:
    """Make ZeRO-0 skip a step whose global gradient norm (``grad_norm()``) is NaN/Inf.

    ZeRO-1/2 and bf16 check every step; DeepSpeed's plain (ZeRO-0) optimiser
    would apply a NaN. At the step boundary the engine clips
    (``clip_fp32_gradients``, when ``gradient_clipping`` is set), calls
    ``optimizer.step()``, then counts a skip and holds the lr schedule when
    ``optimizer.overflow`` is true. So the norm is taken once before the clip
    (over tp and every stage), reported as DeepSpeed's own
    (``_global_grad_norm``), and a non-finite one sets ``overflow`` and leaves
    the weights and Adam's state alone; the engine then clears the gradients as
    after any step.
    """
    optimizer = engine.optimizer
    step, clip = optimizer.step, engine.clip_fp32_gradients
    measured: list[float] = []  # this boundary's norm, taken before clipping

    def norm() -> float:
        if not measured:
            measured.append(grad_norm())
        return measured[0]

    def clip_after_norm() -> None:
        if math.isfinite(norm()):
            clip()

    def checked_step(*args: Any, **kwargs: Any) -> None:
        value = norm()
        measured.clear()
        optimizer._global_grad_norm = value
        optimizer.overflow = not math.isfinite(value)
        if not optimizer.overflow:
            step(*args, **kwargs)

    engine.clip_fp32_gradients = clip_after_norm
    optimizer.step = checked_step  # shadows the method on this instance


def check_overflow_in_every_dtype(zero: Any) -> None:
    """Make ZeRO-3 skip a step with a NaN/Inf gradient in bf16 and fp32 too.

    ZeRO-1/2 check every step's reduced gradients; DeepSpeed's ZeRO-3 checks
    only in fp16 (``_overflow_check_and_loss_scale_update``). This is that
    method without the dtype test: the same check, the same clean-up, and the
    engine then counts the step as skipped and holds the lr schedule.
    """

    def overflow_check(update_scale: bool = True) -> bool:
        zero.overflow = False
        zero.check_overflow()
        if not update_scale:
            return bool(zero.overflow)
        return bool(zero._loss_scale_update_and_overflow_cleanup())

    zero._overflow_check_and_loss_scale_update = overflow_check


# --- the monitor ------------------------------------------------------------------------


def loss_scale(optimizer: Any) -> float | None:
    """fp16's current dynamic loss scale: ``loss_scale`` on ZeRO, ``cur_scale`` on the
    plain fp16 optimiser (None when the optimiser has neither)."""
    for name in ("loss_scale", "cur_scale"):
        value = getattr(optimizer, name, None)
        if isinstance(value, int | float | torch.Tensor):
            return float(value)
    return None


# --- re-sharding: the fp32 master slices -----------------------------------------------


@dataclass
class MasterSlice:
    """One flat fp32 master buffer this dp rank owns (Adam's state is keyed by it) and,
    for each parameter with elements in it, ``(param, at, start, numel)``: elements
    ``[start, start + numel)`` of the parameter's flattened tp shard are
    ``flat[at : at + numel]``."""

    flat: torch.Tensor
    pieces: list[tuple[nn.Parameter, int, int, int]]


def master_slices(zero: Any) -> list[MasterSlice] | None:
    """The optimiser's fp32 master slices (ZeRO 1-3, bf16's ``BF16_Optimizer``);
    None for ZeRO-0, whose parameters are the master weights."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: a partition of each param
        out = []
        for sub, flat in enumerate(zero.fp32_partitioned_groups_flat):
            pieces = []
            for param in zero.fp16_groups[sub]:
                _, at, numel = zero.grad_position[zero.get_param_id(param)]
                start = zero._get_param_partition_rank(param) * param.ds_tensor.ds_numel
                pieces.append((param, at, start, numel))
            out.append(MasterSlice(flat, pieces))
        return out
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flats, groups = zero.single_partition_of_fp32_groups, zero.bit16_groups
    elif hasattr(zero, "fp32_groups_flat_partition"):  # BF16_Optimizer
        flats, groups = zero.fp32_groups_flat_partition, zero.bf16_groups
    else:
        return None
    out = []
    for flat, params in zip(flats, groups, strict=True):
        pieces = []
        for param in params:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no fragment of it in this dp rank's slice
                continue
            hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
            pieces.append((param, hp.start, lp.start, lp.numel))
        out.append(MasterSlice(flat, pieces))
    return out


def update_bit16_from_master(zero: Any) -> None:
    """Copy the fp32 master slices into the module's 16-bit weights (after ``master_slices``
    were written)."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        for sub, flat in enumerate(zero.fp32_partitioned_groups_flat):
            lp = zero.fp16_partitioned_groups_flat[sub]
            if lp is not None and lp.data_ptr() != flat.data_ptr():
                lp.data.copy_(flat.data)  # the module's own partitions
    else:
        zero.update_lp_params()  # all-gathered over dp


# --- checkpoint files -------------------------------------------------------------------

# model states (mp_rank_XX_model_states.pt)
PARAM_SHAPES = "param_shapes"  # deepspeed.checkpoint.constants.PARAM_SHAPES
# optimiser files (zero_pp_rank_*_optim_states.pt): their one top-level key, and the
# key of Adam's state inside ZeRO-3's
OPTIMIZER_STATE_DICT = "optimizer_state_dict"  # deepspeed.checkpoint.constants
# inside ZeRO-1/2's
FP32_SLICES = "single_partition_of_fp32_groups"  # each group's fp32 slice of this dp rank
SLICE_MAPPINGS = "param_slice_mappings"  # each parameter's offset in that slice
BASE_OPTIMIZER_STATE = "base_optimizer_state"  # Adam's moments of the slices
