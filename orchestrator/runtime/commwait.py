"""How long this rank sits inside blocking collectives: the straggler signal.

In synchronous training every rank's step takes the same wall time: the
gradient all-reduce (and tp's all-reduces, pp's send/recv) make the fast ranks
wait for the slowest. So step times cannot name a straggler, but waiting can:

    busy = step time - time spent inside blocking collectives

The slow rank arrives last at every collective and waits least, so its busy
time is the largest; ``orchestrator.status.report`` compares each rank's busy time
with the median over the ranks.

``CommWaitClock`` wraps the blocking ``torch.distributed`` collectives while
training runs (DeepSpeed's ``deepspeed.comm`` and ``model_parallel``'s
collectives both call them through the module, so both are counted). Limits:
an ``async_op=True`` call is not counted (its wait happens in ``Work.wait``),
and on GPUs NCCL collectives return once queued, so there the measure counts
only host-side waits and busy time approaches the step time on every rank:
no false stragglers, but a slow GPU goes unnamed (CUDA-event timing would be
the next step).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
)


class CommWaitClock:
    """Seconds spent inside blocking ``torch.distributed`` collectives while installed."""

    def __init__(self) -> None:
        self.total = 0.0
        self._depth = 0  # a collective that calls another is counted once
        self._originals: dict[str, Callable[..., Any]] = {}

    def install(self) -> CommWaitClock:
        """Start counting: wrap the collectives in ``torch.distributed``."""
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None and name not in self._originals:
                self._originals[name] = original
                setattr(dist, name, self._timed(original))
        return self

    def uninstall(self) -> None:
        """Put the original functions back."""
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("async_op") or self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
                self._depth -= 1

        return timed
