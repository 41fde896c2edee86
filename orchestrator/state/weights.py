"""Layout-free weights: read our checkpoints, Hugging Face and Meta releases into
one full state dict (Meta's names, unpadded), and write Hugging Face releases.

Every file is read with ``torch.load(weights_only=True)`` or safetensors, so
reading a checkpoint cannot run code. Our checkpoints are read offline, from
DeepSpeed's per-rank model files, for any tp/pp layout with ZeRO 0-2 (ZeRO-3
keeps the weights only in its partitioned optimiser files).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from model_parallel.args import ModelArgs
from orchestrator.state.convert import StateDict, from_hf, hf_config, load_meta_checkpoint, to_hf

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.cache
def _tp_dims() -> dict[str, int]:
    """The axis each sharded parameter is split along, as the layers record it.

    Read off a one-block model (the names and the axes do not depend on the
    sizes): Meta's names, a block's parameters without their ``layers.N.``.
    """
    from model_parallel.layers import is_sharded
    from model_parallel.llama import Transformer

    tiny = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=8, multiple_of=8, max_seq_len=8)
    return {
        name.removeprefix("layers.0."): param.partition_dim  # type: ignore[attr-defined]
        for name, param in Transformer(tiny).named_parameters()
        if is_sharded(param)
    }


def tp_dim(name: str) -> int | None:
    """The axis tp splits parameter ``name`` (Meta's name) along, or None (replicated)."""
    rest = name.split(".", 2)[2] if name.startswith("layers.") else name
    return _tp_dims().get(rest)


def tp_replicas(name: str, args: ModelArgs, tp: int) -> int:
    """How many consecutive tp ranks hold the same shard of ``name`` (KV heads when tp > them)."""
    rest = name.split(".", 2)[2] if name.startswith("layers.") else name
    if rest in ("attention.wk.weight", "attention.wv.weight"):
        return args.kv_replicas(tp)
    return 1


def merge_tp(shards: list[StateDict], args: ModelArgs) -> StateDict:
    """Full tensors from one state dict per tp rank (Meta names; vocab padding dropped;
    of replicated KV heads, the first copy of each)."""
    out: StateDict = {}
    for name in shards[0]:
        dim = tp_dim(name)
        unique = shards[:: tp_replicas(name, args, len(shards))]
        tensor = shards[0][name] if dim is None else torch.cat([s[name] for s in unique], dim=dim)
        if name in ("tok_embeddings.weight", "output.weight"):
            tensor = tensor[: args.vocab_size]  # drop the tp padding rows
        out[name] = tensor.clone()
    return out


def read_checkpoint(path: Path, args: ModelArgs, *, tp: int, pp: int) -> StateDict:
    """The full state dict of one of our checkpoints (``RUN_DIR/checkpoints/step_N``)."""
    if pp > 1:
        per_tp: list[StateDict] = [{} for _ in range(tp)]
        for f in path.iterdir():
            match = _LAYER_FILE.match(f.name)
            if match:
                layer, rank = int(match.group(1)), int(match.group(2))
                per_tp[rank].update(_pipeline_names(_load(f), layer, args.n_layers))
    else:
        files = sorted(f for f in path.iterdir() if _MP_FILE.match(f.name))
        per_tp = [_load(f)["module"] for f in files]
    if len(per_tp) != tp or not all(per_tp):
        raise ValueError(f"{path}: expected model files of {tp} tensor-parallel ranks")
    return merge_tp(per_tp, args)


def _pipeline_names(state: StateDict, layer: int, n_layers: int) -> StateDict:
    """DeepSpeed layer file -> Meta names: 0 embedding, i+1 block i, n+1 head."""
    if 1 <= layer <= n_layers:
        return {f"layers.{layer - 1}.{k.removeprefix('block.')}": v for k, v in state.items()}
    return dict(state)


def global_name(name: str, n_layers: int, pp: int) -> str:
    """Meta's name of a module parameter: the pipeline's ``3.block.x`` is ``layers.2.x``."""
    if pp == 1:
        return name
    layer, rest = name.split(".", 1)
    return next(iter(_pipeline_names({rest: torch.empty(0)}, int(layer), n_layers)))


def read_hf(directory: Path, args: ModelArgs) -> StateDict:
    """A Hugging Face ``LlamaForCausalLM`` directory (safetensors or .bin)."""
    config = json.loads((directory / "config.json").read_text())
    expected = hf_config(args)
    config.setdefault("num_key_value_heads", config.get("num_attention_heads"))  # older files
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "intermediate_size",
    ):
        if config.get(key) != expected[key]:
            raise ValueError(
                f"model.init_from={directory}: {key}={config.get(key)} in config.json, "
                f"the model config needs {expected[key]}"
            )
    state: StateDict = {}
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        from safetensors.torch import load_file

        for f in safetensors:
            state.update(load_file(f))
    else:
        for f in sorted(directory.glob("pytorch_model*.bin")):
            state.update(_load(f))
    if not state:
        raise ValueError(f"model.init_from={directory}: no *.safetensors or pytorch_model*.bin")
    return from_hf(state, args)


def read_pretrained(path: Path, args: ModelArgs) -> StateDict:
    """Weights to start from: a Hugging Face directory or a Meta release (params.json)."""
    if (path / "config.json").is_file():
        return read_hf(path, args)
    if (path / "params.json").is_file():
        meta_args, state = load_meta_checkpoint(path)
        shape = ("dim", "n_layers", "n_heads", "num_kv_heads", "vocab_size")
        if any(getattr(meta_args, key) != getattr(args, key) for key in shape):
            raise ValueError(f"model.init_from={path}: params.json does not match the model config")
        return state
    raise ValueError(
        f"model.init_from={path}: neither a Hugging Face (config.json) nor a Meta "
        "(params.json) checkpoint"
    )


def write_hf(state: StateDict, args: ModelArgs, out: Path, *, tokenizer: Path | None) -> None:
    """A directory ``LlamaForCausalLM.from_pretrained`` loads (safetensors + config.json)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in to_hf(state, args).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    bos, eos = 1, 2  # SentencePiece LLaMA's
    if tokenizer is not None:
        bos, eos = _write_tokenizer(tokenizer, out)
    config = {
        **hf_config(args),
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _write_tokenizer(tokenizer: Path, out: Path) -> tuple[int, int]:
    """The run's tokenizer next to the weights, as transformers loads it; its (bos, eos) ids.

    A SentencePiece ``.model`` becomes ``tokenizer.model`` with a LlamaTokenizer
    config; a Hugging Face ``tokenizer.json`` (Llama 3) is copied with the
    ``tokenizer_config.json`` beside it, or a PreTrainedTokenizerFast one.
    """
    from orchestrator.data.tokenizer import load_tokenizer, tokenizer_file

    loaded = load_tokenizer(tokenizer)
    source = tokenizer_file(tokenizer)
    if source.suffix == ".json":
        shutil.copyfile(source, out / "tokenizer.json")
        beside = source.with_name("tokenizer_config.json")
        if beside.is_file():
            shutil.copyfile(beside, out / "tokenizer_config.json")
        else:
            vocab = json.loads(source.read_text()).get("added_tokens", [])
            names = {t["id"]: t["content"] for t in vocab}
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": names.get(loaded.bos_id),
                "eos_token": names.get(loaded.eos_id),
            }
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return loaded.bos_id, loaded.eos_id
    shutil.copyfile(source, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            },
            indent=2,
        )
    )
    return loaded.bos_id, loaded.eos_id
