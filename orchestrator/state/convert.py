"""Weight mappings between this project's LLaMA and the two public formats.

The layout-free "full state dict" uses Meta's parameter names with unpadded
tensors (``Transformer.full_state_dict`` / ``load_full_state_dict``). From it:

- Hugging Face ``LlamaForCausalLM``: renamed keys, and wq/wk permuted because
  Hugging Face rotates the two halves of each head (``rotate_half``) where
  Meta rotates interleaved pairs (wk per KV head: ``n_kv_heads`` of them).
- Meta's original release: ``params.json`` plus ``consolidated.NN.pth``, one
  file per model-parallel rank of fairscale's layers (7B: 1, 13B: 2, 33B: 4,
  65B: 8; Llama 2 70B and Llama 3 70B: 8; Llama 3.1 405B: 8 or 16). Each file
  holds a tensor-parallel shard; the split axis per parameter is in
  ``META_SPLIT_DIM``, except Llama 3's embedding, split by vocabulary rows (read
  from the shapes). With more shards than KV heads (405B's 8 at MP16) each KV
  head sits on shards / n_kv_heads consecutive shards.

Checkpoints are read with ``torch.load(weights_only=True)``: loading one
cannot run code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from model_parallel.args import ModelArgs, RopeScaling

StateDict = dict[str, torch.Tensor]

# Axis along which fairscale's layers in Meta's model.py split each parameter
# (None: replicated on every model-parallel rank).
META_SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,  # ParallelEmbedding splits the embedding dim
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}

_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _split_key(name: str) -> tuple[str | None, str]:
    match = _LAYER_KEY.match(name)
    return (match.group(1), match.group(2)) if match else (None, name)


def _rope_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved pairs (Meta) -> two halves per head (Hugging Face), on wq/wk rows."""
    out_dim, in_dim = w.shape
    return (
        w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
    )


