"""Grouped-query attention under tensor parallelism, against dense references.

- the layout rule (``kv_heads_rule``), without processes;
- ``Attention`` with 8 query heads and 1, 2, 4 or 8 KV heads at tp = 1, 2, 4
  and 8 against plain-torch attention written here (each query head ``i``
  uses KV head ``i // (n_heads / n_kv_heads)``): outputs, input gradients and
  every rank's weight-gradient shard. When tp exceeds the KV heads each KV
  head is replicated on ``tp / n_kv_heads`` ranks: every replica must hold
  the full (summed) gradient of the one logical weight, bit for bit the same;
- the whole tiny model with 2 KV heads at tp = 4 (replicated KV), with and
  without sequence parallelism, against tp = 1: identical initial shards, logits, loss and gathered gradients, and
  ``load_full_state_dict`` / ``full_state_dict`` give back a full state
  exactly (one replica per KV head).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from model_parallel.args import ModelArgs, kv_heads_rule
from model_parallel.groups import ProcessGroups
from model_parallel.layers import counts_in_norm, gather_full, load_shard_
from model_parallel.layout import Layout
from model_parallel.llama import Attention, Transformer
from tests.distributed import run_ranks
from tests.tiny import tiny_args

TOL = dict(rtol=1e-4, atol=1e-5)
N_HEADS, HEAD_DIM = 8, 6  # head_dim 6: three rotary pairs, not a power of two
KV_HEADS = (1, 2, 4, 8)


def test_kv_heads_rule() -> None:
    assert kv_heads_rule(tp=8, n_heads=32, n_kv_heads=8) is None  # split, one KV head each
    assert kv_heads_rule(tp=16, n_heads=32, n_kv_heads=8) is None  # replicated twice
    assert kv_heads_rule(tp=4, n_heads=64, n_kv_heads=8) is None
    assert "n_heads(12) must be divisible by tp" in str(
        kv_heads_rule(tp=8, n_heads=12, n_kv_heads=4)
    )
    assert "n_kv_heads(6) must be divisible by tp" in str(
        kv_heads_rule(tp=4, n_heads=24, n_kv_heads=6)
    )
    assert "multiple of n_kv_heads" in str(kv_heads_rule(tp=8, n_heads=24, n_kv_heads=3))


def _dense_attention(
    x: torch.Tensor, w: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int
) -> torch.Tensor:
    """Causal GQA in plain torch: complex-number rotary (Meta's), explicit softmax."""
    b, s, _ = x.shape
    hd = HEAD_DIM
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs_cis = torch.polar(torch.ones(s, hd // 2), torch.outer(torch.arange(s).float(), freqs))

    def rope(t: torch.Tensor) -> torch.Tensor:  # (B, S, h, hd)
        tc = torch.view_as_complex(t.reshape(*t.shape[:3], hd // 2, 2))
        return torch.view_as_real(tc * freqs_cis[None, :, None, :]).flatten(3)

    q = rope((x @ w["wq.weight"].T).view(b, s, n_heads, hd))
    k = rope((x @ w["wk.weight"].T).view(b, s, n_kv_heads, hd))
    v = (x @ w["wv.weight"].T).view(b, s, n_kv_heads, hd)
    uses = torch.arange(n_heads) // (n_heads // n_kv_heads)  # KV head of each query head
    q, k, v = q.transpose(1, 2), k[:, :, uses].transpose(1, 2), v[:, :, uses].transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, n_heads * hd)
    return out @ w["wo.weight"].T


def _attention_check(rank: int, ws: int) -> dict[int, dict[str, np.ndarray]]:
    """Every valid KV head count at this tp; returns each case's weight gradients."""
    groups = ProcessGroups.build(Layout(tp=ws)) if ws > 1 else ProcessGroups.single()
    grads_by_case = {}
    for n_kv in KV_HEADS:
        if kv_heads_rule(tp=ws, n_heads=N_HEADS, n_kv_heads=n_kv) is not None:
            continue
        args = ModelArgs(
            dim=N_HEADS * HEAD_DIM, n_layers=1, n_heads=N_HEADS, n_kv_heads=n_kv, vocab_size=10
        )
        replicas = args.kv_replicas(ws)
        gen = torch.Generator().manual_seed(11 + n_kv)
        b, s = 2, 7
        x = torch.randn(b, s, args.dim, generator=gen)
        g = torch.randn(b, s, args.dim, generator=gen)
        dense_w = {
            "wq.weight": torch.randn(args.dim, args.dim, generator=gen),
            "wk.weight": torch.randn(args.kv_dim, args.dim, generator=gen),
            "wv.weight": torch.randn(args.kv_dim, args.dim, generator=gen),
            "wo.weight": torch.randn(args.dim, args.dim, generator=gen),
        }
        dense_w = {k: (v / math.sqrt(args.dim)).requires_grad_() for k, v in dense_w.items()}
        attention = Attention(args, tp_group=groups.tp_group, sequence_parallel=False)
        for name, p in attention.named_parameters():
            load_shard_(p, dense_w[name].detach(), tp_rank=groups.tp_rank, tp_size=ws)
        assert attention.n_local_kv_heads == n_kv * replicas // ws

        xd = x.clone().requires_grad_()
        _dense_attention(xd, dense_w, N_HEADS, n_kv).backward(g)
        xp = x.clone().requires_grad_()
        y = attention(xp)
        torch.testing.assert_close(y, _dense_attention(x, dense_w, N_HEADS, n_kv), **TOL)
        y.backward(g)
        torch.testing.assert_close(xp.grad, xd.grad, **TOL)
        grads = {}
        for name, p in attention.named_parameters():
            full_grad = dense_w[name].grad
            assert full_grad is not None and p.grad is not None
            dim = p.partition_dim  # type: ignore[attr-defined]
            r = replicas if name in ("wk.weight", "wv.weight") else 1
            expected = full_grad.chunk(ws // r, dim=dim)[rank // r]
            torch.testing.assert_close(
                p.grad, expected, **TOL, msg=lambda m, n=name, k=n_kv: f"kv{k} {n}: {m}"
            )
            # the grad norm counts each shard once: on the first rank holding it
            assert counts_in_norm(p, rank) == (rank % r == 0)
            grads[name] = p.grad.numpy().copy()
        grads_by_case[n_kv] = grads
    return grads_by_case


def _replicas_identical(results: list[dict[int, dict[str, np.ndarray]]], ws: int) -> None:
    for n_kv, _ in results[0].items():
        replicas = max(1, ws // n_kv)
        for rank in range(ws):
            first = rank // replicas * replicas
            for name in ("wk.weight", "wv.weight"):
                np.testing.assert_array_equal(results[rank][n_kv][name], results[first][n_kv][name])


def test_attention_tp1_matches_dense() -> None:
    results = _attention_check(0, 1)
    assert sorted(results) == list(KV_HEADS)


@pytest.mark.parametrize("ws", [2, 4])
def test_attention_gqa_matches_dense(ws: int) -> None:
    results = run_ranks(_attention_check, ws)
    assert sorted(results[0]) == list(KV_HEADS)  # all four valid at tp <= 8 heads
    _replicas_identical(results, ws)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attention_gqa_matches_dense_tp8() -> None:
    results = run_ranks(_attention_check, 8, timeout=280)
    _replicas_identical(results, 8)


# 8 query heads on 2 KV heads, so tp = 4 replicates each KV head on 2 ranks
TINY_GQA = tiny_args(dim=96, n_heads=8, n_kv_heads=2, vocab_size=301)


def _model_check(rank: int, ws: int) -> None:
    args = TINY_GQA
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    ref = Transformer(args, seed=7)
    logits = ref(tokens[:, :-1])
    ref_loss = ref.loss(logits, tokens[:, 1:]).mean()
    ref_loss.backward()
    ref_logits, ref_grads = ref.gather_logits(logits).detach(), ref.full_state_dict(grads=True)
    ref_weights = ref.full_state_dict()

    groups = ProcessGroups.build(Layout(tp=ws))
    for sp in (False, True):  # sequence parallel: K and V see the all-gathered sequence
        model = Transformer(args, groups=groups, seed=7, sequence_parallel=sp)
        wk = model.layers["0"].attention.wk.weight
        assert wk.shape == (args.head_dim, args.dim)  # one KV head, replicated ws / 2 times
        for name, p in model.named_parameters():  # the initial shards are the tp=1 tensors'
            torch.testing.assert_close(
                gather_full(p, groups.tp_group), ref_weights[name], rtol=0, atol=0
            )
        logits = model(tokens[:, :-1])
        loss = model.loss(logits, tokens[:, 1:]).mean()
        loss.backward()
        torch.testing.assert_close(model.gather_logits(logits), ref_logits, **TOL)
        torch.testing.assert_close(loss.detach(), ref_loss.detach(), **TOL)
        grads = model.full_state_dict(grads=True)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(
                grads[name], ref_grads[name], **TOL, msg=lambda m, n=f"sp={sp} {name}": n
            )

    # load a different full state and gather it back exactly: each replica got its head
    other = Transformer(args, seed=99).full_state_dict()
    model.load_full_state_dict(other)
    back = model.full_state_dict()
    for name in other:
        assert torch.equal(back[name], other[name]), name
    head = rank // (ws // args.num_kv_heads)
    rows = slice(head * args.head_dim, (head + 1) * args.head_dim)
    assert torch.equal(wk.detach(), other["layers.0.attention.wk.weight"][rows])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_gqa_model_replicated_kv_matches_tp1() -> None:
    run_ranks(_model_check, 4, timeout=280)


def test_num_params_counts_kv_heads() -> None:
    args = dataclasses.replace(TINY_GQA, vocab_size=301)
    model = Transformer(args)
    padding = 2 * (model.padded_vocab_size - args.vocab_size) * args.dim
    assert sum(p.numel() for p in model.parameters()) - padding == args.num_params()
