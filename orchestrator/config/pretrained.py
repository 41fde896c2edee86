"""``model.init_from``: the architecture a checkpoint states, filled into the model config.

A Hugging Face directory states its shape in ``config.json``, a Meta release in
``params.json``. With ``model=pretrained`` every model field the command line
does not set is taken from there; any other field, and with a named model
(``model=llama3_8b``) every field, is compared, and a difference is one line
naming the field, both values and the file. ``max_seq_len`` is filled (Hugging Face: the pre-training context,
``original_max_position_embeddings`` under Llama 3.1's rope scaling) but never
compared: training at another length than the checkpoint's is normal.

The SwiGLU width is compared as a width: Hugging Face states
``intermediate_size``, the config ``multiple_of`` and ``ffn_dim_multiplier``.
Filled, the width becomes ``multiple_of`` with no multiplier (Meta's rule then
rounds 8/3 * dim up to exactly it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from model_parallel.args import ffn_hidden_dim

PRETRAINED = "pretrained"  # conf/model/pretrained.yaml's name
# The architecture: what must agree with the weights (``max_seq_len`` is filled only).
_COMPARED = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta")
_LLAMA31_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_seq_len": 8192,
}
_NO_SCALING = {**_LLAMA31_SCALING, "factor": 1.0}


def checkpoint_architecture(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(model fields, the file and key each came from) of a checkpoint directory."""
    if (path / "config.json").is_file():
        return _from_hf(json.loads((path / "config.json").read_text()), path / "config.json")
    if (path / "params.json").is_file():
        return _from_meta(json.loads((path / "params.json").read_text()), path)
    raise ValueError(
        f"model.init_from={path}: neither a Hugging Face (config.json) nor a Meta "
        "(params.json) checkpoint"
    )


