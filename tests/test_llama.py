"""The LLaMA model under tensor parallelism against dense references.

- one block at tp = 1, 2, 4 (with and without sequence parallelism) against a
  plain-torch block written here from the gathered weights (complex-number
  rotary embedding, explicit causal softmax), outputs and all gradients;
- the whole tiny model at tp = 2 and 4 against tp = 1 with the same seed:
  identical initial shards, logits, loss and gradients;
- pipeline-stage carving: stages chained equal the whole model.
"""

from __future__ import annotations

import math

import pytest
import torch

from model_parallel.args import ModelArgs
from model_parallel.groups import ProcessGroups
from model_parallel.layers import gather_full, load_shard_
from model_parallel.layout import Layout
from model_parallel.llama import Transformer, TransformerBlock
from tests.distributed import run_ranks
from tests.tiny import tiny_args

TOL = dict(rtol=1e-4, atol=1e-5)
# model=tiny's shape (conf/model/tiny.yaml), with 64 positions
TINY = tiny_args(dim=128, n_layers=4, n_heads=8, vocab_size=2000, multiple_of=64, max_seq_len=64)


def _dense_block(
    x: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int, eps: float
) -> torch.Tensor:
    """A LLaMA block in plain torch, following Meta's reference code."""

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    b, s, d = x.shape
    hd = d // n_heads
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs_cis = torch.polar(torch.ones(s, hd // 2), torch.outer(torch.arange(s).float(), freqs))

    def rope(t: torch.Tensor) -> torch.Tensor:  # (B, S, h, hd)
        tc = torch.view_as_complex(t.reshape(b, s, n_heads, hd // 2, 2))
        return torch.view_as_real(tc * freqs_cis[None, :, None, :]).flatten(3)

    h = rms(x, w["attention_norm.weight"])
    q = rope((h @ w["attention.wq.weight"].T).view(b, s, n_heads, hd)).transpose(1, 2)
    k = rope((h @ w["attention.wk.weight"].T).view(b, s, n_heads, hd)).transpose(1, 2)
    v = (h @ w["attention.wv.weight"].T).view(b, s, n_heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    x = x + attn @ w["attention.wo.weight"].T
    h = rms(x, w["ffn_norm.weight"])
    ff = torch.nn.functional.silu(h @ w["feed_forward.w1.weight"].T) * (
        h @ w["feed_forward.w3.weight"].T
    )
    return x + ff @ w["feed_forward.w2.weight"].T


def _block_check(rank: int, ws: int, sequence_parallel: bool) -> None:
    # odd per-head width and heads/hidden that are odd multiples of ws
    args = ModelArgs(dim=3 * ws * 6, n_layers=1, n_heads=3 * ws, vocab_size=10, multiple_of=ws * 5)
    assert args.hidden_dim % ws == 0
    groups = ProcessGroups.build(Layout(tp=ws))
    gen = torch.Generator().manual_seed(5)
    b, s = 2, 7 * ws
    x = torch.randn(b, s, args.dim, generator=gen)
    g = torch.randn(b, s, args.dim, generator=gen)
    block = TransformerBlock(args, tp_group=groups.tp_group, sequence_parallel=sequence_parallel)
    dense_w = {}
    for name, p in block.named_parameters():
        full = torch.randn(
            p.shape if not getattr(p, "tensor_model_parallel", False) else _full(p, ws),
            generator=gen,
        )
        if name.endswith("norm.weight"):
            full = 1 + 0.1 * full
        else:
            full = full / math.sqrt(full.shape[-1])  # keep activations O(1)
        load_shard_(p, full, tp_rank=groups.tp_rank, tp_size=ws)
        dense_w[name] = full.clone().requires_grad_()
    xd = x.clone().requires_grad_()
    yd = _dense_block(xd, dense_w, args.n_heads, args.norm_eps)
    yd.backward(g)

    def mine(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(ws, dim=1)[rank] if sequence_parallel else t

    xp = mine(x).clone().requires_grad_()
    y = block(xp)
    torch.testing.assert_close(y, mine(yd.detach()), **TOL)
    y.backward(mine(g))
    torch.testing.assert_close(xp.grad, mine(xd.grad), **TOL)
    for name, p in block.named_parameters():
        grad = p.grad
        if getattr(p, "tensor_model_parallel", False):
            expected = dense_w[name].grad.chunk(ws, dim=p.partition_dim)[rank]
        else:
            expected = dense_w[name].grad
        torch.testing.assert_close(grad, expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def _full(p: torch.Tensor, ws: int) -> tuple[int, ...]:
    shape = list(p.shape)
    shape[p.partition_dim] *= ws
    return tuple(shape)


@pytest.mark.parametrize("ws,sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_block_matches_dense(ws: int, sp: bool) -> None:
    run_ranks(_block_check, ws, sp)


def _model_run(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(tokens[:, :-1])
    loss = model.loss(logits, tokens[:, 1:]).mean()
    loss.backward()
    return model.gather_logits(logits).detach(), loss.detach()


def _model_check(rank: int, ws: int, sequence_parallel: bool, checkpointing: bool) -> None:
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(6))
    ref = Transformer(TINY, seed=7)
    ref_logits, ref_loss = _model_run(ref, tokens)
    ref_grads = ref.full_state_dict(grads=True)

    groups = ProcessGroups.build(Layout(tp=ws))
    model = Transformer(
        TINY,
        groups=groups,
        seed=7,
        sequence_parallel=sequence_parallel,
        activation_checkpointing=checkpointing,
    )
    # identical initial weights: each shard is exactly the tp=1 tensor's slice
    ref_weights = ref.full_state_dict()
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            gather_full(p, groups.tp_group), ref_weights[name], rtol=0, atol=0
        )
    logits, loss = _model_run(model, tokens)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    grads = model.full_state_dict(grads=True)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    "ws,sp,ckpt", [(2, False, False), (4, False, False), (2, True, False), (2, False, True)]
)
def test_tiny_model_tp_matches_tp1(ws: int, sp: bool, ckpt: bool) -> None:
    run_ranks(_model_check, ws, sp, ckpt)


def test_padded_vocab_never_changes_the_loss() -> None:
    # tp=1 pads 2000 -> 2048: the extra logits exist but are masked out of the loss.
    model = Transformer(TINY, seed=1)
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = model(tokens[:, :-1])
    assert logits.shape[-1] == 2048
    expected = torch.nn.functional.cross_entropy(
        logits[..., : TINY.vocab_size].reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(model.loss(logits, tokens[:, 1:]).mean(), expected)


def test_rotary_tables_stay_fp32_and_out_of_state_dicts() -> None:
    """The cached cos/sin tables survive a bf16 cast in fp32, are not saved, and give
    the same rotation as tables computed for this sequence length, also beyond the
    cache (``max_seq_len``)."""
    from model_parallel.rotary import RotaryTables, rotary_cos_sin

    model = Transformer(TINY, seed=0).bfloat16()
    assert not any("rotary" in name for name in model.state_dict())
    rotary = model.layers["0"].attention.rotary
    assert isinstance(rotary, RotaryTables)
    assert rotary.cos.dtype == rotary.sin.dtype == torch.float32
    cpu = torch.device("cpu")
    for seq in (1, 17, TINY.max_seq_len, TINY.max_seq_len + 5):
        want = rotary_cos_sin(seq, TINY.head_dim, TINY.rope_theta, cpu)
        got = rotary(seq, cpu)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    rotary.to_empty(device=cpu)  # uninitialised storage: refilled, not garbage
    assert torch.equal(rotary.cos, rotary_cos_sin(TINY.max_seq_len, TINY.head_dim, 1e4, cpu)[0])
