"""Re-sharding: a checkpoint saved under one layout resumes under another.

DeepSpeed's files are per rank: ``zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt``
holds one dp partition of the flattened fp32 master weights and Adam moments of
one model-parallel rank (a pipeline stage x a tp shard), and cannot be loaded at
another tp, pp or dp. We go through a layout-free form written next to them::

    step_N/layout.json                  the layout that wrote the checkpoint
    step_N/universal/meta.json          its training state and Adam step count
    step_N/universal/<name>.safetensors fp32 weight, exp_avg, exp_avg_sq of one
                                        parameter: full, unpadded, Meta's name

``write_universal`` builds it offline from the per-rank files (ZeRO 1 and 2);
``load_universal`` fills a freshly built engine of any layout from it, each
rank reading only the parameters it holds and cutting out its tp shard.
Training state moves with it: the step, the learning-rate schedule, and the
data position as a count of samples (so the next step reads the same global
batch under any layout).

    python -m orchestrator.reshard RUN_DIR [--tag step_00000400]

converts ahead of time (a resume does it on rank 0 when it finds a checkpoint
of another layout and no ``universal/`` yet).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from model_parallel.args import ModelArgs
from model_parallel.layers import shard_of
from model_parallel.mappings import group_rank, group_size
from orchestrator.checkpoint import LAYOUT_FILE, TrainingState, read_layout
from orchestrator.weights import global_name, merge_tp

UNIVERSAL = "universal"
_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _load(path: Path) -> Any:
    """A DeepSpeed file, unpickled with weights_only=True plus DeepSpeed's plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _merge_dp(parts: list[dict[str, Any]], shapes: list[dict[str, Any]]) -> dict[str, Any]:
    """One model-parallel rank's parameters from its dp partitions: name -> key -> tensor."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    for group in range(len(shapes)):
        for part in parts:  # in dp rank order: a parameter's fragments follow each other
            flat = {
                "fp32": part["single_partition_of_fp32_groups"][group],
                **part["base_optimizer_state"]["state"][group],
            }
            for name, addr in part["param_slice_mappings"][group].items():
                slot = pieces.setdefault(name, {key: [] for key in _KEYS})
                for key in _KEYS:
                    slot[key].append(flat[key].narrow(0, addr.start, addr.numel))
    out: dict[str, Any] = {}
    for names in shapes:
        for name, shape in names.items():
            out[name] = {key: torch.cat(pieces[name][key]).view(shape).clone() for key in _KEYS}
    return out


def _adam_step(part: dict[str, Any]) -> int:
    return int(part["base_optimizer_state"]["state"][0]["step"])


def write_universal(path: Path, args: ModelArgs) -> Path:
    """Write ``path/universal`` from checkpoint ``path``'s per-rank files (rank 0, offline).

    Atomic: built under ``universal.partial`` and renamed, so an interrupted
    conversion is redone, never half-read.
    """
    out = path / UNIVERSAL
    if (out / "meta.json").is_file():
        return out
    layout = read_layout(path)
    if layout is None:
        raise ValueError(f"{path}: no {LAYOUT_FILE}; its layout is unknown, cannot re-shard it")
    if layout.zero_stage not in (1, 2):
        raise ValueError(
            f"{path}: saved with parallel.zero_stage={layout.zero_stage}; re-sharding the "
            "optimiser state supports ZeRO 1 and 2 (resume it under its own layout, "
            f"{layout.describe()})"
        )
    tmp = path / f"{UNIVERSAL}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    from safetensors.torch import save_file

    adam_step = 0
    for stage in range(layout.pp):
        per_tp = []
        for tp_rank in range(layout.tp):
            mp = stage * layout.tp + tp_rank  # DeepSpeed's model-parallel rank
            shapes = _load(path / f"mp_rank_{mp:02d}_model_states.pt")["param_shapes"]
            parts = [
                _load(path / f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt")[
                    "optimizer_state_dict"
                ]
                for dp in range(layout.dp)
            ]
            adam_step = _adam_step(parts[0])
            local = _merge_dp(parts, shapes)
            per_tp.append({global_name(n, args.n_layers, layout.pp): t for n, t in local.items()})
        for name in per_tp[0]:
            tensors = {
                key: merge_tp([{name: shard[name][key]} for shard in per_tp], args)[name]
                for key in _KEYS
            }
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
    first = _load(path / "mp_rank_00_model_states.pt")
    micro_batches = int(first["data"]["position"])
    meta = {
        "source_layout": asdict(layout),
        "adam_step": adam_step,
        "step": int(first["step"]),
        "consumed_tokens": int(first["consumed_tokens"]),
        "consumed_samples": micro_batches * layout.micro_batch_size * layout.dp,
        "skipped_steps": int(first["skipped_steps"]),
        "lr_scheduler": first["lr_scheduler"],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def load_universal(
    engine: Any, path: Path, *, n_layers: int, pp: int, tp_group: Any, dp: int, micro_batch: int
) -> TrainingState:
    """Fill ``engine`` (ZeRO 1 or 2, any layout) from ``path/universal``; this rank's part only.

    Sets the module's weights, the fp32 master partition and Adam's moments
    and step count, the learning-rate schedule and DeepSpeed's step counters.
    """
    from safetensors import safe_open

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ValueError(
            "re-sharding loads into ZeRO 1 or 2 only: set parallel.zero_stage=1 or 2 "
            "to resume this checkpoint under a new layout"
        )
    root = path / UNIVERSAL
    meta = json.loads((root / "meta.json").read_text())
    tp_rank, tp_size = group_rank(tp_group), group_size(tp_group)
    local: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():
        with safe_open(str(root / f"{global_name(name, n_layers, pp)}.safetensors"), "pt") as f:
            local[param] = {
                key: shard_of(f.get_tensor(key), param, tp_rank=tp_rank, tp_size=tp_size)
                for key in _KEYS
            }
    with torch.no_grad():
        for param, tensors in local.items():
            param.copy_(tensors["fp32"].to(param.dtype))
        for group, params in enumerate(zero.bit16_groups):
            flat = zero.single_partition_of_fp32_groups[group]
            moments = {key: torch.zeros_like(flat) for key in ("exp_avg", "exp_avg_sq")}
            targets = {"fp32": flat.data, **moments}
            for param in params:
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is None:  # no fragment of it in this dp rank's partition
                    continue
                hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
                for key, target in targets.items():
                    source = local[param][key].flatten().narrow(0, lp.start, lp.numel)
                    target.narrow(0, hp.start, hp.numel).copy_(source)
            step = torch.tensor(float(meta["adam_step"]), dtype=torch.float32)
            zero.optimizer.state[flat] = {"step": step, **moments}
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(meta["lr_scheduler"])
    for group, lr in zip(zero.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    samples = int(meta["consumed_samples"])
    if samples % (micro_batch * dp):
        raise ValueError(
            f"{path}: {samples} consumed samples are not a whole number of "
            f"micro_batch_size({micro_batch}) * dp({dp}) micro-batches"
        )
    engine.global_steps = int(meta["step"])
    engine.global_samples = samples
    engine.skipped_steps = int(meta["skipped_steps"])
    return TrainingState(
        step=int(meta["step"]),
        consumed_tokens=int(meta["consumed_tokens"]),
        data={"position": samples // (micro_batch * dp)},
    )


def main(argv: list[str]) -> int:
    from orchestrator.checkpoint import checkpoint_dir, latest_tag
    from orchestrator.config import load_config

    parser = argparse.ArgumentParser(prog="python -m orchestrator.reshard", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default=None, help="checkpoint name (default: latest)")
    ns = parser.parse_args(argv)
    try:
        cfg = load_config(ns.run_dir / "config.yaml")
        tag = ns.tag or latest_tag(ns.run_dir)
        if tag is None:
            raise ValueError(f"{ns.run_dir}: no complete checkpoint (checkpoints/latest)")
        out = write_universal(checkpoint_dir(ns.run_dir) / tag, cfg.model.to_args())
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
