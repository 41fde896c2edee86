"""Which source each sample of a blend comes from: exact proportions at every prefix.

The rule is smooth weighted round-robin over integer weights ``W_d`` summing
to ``Q``: before sample ``i`` every source's credit grows by its weight, the
source with the most credit (the lowest index on a tie) gives the sample,
and its credit drops by ``Q``. After any ``n`` samples each source has had
``n * W_d / Q`` samples to within one (``|count_d - w_d n| <= 1``), and after
``Q`` samples every credit is zero again, so the blend is one period of
``Q`` samples repeated: built with a loop over one period and tiled, in
O(n) vectorised work for the whole run.

Megatron's ``build_blending_indices`` aims at ``w_d * max(i, 1)`` before
sample ``i``, one sample behind this rule's ``w_d * (i + 1)``; on the LLaMA
weights its prefixes fall up to 1.04 samples behind (``tests/test_blend.py``).

Float weights are taken as the nearest fractions with denominators up to
10^6 (``67.0``, ``4.5``, ``0.12`` exactly); when their common period would
exceed ``MAX_PERIOD`` samples, as integers proportional to them over
``MAX_PERIOD`` (relative error below 2^-24), said in the log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

log = logging.getLogger("orchestrator.data.blend")

MAX_PERIOD = 1 << 24
_CHUNK = 1 << 24  # samples written per vectorised step


def integer_weights(weights: Sequence[float]) -> list[int]:
    """Integer weights with the proportions of ``weights`` (see the module docstring)."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"blend weights {list(weights)}: need one or more, each > 0")
    fractions = [Fraction(float(w)).limit_denominator(10**6) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    integers = [int(f * scale) for f in fractions]
    divisor = math.gcd(*integers)
    integers = [w // divisor for w in integers]
    if sum(integers) <= MAX_PERIOD:
        return integers
    total = float(sum(weights))
    exact = [w / total * MAX_PERIOD for w in weights]
    integers = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda d: integers[d] - exact[d])
    for d in by_remainder[: MAX_PERIOD - sum(integers)]:
        integers[d] += 1
    log.info("blend weights %s taken as %s / %d", list(weights), integers, sum(integers))
    return integers


def blend_period(weights: Sequence[int]) -> np.ndarray:
    """One period (``sum(weights)`` samples) of the round-robin: the source of each sample."""
    total = sum(weights)
    credit = [0] * len(weights)
    period = np.empty(total, dtype=np.int16)
    for i in range(total):
        best = 0
        for d, w in enumerate(weights):
            credit[d] += w
            if credit[d] > credit[best]:
                best = d
        credit[best] -= total
        period[i] = best
    if any(credit):  # the rule returns to zero credit after a period; checked, not assumed
        raise AssertionError(f"blend of {list(weights)}: credits {credit} after one period")
    return period


def build_blend(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each of ``size`` samples, int16; its sample number in that source).

    Sample numbers are int32 below 2^31 samples (717M at LLaMA-65B: 2.9 GB
    less to write and map than int64), else int64.
    """
    integers = integer_weights(weights)
    period = blend_period(integers)
    q = len(period)
    # the k-th sample of source d within a period is its rank among d's samples there
    rank = np.empty(q, dtype=np.int64)
    for source in range(len(integers)):
        where = np.flatnonzero(period == source)
        rank[where] = np.arange(len(where))
    per_period = np.asarray(integers, dtype=np.int64)
    dataset = np.empty(size, dtype=np.int16)
    sample = np.empty(size, dtype=np.int32 if size < 2**31 else np.int64)
    chunk = max(q, _CHUNK // q * q)  # whole periods per chunk
    reps = chunk // q
    tiled_d, tiled_rank = np.tile(period, reps), np.tile(rank, reps)
    cycle = np.repeat(np.arange(reps, dtype=np.int64), q)  # the period each position is in
    for start in range(0, size, chunk):
        n = min(chunk, size - start)
        which = tiled_d[:n]
        dataset[start : start + n] = which
        first_period = start // q
        sample[start : start + n] = (cycle[:n] + first_period) * per_period[which] + tiled_rank[:n]
    return dataset, sample
