"""Stopping cleanly when the scheduler asks.

SLURM sends SIGUSR1 (``--signal=USR1@grace``) before a time limit and SIGTERM
before preemption. The handler only records the request; at the end of the
current step all ranks agree (one all-reduce), write a checkpoint and exit
with ``EXIT_REQUEUE`` so the launcher can requeue the job. A second signal
while saving changes nothing: the request is already recorded, and the save
is atomic anyway.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- requeue.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records SIGUSR1/SIGTERM; ``agreed()`` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = self.signal or signum

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled (a collective)."""
        flag = torch.tensor([1 if self.signal else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