def _rope_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``_rope_to_hf``."""
    out_dim, in_dim = w.shape
    return (
        w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
    )


def to_hf(state: StateDict, args: ModelArgs) -> StateDict:
    """Full state dict (Meta names) -> ``LlamaForCausalLM`` state dict."""
    out: StateDict = {}
    for name, tensor in state.items():
        layer, rest = _split_key(name)
        if layer is None:
            out[_HF_TOP_NAMES[name]] = tensor
            continue
        if rest == "attention.wq.weight":
            tensor = _rope_to_hf(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _rope_to_hf(tensor, args.num_kv_heads)
        out[f"model.layers.{layer}.{_HF_LAYER_NAMES[rest]}"] = tensor
    return out


def from_hf(state: StateDict, args: ModelArgs) -> StateDict:
    """``LlamaForCausalLM`` state dict -> full state dict (Meta names)."""
    top = {hf: ours for ours, hf in _HF_TOP_NAMES.items()}
    per_layer = {hf: ours for ours, hf in _HF_LAYER_NAMES.items()}
    out: StateDict = {}
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some transformers versions save
        if name in top:
            out[top[name]] = tensor
            continue
        match = _HF_LAYER_KEY.match(name)
        if match is None or match.group(2) not in per_layer:
            raise KeyError(f"unexpected Hugging Face key {name!r}")
        rest = per_layer[match.group(2)]
        if rest == "attention.wq.weight":
            tensor = _rope_from_hf(tensor, args.n_heads)
        elif rest == "attention.wk.weight":
            tensor = _rope_from_hf(tensor, args.num_kv_heads)
        out[f"layers.{match.group(1)}.{rest}"] = tensor
    return out


def hf_config(args: ModelArgs) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` describing ``args``."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.num_kv_heads,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": _hf_rope_scaling(args.rope_scaling),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def _hf_rope_scaling(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return {
        "rope_type": "llama3",
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
    }


def _meta_split_dim(name: str) -> int | None:
    return META_SPLIT_DIM[_split_key(name)[1]]


_KV = ("attention.wk.weight", "attention.wv.weight")


def _is_kv(name: str) -> bool:
    return _split_key(name)[1] in _KV


def merge_meta_shards(shards: list[StateDict], *, kv_dim: int | None = None) -> StateDict:
    """Meta's per-model-parallel-rank ``consolidated.NN.pth`` dicts -> full state dict.

    More shards than KV heads (``kv_dim`` = n_kv_heads x head_dim wide K and V):
    each KV head is replicated on ``shards / n_kv_heads`` consecutive shards (the
    rule of Megatron-Core and of ``model_parallel``'s tp), and the first copy of
    each is kept.
    """
    out: StateDict = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue  # precomputed rotary frequencies, recomputed by the model
        dim = _meta_split_dim(name)
        parts = [shard[name] for shard in shards]
        if (
            name == "tok_embeddings.weight"
            and parts[0].shape[1] == shards[0]["norm.weight"].numel()
        ):
            dim = 0  # Llama 3's VocabParallelEmbedding: each shard has rows of the vocabulary
        if dim is not None and kv_dim is not None and _is_kv(name):
            rows = sum(part.shape[0] for part in parts)
            if rows > kv_dim:
                if rows % kv_dim != 0:
                    raise ValueError(
                        f"{name}: {len(shards)} shards of {parts[0].shape[0]} rows "
                        f"are not copies of {kv_dim} rows of KV heads"
                    )
                parts = parts[:: rows // kv_dim]
        out[name] = parts[0].clone() if dim is None else torch.cat(parts, dim=dim)
    return out


def split_meta_shards(
    state: StateDict,
    num_shards: int,
    *,
    n_kv_heads: int | None = None,
    vocab_parallel_embedding: bool = False,
) -> list[StateDict]:
    """Full state dict -> ``num_shards`` dicts in Meta's ``consolidated.NN.pth`` layout;
    with more shards than ``n_kv_heads``, each KV head on ``num_shards / n_kv_heads``
    consecutive shards. The embedding is split along its width (Llama 1 and 2's
    ``ParallelEmbedding``) or, ``vocab_parallel_embedding``, along the vocabulary
    (Llama 3's ``VocabParallelEmbedding``)."""
    shards: list[StateDict] = [{} for _ in range(num_shards)]
    for name, tensor in state.items():
        dim = _meta_split_dim(name)
        if name == "tok_embeddings.weight" and vocab_parallel_embedding:
            dim = 0
        if dim is None:
            parts = [tensor] * num_shards
        elif n_kv_heads is not None and num_shards > n_kv_heads and _is_kv(name):
            if num_shards % n_kv_heads != 0:
                raise ValueError(
                    f"num_shards={num_shards}: must divide or be a multiple of "
                    f"n_kv_heads({n_kv_heads})"
                )
            heads = tensor.chunk(n_kv_heads, dim=dim)
            parts = [head for head in heads for _ in range(num_shards // n_kv_heads)]
        else:
            parts = list(tensor.chunk(num_shards, dim=dim))
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    return shards


def args_from_meta_params(params: dict[str, Any], *, vocab_size: int | None = None) -> ModelArgs:
    """``ModelArgs`` from Meta's ``params.json`` (its vocab_size is -1 in the first release)."""
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab < 0:
        if vocab_size is None:
            raise ValueError("params.json has vocab_size=-1: pass the tokenizer's vocab size")
        vocab = vocab_size
    return ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=vocab,
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=params.get("rope_theta", 10000.0),
        # Meta's use_scaled_rope: the Llama 3.1 constants, fixed in its code
        rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
    )


def load_meta_checkpoint(directory: str | Path) -> tuple[ModelArgs, StateDict]:
    """Read ``params.json`` and every ``consolidated.NN.pth`` of a Meta LLaMA release."""
    directory = Path(directory)
    params = json.loads((directory / "params.json").read_text())
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"no consolidated.*.pth in {directory}")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    head_dim = params["dim"] // params["n_heads"]
    kv_dim = params.get("n_kv_heads", params["n_heads"]) * head_dim
    state = merge_meta_shards(shards, kv_dim=kv_dim)
    args = args_from_meta_params(params, vocab_size=state["tok_embeddings.weight"].shape[0])
    return args, state


def save_meta_checkpoint(
    directory: str | Path, args: ModelArgs, state: StateDict, *, num_shards: int
) -> None:
    """Write ``params.json`` and ``num_shards`` ``consolidated.NN.pth`` files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {
        "dim": args.dim,
        "multiple_of": args.multiple_of,
        "n_heads": args.n_heads,
        "n_layers": args.n_layers,
        "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size,
    }
    if args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    if args.n_kv_heads is not None:
        params["n_kv_heads"] = args.n_kv_heads
    if args.rope_theta != 10000.0:
        params["rope_theta"] = args.rope_theta
    if args.rope_scaling is not None:
        if args.rope_scaling != RopeScaling():
            raise ValueError("Meta's params.json has only use_scaled_rope: Llama 3.1's constants")
        params["use_scaled_rope"] = True
    (directory / "params.json").write_text(json.dumps(params))
    # Llama 3's reference code (rope_theta 500,000) splits the embedding by vocabulary rows.
    shards = split_meta_shards(
        state,
        num_shards,
        n_kv_heads=args.num_kv_heads,
        vocab_parallel_embedding=args.rope_theta != 10000.0,
    )
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
