"""The LLaMA learning-rate schedule: linear warmup, then cosine decay to a floor.

For optimiser step ``t`` (0-based; the t-th update uses ``lr(t)``), peak
``lr``, ``W`` warmup steps, ``T`` total steps and floor ``r * lr``:

    t <  W:  lr * (t + 1) / W
    t >= W:  r*lr + (lr - r*lr) * (1 + cos(pi * (t - W) / (T - W))) / 2

so the first update is not wasted at lr 0, the peak is reached at the last
warmup step, and the schedule reaches the floor at ``t = T``.
"""

from __future__ import annotations

import math


def lr_at(
    step: int, *, peak: float, warmup_steps: int, total_steps: int, min_ratio: float
) -> float:
    """Learning rate of optimiser step ``step`` (0-based)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = peak * min_ratio
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
