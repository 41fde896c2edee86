"""Each tensor-parallel piece against its dense torch equivalent, on 1, 2 and 4 gloo ranks.

For every layer: outputs, input gradients and this rank's weight-gradient
shard, in fp32. Sizes are odd multiples of the world size (13 x ws, 17 x ws)
so a wrong split axis cannot pass. Every rank builds the same dense tensors
from a fixed seed, so the reference needs no communication.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model_parallel.cross_entropy import vocab_parallel_cross_entropy
from model_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_shard_,
)
from tests.distributed import run_ranks

WORLD_SIZES = [1, 2, 4]
TOL = dict(rtol=1e-5, atol=1e-5)


def _group(ws: int) -> dist.ProcessGroup | None:
    return dist.group.WORLD if ws > 1 else None


def _chunk(t: torch.Tensor, dim: int, rank: int, ws: int) -> torch.Tensor:
    return t.chunk(ws, dim=dim)[rank]


def _check_column(rank: int, ws: int, *, sequence_parallel: bool, gather_output: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    b, s, d_in, d_out = 3, 5 * ws, 13, 17 * ws
    x = torch.randn(b, s, d_in, generator=gen)
    a = torch.randn(d_out, d_in, generator=gen)
    g = torch.randn(b, s, d_out, generator=gen)
    # dense reference
    xd, ad = x.clone().requires_grad_(), a.clone().requires_grad_()
    yd = F.linear(xd, ad)
    yd.backward(g)

    layer = ColumnParallelLinear(
        d_in,
        d_out,
        tp_group=_group(ws),
        gather_output=gather_output,
        sequence_parallel=sequence_parallel,
    )
    load_shard_(layer.weight, a, tp_rank=rank, tp_size=ws)
    xp = (_chunk(x, 1, rank, ws) if sequence_parallel else x).clone().requires_grad_()
    y = layer(xp)
    if gather_output:
        torch.testing.assert_close(y, yd.detach(), **TOL)
        y.backward(g)
    else:
        torch.testing.assert_close(y, _chunk(yd.detach(), -1, rank, ws), **TOL)
        y.backward(_chunk(g, -1, rank, ws))
    expected_dx = _chunk(xd.grad, 1, rank, ws) if sequence_parallel else xd.grad
    torch.testing.assert_close(xp.grad, expected_dx, **TOL)
    torch.testing.assert_close(layer.weight.grad, _chunk(ad.grad, 0, rank, ws), **TOL)


def _check_row(rank: int, ws: int, *, sequence_parallel: bool, input_is_parallel: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    b, s, d_in, d_out = 3, 5 * ws, 13 * ws, 17
    x = torch.randn(b, s, d_in, generator=gen)
    a = torch.randn(d_out, d_in, generator=gen)
    g = torch.randn(b, s, d_out, generator=gen)
    xd, ad = x.clone().requires_grad_(), a.clone().requires_grad_()
    yd = F.linear(xd, ad)
    yd.backward(g)

    layer = RowParallelLinear(
        d_in,
        d_out,
        tp_group=_group(ws),
        input_is_parallel=input_is_parallel,
        sequence_parallel=sequence_parallel,
    )
    load_shard_(layer.weight, a, tp_rank=rank, tp_size=ws)
    xp = (_chunk(x, -1, rank, ws) if input_is_parallel else x).clone().requires_grad_()
    y = layer(xp)
    if sequence_parallel:
        torch.testing.assert_close(y, _chunk(yd.detach(), 1, rank, ws), **TOL)
        y.backward(_chunk(g, 1, rank, ws))
    else:
        torch.testing.assert_close(y, yd.detach(), **TOL)
        y.backward(g)
    expected_dx = _chunk(xd.grad, -1, rank, ws) if input_is_parallel else xd.grad
    torch.testing.assert_close(xp.grad, expected_dx, **TOL)
    torch.testing.assert_close(layer.weight.grad, _chunk(ad.grad, 1, rank, ws), **TOL)


def _check_embedding(rank: int, ws: int, *, sequence_parallel: bool, pad: int) -> None:
    gen = torch.Generator().manual_seed(3)
    b, s, dim = 3, 5 * ws, 13
    padded, vocab = 37 * ws, 37 * ws - pad
    table = torch.randn(vocab, dim, generator=gen)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    g = torch.randn(b, s, dim, generator=gen)
    td = table.clone().requires_grad_()
    yd = F.embedding(ids, td)
    yd.backward(g)

    layer = VocabParallelEmbedding(
        padded, dim, tp_group=_group(ws), vocab_size=vocab, sequence_parallel=sequence_parallel
    )
    load_shard_(layer.weight, table, tp_rank=rank, tp_size=ws)
    y = layer(ids)
    if sequence_parallel:
        torch.testing.assert_close(y, _chunk(yd.detach(), 1, rank, ws), **TOL)
        y.backward(_chunk(g, 1, rank, ws))
    else:
        torch.testing.assert_close(y, yd.detach(), **TOL)
        y.backward(g)
    full_grad = torch.cat([td.grad, td.grad.new_zeros(pad, dim)])
    torch.testing.assert_close(layer.weight.grad, _chunk(full_grad, 0, rank, ws), **TOL)


def _check_cross_entropy(rank: int, ws: int, *, pad: int, compiled: bool = False) -> None:
    gen = torch.Generator().manual_seed(4)
    b, s, padded = 3, 7, 19 * ws
    vocab = padded - pad
    logits = torch.randn(b, s, padded, generator=gen) * 3
    target = torch.randint(0, vocab, (b, s), generator=gen)
    target[0, :2] = -100  # ignored positions
    g = torch.rand(b, s, generator=gen)
    ld = logits.clone().requires_grad_()
    loss_d = F.cross_entropy(
        ld[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none"
    ).view(b, s)
    loss_d.backward(g)

    lp = _chunk(logits, -1, rank, ws).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(
        lp, target, tp_group=_group(ws), vocab_size=vocab, compiled=compiled
    )
    torch.testing.assert_close(loss, loss_d.detach(), **TOL)
    loss.backward(g)
    torch.testing.assert_close(lp.grad, _chunk(ld.grad, -1, rank, ws), **TOL)


def _linear_checks(rank: int, ws: int) -> None:
    for sp in (False, True):
        for gather in (False, True):
            _check_column(rank, ws, sequence_parallel=sp, gather_output=gather)
        _check_row(rank, ws, sequence_parallel=sp, input_is_parallel=True)
    _check_row(rank, ws, sequence_parallel=False, input_is_parallel=False)


def _embedding_and_loss_checks(rank: int, ws: int) -> None:
    for sp in (False, True):
        for pad in (0, 3):
            _check_embedding(rank, ws, sequence_parallel=sp, pad=pad)
    for pad in (0, 5):
        _check_cross_entropy(rank, ws, pad=pad)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_column_and_row_parallel_linear(ws: int) -> None:
    run_ranks(_linear_checks, ws)


@pytest.mark.parametrize("ws", WORLD_SIZES)
def test_vocab_parallel_embedding_and_cross_entropy(ws: int) -> None:
    run_ranks(_embedding_and_loss_checks, ws)


def _compiled_loss_checks(rank: int, ws: int) -> None:
    for pad in (0, 5):
        _check_cross_entropy(rank, ws, pad=pad, compiled=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ws", [1, 2])
def test_compiled_vocab_parallel_cross_entropy(ws: int) -> None:
    """``model.compile``'s loss: inductor kernels between the same all-reduces."""
    run_ranks(_compiled_loss_checks, ws, timeout=240)
