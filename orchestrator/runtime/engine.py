"""DeepSpeed glue: the ``mpu`` adapter over our process groups, the optimiser and
``deepspeed.initialize`` (the JSON it is given: ``orchestrator.planning.ds_config``)."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model_parallel.fused import fused_adam_class
from model_parallel.groups import ProcessGroups
from model_parallel.layers import counts_in_norm
from orchestrator.config.schema import DeepSpeedSection, TrainConfig
from orchestrator.planning.ds_config import deepspeed_config
from orchestrator.planning.plan import Plan
from orchestrator.runtime.schedule import lr_at

# Devices where torch.optim.AdamW(fused=True) has a kernel (CPU since torch 2.4).
_TORCH_FUSED_ADAMW_DEVICES = ("cuda", "cpu")


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed asks for, answering from our ``ProcessGroups``.

    "Model parallel" in DeepSpeed's ZeRO means tensor parallel: ZeRO shards
    over the dp group only, and gradient norms count tp-sharded parameters
    (``tensor_model_parallel=True``) once per tp rank.
    """

    def __init__(self, groups: ProcessGroups) -> None:
        self.groups = groups

    def get_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.groups.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.groups.rank - self.groups.tp_rank

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.groups.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        coords = self.groups.coords
        layout = self.groups.layout
        return [
            layout.rank(tp_rank=coords.tp_rank, dp_rank=d, pp_rank=coords.pp_rank)
            for d in range(layout.dp)
        ]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (linear and embedding weights), none on norms."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the paper's betas: apex FusedAdam on GPU if present, else torch's fused AdamW.

    torch's ``fused=True`` AdamW is one kernel per parameter group on CUDA and
    on CPU (one vectorised pass instead of the ~10 per-tensor ops of the
    foreach path). In fp32 it matches the foreach path to a few ulps of the
    update (the same operations, ordered differently); on bf16 parameters it
    does the update math in fp32 and rounds once (``tests/test_llama_compile.py``).
    """
    groups = param_groups(model, train.weight_decay)
    betas = (train.beta1, train.beta2)
    device = next(model.parameters()).device
    apex_adam = fused_adam_class() if device.type == "cuda" else None
    if apex_adam is not None:
        optimizer: torch.optim.Optimizer = apex_adam(
            groups, lr=train.lr, betas=betas, eps=train.adam_eps, adam_w_mode=True
        )
        return optimizer
    fused = device.type in _TORCH_FUSED_ADAMW_DEVICES or None
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas, eps=train.adam_eps, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine (``orchestrator.runtime.schedule``) as a multiplier of the peak lr."""
    factor = functools.partial(
        _lr_factor,
        warmup_steps=train.warmup_steps,
        total_steps=train.steps,
        min_ratio=train.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    return lr_at(
        step, peak=1.0, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio
    )


def grad_norm(model: nn.Module, groups: ProcessGroups) -> float:
    """Global L2 norm of the gradients held by this model-parallel (tp) group.

    tp-sharded gradients count on every tp rank, replicated ones on tp rank 0
    only (a shard replicated on several ranks, as KV heads when tp exceeds
    them, on the first of them: ``counts_in_norm``). Used where DeepSpeed
    reports none (ZeRO-0 in fp32), over every pipeline stage; gradients must
    already be reduced over dp.
    """
    total = torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device)
    for param in model.parameters():
        if param.grad is not None and counts_in_norm(param, groups.tp_rank):
            total += param.grad.detach().float().pow(2).sum()
    if groups.tp_size > 1:
        dist.all_reduce(total, group=groups.tp_group)
    if groups.pp_size > 1:  # each stage holds its own layers
        dist.all_reduce(total, group=groups.pp_group)
    return float(total.sqrt())


def init_deepspeed_comm() -> None:
    """Point deepspeed.comm at the torch process group we already initialised.

    Without building DeepSpeed's CPU shared-memory comm op: DeepSpeed JIT-builds
    it here on a CPU (a minute on the first start, under a ``lock`` file in
    torch's extension folder that a run killed mid-build leaves behind, and on
    which every later start then waits forever), yet only its inference
    all-reduce uses it; training goes through torch.distributed. Marked
    incompatible, it is neither built nor loaded, and no lock is taken.
    """
    import deepspeed

    from orchestrator.runtime import ds_compat

    ds_compat.never_build_shm_comm()
    deepspeed.init_distributed(
        dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False
    )


def initialize(
    model: nn.Module,
    plan: Plan,
    train: TrainConfig,
    deepspeed_section: DeepSpeedSection,
    groups: ProcessGroups,
    *,
    on_gpu: bool,
) -> Any:
    """``deepspeed.initialize`` with our optimiser, schedule and ``mpu``; returns the engine.

    The DeepSpeed JSON is built here, once per rank, from the plan, ``train``
    and ``deepspeed.extra`` (``orchestrator.planning.ds_config``).
    """
    import deepspeed  # deferred: importing deepspeed is slow and prints

    from orchestrator.runtime import ds_compat

    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    ds_config = deepspeed_config(plan, train, deepspeed_section, on_gpu=on_gpu)
    # The pipeline engine takes the grid of the PipelineModule as its mpu.
    mpu = None if plan.pp > 1 else DeepSpeedMPU(groups)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=mpu,
        dist_init_required=False,
    )
    if plan.zero_stage == 0:
        ds_compat.skip_non_finite_steps_at_zero0(engine, lambda: grad_norm(model, groups))
    if plan.zero_stage == 3:
        ds_compat.check_overflow_in_every_dtype(engine.optimizer)
    if groups.dp_size == 1:
        ds_compat.skip_fallback_all_reduce(engine)
    return engine
