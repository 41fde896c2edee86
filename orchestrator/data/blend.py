"""Which source each sample of a blend comes from: exact proportions at every prefix.

The rule is smooth weighted round-robin over integer weights ``W_d`` summing
to ``Q``: before sample ``i`` every source's credit grows by its weight, the
source with the most credit (the lowest index on a tie) gives the sample,
and its credit drops by ``Q``. After any ``n`` samples each source has had
``n * W_d / Q`` samples to within one (``|count_d - w_d n| <= 1``), and after
``Q`` samples every credit is zero again, so the blend is one period of
``Q`` samples repeated: a loop builds one period, and nothing per sample is
stored (``Blend``: a lookup is O(1)).

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


class Blend:
    """The whole run's blend as one period: nothing per sample is stored.

    Sample ``k`` comes from source ``d = period[k % Q]`` and is that source's
    sample ``(k // Q) * per_period[d] + rank[k % Q]``: O(1) per lookup from
    two arrays of ``Q`` entries (``Q = 200`` for the LLaMA weights; at most
    ``MAX_PERIOD``), where materialising 717M samples' sources and numbers
    would write 4.3 GB.
    """

    def __init__(self, period: np.ndarray, rank: np.ndarray) -> None:
        self.period = period  # int16: the source of each sample of one period
        self.rank = rank  # int32: its number among that source's samples in the period
        self.q = len(period)
        self.per_period = np.bincount(period, minlength=int(period.max()) + 1).astype(np.int64)

    @classmethod
    def of(cls, weights: Sequence[float]) -> Blend:
        period = blend_period(integer_weights(weights))
        rank = np.empty(len(period), dtype=np.int32)
        for source in range(int(period.max()) + 1):
            where = np.flatnonzero(period == source)
            rank[where] = np.arange(len(where))
        return cls(period, rank)

    def locate(self, k: int) -> tuple[int, int]:
        """(source, sample number in that source) of blend sample ``k``."""
        cycle, r = divmod(k, self.q)
        d = int(self.period[r])
        return d, cycle * int(self.per_period[d]) + int(self.rank[r])

    def counts(self, size: int) -> np.ndarray:
        """How many of the first ``size`` samples each source gives (int64)."""
        cycles, rest = divmod(size, self.q)
        tail = np.bincount(self.period[:rest], minlength=len(self.per_period))
        return cycles * self.per_period + tail

    def arrays(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``locate`` for each of the first ``size`` samples: (sources, int16; numbers, int64).

        Spelled out for checking the blend (the run reads through ``locate``).
        """
        cycle, r = np.divmod(np.arange(size, dtype=np.int64), self.q)
        dataset = self.period[r]
        return dataset, cycle * self.per_period[dataset] + self.rank[r]
