"""The all-reduces of a tp=2 training step, counted where they are issued, against the formula.

Per layer per micro-batch four all-reduces of b·s·h (wo and w2 in forward, the
wq/wk/wv and w1/w3 input gradients in backward), plus the embedding's forward
and the output layer's backward one (b·s·h) and the cross entropy's three of
b·s. Counted by ``bench/tp_comm.py``'s ``AllReduceCounter`` on a small model
with odd sizes, every step on both ranks; tp=1 issues none.
"""

from __future__ import annotations

import pytest

from bench.tp_comm import analytic_tp_all_reduces, bytes_equal, compare_bytes, run_layout
from tests.distributed import run_ranks
from tests.tiny import tiny_args

# head_dim 8, 6 heads, hidden 130 (65 per rank), vocab padded 1000 -> 1024
SMALL = tiny_args(dim=48, n_layers=3, n_heads=6, vocab_size=1000, multiple_of=10, max_seq_len=2048)
BATCH, SEQ = 3, 13


@pytest.mark.timeout(120)
def test_tp2_all_reduce_bytes_equal_the_formula() -> None:
    analytic = analytic_tp_all_reduces(SMALL, BATCH, SEQ, tp=2)
    bsh, bs = BATCH * SEQ * SMALL.dim, BATCH * SEQ
    assert sum(t.elements for t in analytic.values()) == (4 * 3 + 2) * bsh + 3 * bs

    ranks = run_ranks(run_layout, 2, "tp2", (SMALL, BATCH, SEQ), 1, 2, timeout=100)
    for rank in ranks:
        for sites, other in rank["counts"]:
            assert bytes_equal(sites, analytic), "\n".join(compare_bytes(sites, analytic))
            assert other.calls == 0

    (dense,) = run_ranks(run_layout, 1, "tp1-1t", (SMALL, BATCH, SEQ), 1, 2, timeout=100)
    assert all(not sites and other.calls == 0 for sites, other in dense["counts"])
    assert ranks[0]["losses"] == pytest.approx(dense["losses"], rel=1e-5)
