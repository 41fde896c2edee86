"""Bad steps: which updates are not applied, when the run rolls back, and the aids that make them.

A step whose gradients are not finite is not applied. DeepSpeed decides that
from the global gradient norm, on every rank alike: ZeRO-1/2 and bf16's
``BF16_Optimizer`` check it themselves, ZeRO-3 is made to in every dtype and
ZeRO-0 gets the same check (both in ``orchestrator.runtime.engine``). The weights, the
optimiser state and the lr schedule then stay as they were, and the data
moves on.

``agree`` makes the verdict every rank's: one all-reduce of two flags (this
rank's skip, this rank's non-finite loss) over the whole job, so a fault that
only one rank saw (a NaN in one tp shard's loss, one dp replica's batch) is a
skip everywhere, and every rank's ``NumericsGuard`` counts the same steps and
rolls back at the same one. At 2,048 ranks that is one 8-byte all-reduce per
step, against steps of seconds.

fp16: DeepSpeed's dynamic loss scaler skips steps by design (an overflow of
the scaled gradients halves the scale, after ``hysteresis`` of them, from
2^16 at the start), so a run's first steps are often skipped. Those skips
with a finite loss are the scaler's: counted as ``scaler_skips`` and logged,
but not bad steps, so they never roll a run back. A NaN loss in fp16 is a bad
step as in any precision.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Verdict:
    skipped: bool = False  # the update was not applied
    scaler: bool = False  # ...because fp16's loss scaler overflowed (not a bad step)
    rollback: str = ""  # why the run must roll back to its last checkpoint ("" when not)


class NumericsGuard:
    """The OPT/metaseq policy on bad steps.

    A step whose loss or gradient norm is NaN/Inf is not applied and is counted
    here. After ``max_consecutive_skips`` such steps in a row, or a loss above
    ``spike_factor`` times the mean of the last ``spike_window`` good steps,
    the run rolls back to its last checkpoint and moves on past the batches
    that caused it. With ``fp16``, a skip with a finite loss is the loss
    scaler's and counts only in ``scaler_skips``.
    """

    def __init__(
        self,
        *,
        max_consecutive_skips: int,
        spike_factor: float,
        spike_window: int,
        fp16: bool = False,
    ) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.fp16 = fp16
        self.skipped_total = 0
        self.scaler_skips = 0
        self.consecutive = 0

    def observe(self, loss: float, *, skipped: bool) -> Verdict:
        finite = math.isfinite(loss)
        if skipped and finite and self.fp16:
            self.scaler_skips += 1  # the scale halves and the next step tries again
            return Verdict(skipped=True, scaler=True)
        if skipped or not finite:
            self.skipped_total += 1
            self.consecutive += 1
            if self.consecutive >= self.max_consecutive_skips:
                return Verdict(True, rollback=f"{self.consecutive} consecutive non-finite steps")
            return Verdict(skipped=True)
        self.consecutive = 0
        full = len(self.recent) == self.recent.maxlen
        if self.spike_factor and full:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return Verdict(
                    rollback=f"loss spike {loss:.4f} > {self.spike_factor:g} x {mean:.4f}"
                )
        self.recent.append(loss)
        return Verdict()

    def after_rollback(self) -> None:
        self.consecutive = 0
        self.recent.clear()


def agree(loss: float, *, skipped: bool, device: torch.device) -> tuple[float, bool]:
    """Every rank's view of a step: NaN for the loss if any rank's was not finite, and
    skipped if any rank's optimiser skipped (one all-reduce over the whole job)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss, skipped
    flags = torch.tensor(
        [float(skipped), float(not math.isfinite(loss))], dtype=torch.float32, device=device
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_skipped, any_bad_loss = (bool(v) for v in flags.tolist())
    return (float("nan") if any_bad_loss else loss), any_skipped


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` on the way back."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, factor: float
    ) -> torch.Tensor:
        ctx.factor = factor  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None  # type: ignore[attr-defined]


class LossFault:
    """Testing aid: what this rank does to the loss of chosen global batches.

    ``faults.inject_nan_at_steps``: the loss is NaN (so is every gradient);
    ``inject_inf_grad_at_steps``: the loss stays finite, its gradient is Inf;
    ``inject_spike_at_steps``: the loss x 1000, a bad update that is applied
    (clipped) and shows as a spike. Batches are numbered from 1 in the order
    drawn, so after a rollback the next batches are new ones.
    ``faults.inject_rank``: only that global rank (on a pipeline, a rank of the
    last stage, where the loss is computed); its peers must agree to skip.
    Called on each micro-batch's loss (``PipelineLoss.hook`` on a pipeline).
    """

    def __init__(
        self,
        *,
        nan_at: list[int],
        inf_grad_at: list[int],
        spike_at: list[int],
        only_rank: int | None,
        rank: int,
    ) -> None:
        self.kinds = {
            **{n: "spike" for n in spike_at},
            **{n: "inf_grad" for n in inf_grad_at},
            **{n: "nan" for n in nan_at},
        }
        self.active = bool(self.kinds) and only_rank in (None, rank)
        self.kind = ""

    def arm(self, batch_number: int) -> None:
        """The global batch about to be trained (1 = the first drawn)."""
        self.kind = self.kinds.get(batch_number, "") if self.active else ""

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if self.kind == "nan":
            return loss * float("nan")
        if self.kind == "spike":
            return loss * 1000.0
        if self.kind == "inf_grad":
            return _ScaleGradient.apply(loss, float("inf"))
        return loss