def _from_hf(c: dict[str, Any], file: Path) -> tuple[dict[str, Any], dict[str, str]]:
    names = {
        "dim": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "vocab_size": "vocab_size",
        "norm_eps": "rms_norm_eps",
        "rope_theta": "rope_theta",
        "hidden_dim": "intermediate_size",
    }
    values = {field: c[key] for field, key in names.items() if c.get(key) is not None}
    values.setdefault("n_kv_heads", values.get("n_heads"))
    # transformers 5 writes rope_parameters (theta inside, rope_type "default" unscaled)
    parameters = c.get("rope_parameters") or {}
    values.setdefault("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or parameters
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = {}
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        values["rope_scaling"] = {
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_seq_len": int(scaling["original_max_position_embeddings"]),
        }
        values["max_seq_len"] = values["rope_scaling"]["original_max_seq_len"]
    elif scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        raise ValueError(f"model.init_from: rope_scaling type {kind!r} in {file}: only llama3")
    else:
        values["rope_scaling"] = dict(_NO_SCALING)
        if c.get("max_position_embeddings"):
            values["max_seq_len"] = int(c["max_position_embeddings"])
    sources = {field: f"{key} in {file}" for field, key in names.items()}
    rope = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    sources["rope_scaling"] = f"{rope} in {file}"
    if "rope_theta" not in c:
        sources["rope_theta"] = f"rope_parameters.rope_theta in {file}"
    return values, sources


def _from_meta(p: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    file = path / "params.json"
    values: dict[str, Any] = {
        "dim": p["dim"],
        "n_layers": p["n_layers"],
        "n_heads": p["n_heads"],
        "n_kv_heads": p.get("n_kv_heads", p["n_heads"]),
        "norm_eps": p.get("norm_eps", 1e-6),
        "rope_theta": p.get("rope_theta", 10000.0),
        "rope_scaling": dict(_LLAMA31_SCALING if p.get("use_scaled_rope") else _NO_SCALING),
        "hidden_dim": ffn_hidden_dim(
            p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")
        ),
    }
    if p.get("vocab_size", -1) > 0:
        values["vocab_size"] = p["vocab_size"]
    else:  # the first release's -1: the embedding's rows (read lazily from one shard)
        values["vocab_size"] = _meta_vocab(path)
    sources = {field: f"{field} in {file}" for field in values}
    sources["hidden_dim"] = f"multiple_of/ffn_dim_multiplier in {file}"
    sources["rope_scaling"] = f"use_scaled_rope in {file}"
    return values, sources


def _meta_vocab(path: Path) -> int:
    import torch

    first = sorted(path.glob("consolidated.*.pth"))
    if not first:
        raise ValueError(f"model.init_from={path}: no consolidated.*.pth next to params.json")
    shard = torch.load(first[0], map_location="cpu", weights_only=True, mmap=True)
    return int(shard["tok_embeddings.weight"].shape[0])


def command_line_keys(overrides: Sequence[str]) -> set[str]:
    """``model.n_kv_heads`` of ``model.n_kv_heads=8`` (and of ``+``/``++``/``~`` forms)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def fill_model_from_checkpoint(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """``model.init_from``'s architecture into ``cfg.model``; raise on a conflict.

    With ``model=pretrained`` a field is the checkpoint's unless the command line
    (``overrides``) sets it; with a named model (``model=llama3_8b``) every field
    is the config's and is compared.
    """
    model = cfg.model
    pretrained = model.name == PRETRAINED
    if model.init_from is None:
        if pretrained:
            raise ValueError(
                "model.init_from=None: model=pretrained reads the architecture from a "
                "checkpoint (add model.init_from=DIR)"
            )
        return
    from orchestrator.data.build import _absolute  # the rule resolve_paths applies later

    path = _absolute(str(model.init_from))
    if not path.is_dir():
        raise ValueError(f"model.init_from={model.init_from}: no such directory ({path})")
    values, sources = checkpoint_architecture(path)
    given = command_line_keys(overrides)

    def is_set(key: str) -> bool:
        return f"model.{key}" in given if pretrained else not OmegaConf.is_missing(model, key)

    for field in _COMPARED:
        if not is_set(field):
            model[field] = values[field]
            continue
        ours = model[field]
        if field == "n_kv_heads" and ours is None:
            ours = model.n_heads
        if not _same(ours, values[field]):
            raise ValueError(
                f"model.{field}={ours}: the checkpoint has {values[field]} "
                f"({sources[field]}); drop model.{field} or make them agree"
            )
    if not (is_set("multiple_of") or is_set("ffn_dim_multiplier")):
        model.multiple_of, model.ffn_dim_multiplier = values["hidden_dim"], None
    _check_ffn(model, values["hidden_dim"], sources["hidden_dim"])
    for key, value in values["rope_scaling"].items():
        if not is_set(f"rope_scaling.{key}"):
            model.rope_scaling[key] = value
    _check_scaling(model, values["rope_scaling"], sources["rope_scaling"])
    if pretrained and not is_set("max_seq_len"):
        if "max_seq_len" not in values:
            raise ValueError(
                f"model.max_seq_len: must be set ({sources['dim'].split(' in ')[1]} states "
                "no context length; add model.max_seq_len=... to the command)"
            )
        model.max_seq_len = values["max_seq_len"]


def _check_ffn(model: DictConfig, width: int, source: str) -> None:
    ours = ffn_hidden_dim(model.dim, model.multiple_of, model.ffn_dim_multiplier)
    if ours != width:
        raise ValueError(
            f"model.multiple_of={model.multiple_of}: with model.ffn_dim_multiplier="
            f"{model.ffn_dim_multiplier} the SwiGLU width is {ours}, the checkpoint has "
            f"{width} ({source})"
        )


def _check_scaling(model: DictConfig, theirs: dict[str, Any], source: str) -> None:
    section = model.rope_scaling
    if float(section.factor) == 1.0 and float(theirs["factor"]) == 1.0:
        return  # no scaling either way: the other constants do not matter
    for key, value in theirs.items():
        if not _same(section[key], value):
            raise ValueError(
                f"model.rope_scaling.{key}={section[key]}: the checkpoint has {value} ({source})"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return bool(a == b)
