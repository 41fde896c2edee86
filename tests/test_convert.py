"""Weight mappings against Hugging Face transformers and Meta's checkpoint layout.

No weights are downloaded: a randomly initialised ``LlamaForCausalLM`` is the
reference. Meta-format shards are written here by an independent rule (the
inverse of the Hugging Face conversion script plus fairscale's split axes).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model_parallel.args import ModelArgs
from model_parallel.llama import Transformer
from orchestrator.state.convert import (
    from_hf,
    hf_config,
    load_meta_checkpoint,
    save_meta_checkpoint,
    to_hf,
)
from tests.tiny import tiny_args

transformers = pytest.importorskip("transformers")

# 6 heads of 16 (Meta's rotary permutation is per head), an odd vocabulary, 64 positions
ARGS = tiny_args(dim=96, n_heads=6, vocab_size=203, max_seq_len=64)


def _hf_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_config(ARGS), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits nothing here, but make norms non-trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))


def _our_logits(state: dict[str, torch.Tensor], args: ModelArgs = ARGS) -> torch.Tensor:
    model = Transformer(args)
    model.load_full_state_dict(state)
    with torch.no_grad():
        return model.gather_logits(model(_tokens()))


def test_logits_match_transformers() -> None:
    hf = _hf_model()
    with torch.no_grad():
        expected = hf(_tokens()).logits
    ours = _our_logits(from_hf(hf.state_dict(), ARGS))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_hf_round_trip_is_exact() -> None:
    model = Transformer(ARGS, seed=3)
    state = model.full_state_dict()
    back = from_hf(to_hf(state, ARGS), ARGS)
    assert back.keys() == state.keys()
    for name in state:
        assert torch.equal(back[name], state[name]), name
    # and transformers loads the exported dict strictly and agrees on the logits
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf_config(ARGS), attn_implementation="eager")
    ).eval()
    hf.load_state_dict(to_hf(state, ARGS), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            model.gather_logits(model(_tokens())), hf(_tokens()).logits, rtol=1e-4, atol=1e-5
        )


def _write_meta_like_release(
    directory: Path, hf_state: dict[str, torch.Tensor], shards: int
) -> None:
    """Write Meta's layout from HF weights without using orchestrator.state.convert."""
    n_heads, dim = ARGS.n_heads, ARGS.dim

    def unpermute(w: torch.Tensor) -> torch.Tensor:  # inverse of HF's convert_llama_weights permute
        return w.view(n_heads, 2, dim // n_heads // 2, dim).transpose(1, 2).reshape(dim, dim)

    names = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
        "model.norm.weight": ("norm.weight", None),
        "lm_head.weight": ("output.weight", 0),
    }
    layer_names = {
        "self_attn.q_proj": ("attention.wq", 0),
        "self_attn.k_proj": ("attention.wk", 0),
        "self_attn.v_proj": ("attention.wv", 0),
        "self_attn.o_proj": ("attention.wo", 1),
        "mlp.gate_proj": ("feed_forward.w1", 0),
        "mlp.down_proj": ("feed_forward.w2", 1),
        "mlp.up_proj": ("feed_forward.w3", 0),
        "input_layernorm": ("attention_norm", None),
        "post_attention_layernorm": ("ffn_norm", None),
    }
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for key, w in hf_state.items():
        if key in names:
            meta, dim_split = names[key]
        else:
            _, _, layer, *rest = key.split(".")
            hf_name = ".".join(rest[:-1])
            meta_base, dim_split = layer_names[hf_name]
            meta = f"layers.{layer}.{meta_base}.weight"
            if hf_name in ("self_attn.q_proj", "self_attn.k_proj"):
                w = unpermute(w)
        parts = [w] * shards if dim_split is None else list(w.chunk(shards, dim=dim_split))
        for shard, part in zip(out, parts, strict=True):
            shard[meta] = part.clone()
    out[0]["rope.freqs"] = torch.zeros(dim // n_heads // 2)  # present in Meta's files, unused
    directory.mkdir()
    (directory / "params.json").write_text(
        json.dumps(
            {
                "dim": dim,
                "multiple_of": ARGS.multiple_of,
                "n_heads": n_heads,
                "n_layers": ARGS.n_layers,
                "norm_eps": ARGS.norm_eps,
                "vocab_size": -1,
            }
        )
    )
    for i, shard in enumerate(out):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_matches_transformers(tmp_path: Path, shards: int) -> None:
    hf = _hf_model(seed=shards)
    with torch.no_grad():
        expected = hf(_tokens()).logits
    _write_meta_like_release(tmp_path / "release", hf.state_dict(), shards)
    args, state = load_meta_checkpoint(tmp_path / "release")
    assert (
        dataclasses.replace(args, max_seq_len=ARGS.max_seq_len) == ARGS
    )  # no context in params.json
    torch.testing.assert_close(_our_logits(state, args), expected, rtol=1e-4, atol=1e-5)


def test_meta_save_load_round_trip(tmp_path: Path) -> None:
    state = Transformer(ARGS, seed=5).full_state_dict()
    save_meta_checkpoint(tmp_path / "ckpt", ARGS, state, num_shards=2)
    args, back = load_meta_checkpoint(tmp_path / "ckpt")
    assert (
        dataclasses.replace(args, max_seq_len=ARGS.max_seq_len) == ARGS
    )  # no context in params.json
    for name in state:
        assert torch.equal(back[name], state[name]), name
