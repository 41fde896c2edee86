"""The testing aids (``faults.inject_*``) of one rank, behind the loop's hooks.

The loop calls ``at_phase`` on entering each start-up phase and
``before_step`` at the start of each training step; ``loss_hook`` is what the
stepper applies to each micro-batch's loss. With no aid configured (every
real run) the hooks do nothing and ``loss_hook`` is None.
"""

from __future__ import annotations

import threading
import time

from orchestrator.config.schema import FaultsConfig
from orchestrator.runtime.numerics import LossFault
from orchestrator.runtime.steppers import LossHook


class TestingAids:
    """``faults.inject_*`` for global rank ``rank``."""

    __test__ = False  # not a pytest class

    def __init__(self, faults: FaultsConfig, *, rank: int) -> None:
        self._loss = LossFault(
            nan_at=faults.inject_nan_at_steps,
            inf_grad_at=faults.inject_inf_grad_at_steps,
            spike_at=faults.inject_spike_at_steps,
            only_rank=faults.inject_rank,
            rank=rank,
        )
        self._stall_phase = faults.inject_stall_phase if rank == faults.inject_stall_rank else None
        self._slow_s = faults.inject_slow_s if rank == faults.inject_slow_rank else 0.0

    @property
    def loss_hook(self) -> LossHook | None:
        """The loss fault of ``faults.inject_{nan,inf_grad,spike}_at_steps``, if this rank has one."""
        return self._loss if self._loss.active else None

    def at_phase(self, phase: str) -> None:
        """``faults.inject_stall_*``: this rank stops for good in its phase."""
        if phase == self._stall_phase:
            threading.Event().wait()

    def before_step(self, batch_number: int) -> None:
        """``faults.inject_slow_*``: a straggler; and the loss fault armed for this batch.

        ``batch_number``: the global batch about to be trained, 1 = the first drawn.
        """
        if self._slow_s:
            time.sleep(self._slow_s)
        self._loss.arm(batch_number)
