"""A source's document order: epochs in runs of documents, and positions in a split.

``epoch_order`` is one epoch's seeded order of a split's documents (its
docstring says why runs of 16 and not a uniform permutation);
``held_out_documents`` the validation split's seeded choice; ``SplitDocuments``
turns positions in a split (what the index stores) into document numbers.
Used by ``orchestrator.data.run_index``.
"""

from __future__ import annotations

import numpy as np

DOC_RUN = 16  # documents kept together in an epoch's order: one 64-byte line of lengths
_RUN_ORDERS = 256  # the orders a run's documents are drawn from


def held_out_documents(
    num_docs: int, valid_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """The validation split's document numbers, sorted: a seeded choice of them."""
    num_valid = int(round(num_docs * valid_fraction))
    if valid_fraction > 0 and num_docs > 1:
        num_valid = max(num_valid, 1)
    return np.sort(rng.choice(num_docs, num_valid, replace=False)).astype(np.int32)


class SplitDocuments:
    """A split's document numbers from their positions in it (``position -> number``).

    Made from the held-out documents' gaps (``gaps[i]``: how many training
    documents come before the ``i``-th held-out one), a small array: the
    ``p``-th validation document is ``gaps[p] + p``, the ``p``-th training one
    ``p`` plus the number of held-out documents before it.
    """

    def __init__(self, gaps: np.ndarray, *, valid: bool) -> None:
        self.gaps = gaps
        self.valid = valid

    def number(self, position: int) -> int:
        if self.valid:
            return int(self.gaps[position]) + position
        return position + int(np.searchsorted(self.gaps, position, side="right"))

    def numbers(self, positions: np.ndarray) -> np.ndarray:
        """``number`` of each position (int64)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.valid:
            return self.gaps[positions].astype(np.int64) + positions
        return positions + np.searchsorted(self.gaps, positions, side="right")


def epoch_order(n: int, rng: np.random.Generator, *, out: np.ndarray) -> None:
    """Writes into ``out`` a seeded order of ``n`` positions, in runs of ``DOC_RUN`` consecutive ones.

    The positions are cut into runs (``0..15``, ``16..31``, ...; the last may
    be short); the runs come in a uniformly random order, and each run's
    positions in one of ``_RUN_ORDERS`` random orders of ``DOC_RUN``, drawn
    per run. Not a uniform permutation of the documents, by choice: at
    LLaMA's scale (about 1B documents consumed per run) a uniform shuffle
    costs 50-100 ns a document on one core (every swap a cache miss) and
    makes the sample index's walk over the lengths miss the cache too, which
    together were most of a 717M-sample build's 145 s; runs of 16 cost a
    few ns a document, and the lengths of a run share one cache line.

    What it gives up: documents within 16 of each other in a shard stay
    within 16 of each other in an epoch (each epoch in a new order). The
    samples are read in a seeded order over blocks of 4M samples
    (``packing.SampleOrder``), so a global batch of 2,048 holds a few pairs
    of samples from one run of 16 documents, where a uniform document order
    would hold a fraction of a pair from one document.
    """
    runs, short = -(-n // DOC_RUN), n % DOC_RUN
    run_order = rng.permutation(runs).astype(np.int32)
    orders = np.argsort(rng.random((_RUN_ORDERS, DOC_RUN)), axis=1).astype(np.int32)
    choice = rng.integers(0, _RUN_ORDERS, runs, dtype=np.uint8)
    # the full runs, written in place: all of them, or those before and after the
    # short last run's place q in the run order (its positions >= n dropped)
    q = int(np.flatnonzero(run_order == runs - 1)[0]) if short else runs
    spans = [(0, q, 0)] + ([(q + 1, runs, q * DOC_RUN + short)] if short else [])
    for lo, hi, at in spans:
        rows = out[at : at + (hi - lo) * DOC_RUN].reshape(hi - lo, DOC_RUN)
        np.take(orders, choice[lo:hi], axis=0, out=rows)
        rows += (run_order[lo:hi] * DOC_RUN)[:, None]
    if short:
        last = orders[choice[q]] + (runs - 1) * DOC_RUN
        out[q * DOC_RUN : q * DOC_RUN + short] = last[last < n]
