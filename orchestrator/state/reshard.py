"""Re-sharding: a checkpoint saved under one layout resumes under another.

DeepSpeed's files are per rank and its loader takes them only under the
layout that wrote them. Here every rank of the new layout fills its own part
of the engine straight from the old files (``orchestrator.state.reshard_source``):
for each parameter it holds, it asks for the rows of the full tensor that
cover its fragment (its tp shard, cut to its dp slice under ZeRO), for the
fp32 master weight and both Adam moments, and copies them in. Nothing is
converted ahead of time, no rank works for the others, and a rank reads about
its own share of the state (whole rows: a row-parallel weight moving to a
larger tp reads full rows of the old, wider shard).

Supported: from ZeRO 0 (fp32), 1, 2 (fp32, bf16, fp16 and bf16's
``BF16_Optimizer``) and 3, to ZeRO 0, 1, 2 or 3 of any tp, pp, dp and
micro-batch size.

Training state moves with it: the step, the learning-rate schedule, the
Adam step count and the data position as a count of samples (so the next step
reads the same global batch under any layout).

    python -m orchestrator.state.reshard RUN_DIR [--tag step_00000400]

checks ahead of time that a checkpoint can be re-sharded and prints its
layout.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

from model_parallel.layers import is_sharded, replicas_of
from model_parallel.mappings import group_rank
from orchestrator.runtime import ds_compat
from orchestrator.state.checkpoint import TrainingState
from orchestrator.state.reshard_source import KEYS, SourceCheckpoint, UnsupportedCheckpoint
from orchestrator.state.weights import global_name


class _Local:
    """This rank's tp shard of one parameter, read by flat ranges from the source."""

    def __init__(
        self,
        source: SourceCheckpoint,
        name: str,
        shape: tuple[int, ...],
        dim: int | None,
        tp_rank: int,
    ) -> None:
        self.source, self.name, self.dim, self.tp_rank = source, name, dim, tp_rank
        self.rows, self.cols = (shape[0], shape[1]) if len(shape) == 2 else (shape[0], 1)
        self.numel = math.prod(shape)

    def flat(self, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened shard (zeros past its end)."""
        out = torch.zeros(numel, dtype=torch.float32)
        end = min(start + numel, self.numel)
        if start >= end:
            return out
        r0, r1 = start // self.cols, -(-end // self.cols)
        block = self._rows(key, r0, r1).flatten()
        out[: end - start] = block[start - r0 * self.cols : end - r0 * self.cols]
        return out

    def _rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the shard, from the full tensor (zeros in vocab padding)."""
        full = self.source.param(self.name).full_shape
        if self.dim == 1:
            c0 = self.tp_rank * self.cols
            return self.source.read(self.name, key, (r0, r1), (c0, c0 + self.cols))
        base = self.tp_rank * self.rows if self.dim == 0 else 0
        lo, hi = base + r0, min(base + r1, full[0])
        out = torch.zeros(r1 - r0, self.cols, dtype=torch.float32)
        if lo < hi:
            out[: hi - lo] = self.source.read(self.name, key, (lo, hi))
        return out


def _locals(
    engine: Any, source: SourceCheckpoint, *, n_layers: int, pp: int, tp_rank: int
) -> dict[Any, _Local]:
    out = {}
    for name, param in engine.module.named_parameters():
        full = global_name(name, n_layers, pp)
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps only a partition
        dim = param.partition_dim if is_sharded(param) else None
        try:
            source.param(full)
        except KeyError as exc:
            raise UnsupportedCheckpoint(f"{exc.args[0]} (is it the same model?)") from exc
        # replicated shards (KV heads when tp exceeds them): rank r holds shard r // replicas
        out[param] = _Local(source, full, shape, dim, tp_rank // replicas_of(param))
    return out


def _adam_state(
    optimizer: torch.optim.Optimizer, flat: torch.Tensor, step: int
) -> dict[str, torch.Tensor]:
    """The Adam state of ``flat`` (created if the optimiser has none yet), step set."""
    state = optimizer.state[flat]
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            state[key] = torch.zeros_like(flat)
    old = state.get("step")
    state["step"] = (
        torch.full_like(old, step) if isinstance(old, torch.Tensor) else torch.tensor(float(step))
    )
    return state


def _fill_slices(
    zero: Any, slices: list[ds_compat.MasterSlice], local: dict[Any, _Local], adam_step: int
) -> None:
    """ZeRO 1-3 and BF16_Optimizer: the fp32 slices this dp rank owns, then the 16-bit weights."""
    for piece in slices:
        state = _adam_state(zero.optimizer, piece.flat, adam_step)
        targets = {
            "fp32": piece.flat.data,
            "exp_avg": state["exp_avg"],
            "exp_avg_sq": state["exp_avg_sq"],
        }
        for param, at, start, numel in piece.pieces:
            for key, target in targets.items():
                target.narrow(0, at, numel).copy_(local[param].flat(key, start, numel))
    ds_compat.update_bit16_from_master(zero)


def _fill_plain(optimizer: torch.optim.Optimizer, local: dict[Any, _Local], adam_step: int) -> None:
    """ZeRO-0 in fp32: the parameters are the master weights; Adam state per parameter."""
    with torch.no_grad():
        for param, shard in local.items():
            param.copy_(shard.flat("fp32", 0, shard.numel).view(param.shape))
            state = _adam_state(optimizer, param, adam_step)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].copy_(shard.flat(key, 0, shard.numel).view(param.shape))


def load_resharded(
    engine: Any, path: Path, *, args: Any, pp: int, tp_group: Any, dp: int, micro_batch: int
) -> tuple[TrainingState, SourceCheckpoint]:
    """Fill ``engine`` (any layout) from checkpoint ``path`` of another layout; this rank's part.

    Sets the module's weights, the fp32 master weights and Adam's moments and
    step count, the learning-rate schedule and DeepSpeed's step counters.
    """
    source = SourceCheckpoint(path, args)
    samples = source.consumed_samples
    if samples % (micro_batch * dp):
        raise UnsupportedCheckpoint(
            f"{path}: {samples} consumed samples are not a whole number of "
            f"micro_batch_size({micro_batch}) * dp({dp}) micro-batches"
        )
    tp_rank = group_rank(tp_group)
    local = _locals(engine, source, n_layers=args.n_layers, pp=pp, tp_rank=tp_rank)
    zero, adam_step = engine.optimizer, source.meta["adam_step"]
    with torch.no_grad():
        slices = ds_compat.master_slices(zero)
        if slices is not None:
            _fill_slices(zero, slices, local, adam_step)
        else:
            _fill_plain(getattr(zero, "optimizer", zero), local, adam_step)
    source.close()
    optimizer = getattr(zero, "optimizer", zero)
    for group in optimizer.param_groups:
        if "step" in group:  # apex FusedAdam counts steps per group
            group["step"] = adam_step
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(source.meta["lr_scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = source.meta["step"]
    engine.global_samples = samples
    engine.skipped_steps = source.meta["skipped_steps"]
    state = TrainingState(
        step=source.meta["step"],
        consumed_tokens=source.meta["consumed_tokens"],
        data={"position": samples // (micro_batch * dp)},
    )
    return state, source


def read_full_state(path: Path, args: Any) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 weight and moments, ``name/key`` (tests, inspection)."""
    source = SourceCheckpoint(path, args)
    return {f"{n}/{k}": source.read_full(n, k) for n in source.names() for k in KEYS}


def main(argv: list[str]) -> int:
    from orchestrator.config.schema import load_config
    from orchestrator.state.checkpoint import checkpoint_dir, latest_tag

    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.state.reshard", description=__doc__
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default=None, help="checkpoint name (default: latest)")
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.run_dir / "config.yaml")
        tag = ns.tag or latest_tag(ns.run_dir)
        if tag is None:
            raise ValueError(f"{ns.run_dir}: no complete checkpoint (checkpoints/latest)")
        source = SourceCheckpoint(checkpoint_dir(ns.run_dir) / tag, cfg.model.to_args())
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    numel = sum(math.prod(source.param(n).full_shape) for n in source.names())
    print(
        f"{tag}: {source.layout.describe()}, {len(source.params)} parameters "
        f"({numel:,} elements), step {source.meta['step']}: loads under any layout"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
