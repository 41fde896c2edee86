"""Reading a DeepSpeed checkpoint's tensors in the tests (its files hold other objects too)."""

from __future__ import annotations

from pathlib import Path

import torch


def tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) checkpoint object, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def _load(path: Path) -> object:
    # DeepSpeed's own files hold non-tensor objects too: read them in the tests only.
    return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every file of one checkpoint folder."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*.pt")):
        out.update(tensors(_load(f), f.name))
    return out


def weights_and_optimiser(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the module weights (pipeline layer files too) and the optimiser."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*model_states.pt")):
        state = _load(f)
        if isinstance(state, dict) and "module" in state:  # mp_rank_* / zero_pp_rank_*
            state = {"module": state["module"], "optimizer": state.get("optimizer")}
        out.update(tensors(state, f.name))  # layer_NN-model_states.pt: a stage's weights
    for f in sorted(checkpoint.glob("*optim_states.pt")):
        out.update(tensors(_load(f), f.name))
    return out
