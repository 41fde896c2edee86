"""The order a source's samples are read in.

``SampleOrder``: samples are read in a seeded pseudo-random order within
fixed blocks (``SHUFFLE_BLOCK``), so that the consecutive samples of one long
document do not land in one global batch (Megatron shuffles its samples for
the same reason). The order is a keyed bijection of each block (a four-round
Feistel network with cycle walking), computed per lookup: nothing is stored,
and a longer run keeps a shorter one's full blocks.
"""

from __future__ import annotations

import zlib

import numpy as np

SHUFFLE_BLOCK = 1 << 22  # samples permuted together (4M: ~8.6B tokens at seq 2048)
_MASK64 = (1 << 64) - 1


class SampleOrder:
    """Which sample of a source is read ``j``-th: a seeded permutation within each block."""

    def __init__(self, num_samples: int, *, seed: int, name: str, block: int = SHUFFLE_BLOCK):
        self.num_samples = num_samples
        self.block = block
        self._base = [seed & _MASK64, zlib.crc32(name.encode())]
        self._keys: dict[int, list[int]] = {}

    def __getitem__(self, j: int) -> int:
        if not 0 <= j < self.num_samples:
            raise IndexError(f"sample {j} of {self.num_samples}")
        start = j - j % self.block
        size = min(self.block, self.num_samples - start)
        return start + self._permute(j - start, size, start // self.block)

    def _permute(self, x: int, size: int, block: int) -> int:
        keys = self._keys.get(block)
        if keys is None:
            rng = np.random.default_rng([*self._base, block])
            keys = self._keys[block] = [int(k) for k in rng.integers(0, 2**62, 4)]
        half = max(1, (max(size - 1, 1).bit_length() + 1) // 2)
        low = (1 << half) - 1
        while True:  # cycle walking: the network permutes [0, 4^half), at most 4x size
            left, right = x >> half, x & low
            for key in keys:
                left, right = right, left ^ (_mix(right, key) & low)
            x = (left << half) | right
            if x < size:
                return x


def _mix(value: int, key: int) -> int:
    """A 64-bit mixing function (splitmix64's finaliser) of ``value`` under ``key``."""
    z = (value * 0x9E3779B97F4A7C15 + key) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
