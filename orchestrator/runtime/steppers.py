"""One optimiser step and one evaluation, for each kind of engine.

The loop picks its stepper once (``stepper_for``) and never asks again which
engine it drives:

- ``PipelineStepper`` (pp > 1): DeepSpeed's pipeline engine runs the whole
  schedule; the last stage computes the loss and broadcasts the global-batch
  mean to every stage.
- ``DataParallelStepper`` (pp = 1, any ZeRO stage): ``num_micro_batches``
  forward/backward passes; the loss is averaged over micro-batches and dp.

Both apply ``loss_hook`` to each micro-batch's loss (the testing aids of
``orchestrator.runtime.aids``; the loss itself when none is armed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist

from model_parallel.cross_entropy import masked_mean
from model_parallel.groups import ProcessGroups
from model_parallel.pipeline import LlamaPipeline
from orchestrator.data import Batch, MicroBatchSource

LossHook = Callable[[torch.Tensor], torch.Tensor]


class Stepper(Protocol):
    def train_step(self, batches: Iterator[Batch]) -> tuple[float, float | None]:
        """One optimiser step: the global-batch mean loss and the gradient norm."""
        ...

    def evaluate(self, source: MicroBatchSource, iters: int) -> float:
        """Mean validation loss over ``iters`` global batches, the same samples every time."""
        ...


class PipelineStepper:
    """DeepSpeed's pipeline engine: ``train_batch`` and ``eval_batch``."""

    def __init__(self, engine: Any, model: LlamaPipeline, loss_hook: LossHook | None) -> None:
        self.engine = engine
        if loss_hook is not None:
            model.loss_fn.hook = loss_hook  # the last stage computes each micro-batch's loss

    def train_step(self, batches: Iterator[Batch]) -> tuple[float, float | None]:
        loss = float(self.engine.train_batch(data_iter=batches))
        norm = self.engine.get_global_grad_norm()
        return loss, None if norm is None else float(norm)

    def evaluate(self, source: MicroBatchSource, iters: int) -> float:
        source.load_state_dict({"position": 0})
        batches = iter(source)
        losses = [float(self.engine.eval_batch(data_iter=batches)) for _ in range(iters)]
        return sum(losses) / len(losses)


class DataParallelStepper:
    """The whole model under a ZeRO engine: micro-batches by hand, losses averaged over dp."""

    def __init__(
        self,
        engine: Any,
        model: torch.nn.Module,
        *,
        num_micro_batches: int,
        groups: ProcessGroups,
        loss_hook: LossHook | None,
    ) -> None:
        self.engine = engine
        self.model = model
        self.device = next(model.parameters()).device
        self.num_micro_batches = num_micro_batches
        self.groups = groups
        self.loss_hook = loss_hook

    def _loss(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.device)
        logits = self.engine(inputs.to(self.device))
        return masked_mean(self.model.loss(logits, labels), labels)  # type: ignore[operator]

    def _dp_mean(self, total: torch.Tensor, count: int) -> float:
        mean = total / count
        if self.groups.dp_size > 1:
            dist.all_reduce(mean, group=self.groups.dp_group)
            mean /= self.groups.dp_size
        return float(mean)

    def train_step(self, batches: Iterator[Batch]) -> tuple[float, float | None]:
        total = torch.zeros((), device=self.device)
        for _ in range(self.num_micro_batches):
            loss = self._loss(*next(batches))
            if self.loss_hook is not None:
                loss = self.loss_hook(loss)
            self.engine.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps
            # Updates the weights at the last micro-batch only; a NaN/Inf gradient norm skips
            # the update at every ZeRO stage (orchestrator.runtime.ds_compat, .numerics).
            self.engine.step()
            total += loss.detach().float()
        norm = self.engine.get_global_grad_norm()
        return self._dp_mean(total, self.num_micro_batches), None if norm is None else float(norm)

    def evaluate(self, source: MicroBatchSource, iters: int) -> float:
        source.load_state_dict({"position": 0})
        batches = iter(source)
        total = torch.zeros((), device=self.device)
        count = iters * self.num_micro_batches
        with torch.no_grad():
            for _ in range(count):
                total += self._loss(*next(batches)).float()
        return self._dp_mean(total, count)


def stepper_for(
    engine: Any,
    model: torch.nn.Module,
    *,
    num_micro_batches: int,
    groups: ProcessGroups,
    loss_hook: LossHook | None = None,
) -> Stepper:
    """The stepper of ``model``'s engine kind."""
    if isinstance(model, LlamaPipeline):
        return PipelineStepper(engine, model, loss_hook)
    return DataParallelStepper(
        engine, model, num_micro_batches=num_micro_batches, groups=groups, loss_hook=loss_hook
    )
