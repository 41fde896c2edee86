"""``parallel=auto``: every valid layout of a model on a cluster, estimated and ranked.

The layouts are tp x pp x dp x ZeRO stage x micro-batch x activation
checkpointing; each is resolved by the plan's own rules (``resolve``, so a
layout the plan refuses is skipped) and estimated by ``perf``. The plan takes
the best that fits (``orchestrator.planning.plan.resolve_plan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.config.schema import ACTIVATION_CHECKPOINTING, Config, ParallelConfig
from orchestrator.planning import perf
from orchestrator.planning.memory import GIB
from orchestrator.planning.plan_view import PlanView
from orchestrator.planning.precision import Precision

AUTO_MICRO_BATCH_SIZES = (1, 2, 4, 8)
AUTO_TABLE_ROWS = 8
Resolve = Callable[[Config], PlanView]


@dataclass(frozen=True)
class Candidate:
    """One layout ``parallel.auto`` considered, with the plan's estimate of it."""

    parallel: ParallelConfig
    plan: PlanView
    estimate: perf.Estimate


def search_layouts(cfg: Config, *, resolve: Resolve) -> tuple[Candidate, ...]:
    """Every valid layout of ``cfg.model`` on ``cfg.cluster``, estimated; the best that fits first.

    tp divides the GPUs of a node (a tp group stays inside one), the heads and
    the FFN width; pp divides the layers; dp fills the cluster; ZeRO 0-3 (<= 1
    with a pipeline, >= 1 in bf16); micro-batches of 1, 2, 4 or 8;
    activation checkpointing none or full; sequence parallelism whenever tp > 1.
    Ranked by predicted tokens/s, then by memory. Raises ``ValueError`` when
    no layout fits the device memory. ``resolve``: a fixed layout's plan
    (``orchestrator.planning.plan``), ``ValueError`` when it breaks a rule.
    """
    world = _auto_world_size(cfg)
    found = []
    for par in _layouts(cfg, world):
        trial = dataclasses.replace(cfg, parallel=par)
        try:
            plan = resolve(trial)
        except ValueError:  # e.g. heads not divisible by tp, batch not by micro-batch * dp
            continue
        found.append(Candidate(par, plan, perf.estimate(plan, trial.model, trial.cluster)))
    model = f"model={cfg.model.name}"
    if not found:
        raise ValueError(f"parallel.auto=true: {model} has no valid layout on {world} devices")
    found.sort(key=_rank_key)
    if not found[0].estimate.fits:
        smallest = min(found, key=lambda c: c.estimate.peak.total)
        raise ValueError(
            f"parallel.auto=true: none of the {len(found)} layouts of {model} on {world} devices "
            f"fits cluster.device_memory_gb({cfg.cluster.device_memory_gb}); the smallest, "
            f"{_describe(smallest.parallel)}, needs {smallest.estimate.peak.total / GIB:.1f} GiB"
        )
    return tuple(found)


def _rank_key(c: Candidate) -> tuple[bool, float, float]:
    return (not c.estimate.fits, -c.estimate.tokens_per_s_per_device, c.estimate.peak.total)


def _auto_world_size(cfg: Config) -> int:
    cluster = cfg.cluster
    if cluster.gpus_per_node == 0 or cluster.nodes is None:
        raise ValueError(
            f"parallel.auto=true: needs a GPU cluster with cluster.nodes set (the devices to fill); "
            f"cluster={cluster.name} has nodes={cluster.nodes}, gpus_per_node={cluster.gpus_per_node}"
        )
    return cluster.nodes * cluster.gpus_per_node


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(cfg: Config, world: int) -> list[ParallelConfig]:
    args = cfg.model.to_args()
    seq_len = cfg.train.seq_len or args.max_seq_len
    min_zero = Precision(cfg.train.precision).min_zero_stage
    out = []
    for tp in _divisors(cfg.cluster.gpus_per_node):
        for pp in _divisors(args.n_layers):
            if world % (tp * pp) != 0:
                continue
            for zero in range(min_zero, 2 if pp > 1 else 4):
                for micro in AUTO_MICRO_BATCH_SIZES:
                    for checkpointing in ACTIVATION_CHECKPOINTING:
                        out.append(
                            ParallelConfig(
                                name="auto",
                                tp=tp,
                                pp=pp,
                                dp=world // (tp * pp),
                                zero_stage=zero,
                                sequence_parallel=tp > 1 and seq_len % tp == 0,
                                activation_checkpointing=checkpointing,
                                micro_batch_size=micro,
                            )
                        )
    return out


def _describe(par: ParallelConfig) -> str:
    return (
        f"tp{par.tp} pp{par.pp} dp{par.dp} zero{par.zero_stage} micro{par.micro_batch_size} "
        f"checkpointing={par.activation_checkpointing}"
    )


def format_candidates(candidates: tuple[Candidate, ...]) -> list[str]:
    fitting = sum(c.estimate.fits for c in candidates)
    shown = candidates[:AUTO_TABLE_ROWS]
    lines = [
        f"parallel=auto: chose {_describe(candidates[0].parallel)}",
        f"parallel=auto: {len(candidates)} valid layouts, {fitting} fit; "
        f"the best {len(shown)} by predicted tokens/s:",
        "   #  tp  pp    dp  zero  micro  ckpt  memory GiB  fits  tokens/s/device    MFU",
    ]
    for i, c in enumerate(shown, start=1):
        p, e = c.parallel, c.estimate
        lines.append(
            f"{i:4d} {p.tp:3d} {p.pp:3d} {p.dp:5d} {p.zero_stage:5d} {p.micro_batch_size:6d}  "
            f"{p.activation_checkpointing:>4}  {e.peak.total / GIB:10.2f}  "
            f"{'yes' if e.fits else 'no':>4}  {e.tokens_per_s_per_device:15,.1f}  "
            f"{100 * e.mfu:5.1f}%"
        )
    return lines
