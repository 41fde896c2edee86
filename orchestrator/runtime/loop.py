"""The step loop of one rank, once everything is built: step, report, judge, save, stop.

``TrainLoop.run`` goes from the resume step to ``train.steps``; each step is
trained by the engine kind's stepper, agreed on by every rank (one verdict
whichever rank saw a bad loss), reported to the monitor, then followed by an
evaluation when due and a checkpoint when due, asked for (a stop signal on any
rank) or at the end. It returns the rank's exit code; ``train()`` does the
teardown whatever happens here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from orchestrator.data import Batch, MicroBatchSource
from orchestrator.protocol import EXIT_REQUEUE, EXIT_SAVE_FAILED
from orchestrator.runtime import resume
from orchestrator.runtime.aids import TestingAids
from orchestrator.runtime.commwait import CommWaitClock
from orchestrator.runtime.faults import StopRequest, Watchdog
from orchestrator.runtime.monitor import Monitor, loss_scale
from orchestrator.runtime.numerics import NumericsGuard, Verdict, agree
from orchestrator.runtime.resume import Run
from orchestrator.runtime.steppers import Stepper
from orchestrator.state import checkpoint

log = logging.getLogger("orchestrator.runtime.train")


@dataclass
class TrainLoop:
    """What the loop drives: the built run, its stepper, the monitor, the watchdog."""

    run: Run
    stepper: Stepper
    monitor: Monitor
    watchdog: Watchdog
    aids: TestingAids
    valid_data: MicroBatchSource | None
    device: torch.device

    def __post_init__(self) -> None:
        faults = self.run.cfg.faults
        self.guard = NumericsGuard(
            max_consecutive_skips=faults.max_consecutive_skips,
            spike_factor=faults.spike_factor,
            spike_window=faults.spike_window,
            fp16=self.run.plan.precision.loss_scaling,
        )
        self.steps = self.run.cfg.train.steps

    def evaluate(self, step: int, phase: str = "evaluation") -> None:
        """The validation loss at ``step`` when one is due (every ``eval_interval`` and the end)."""
        interval = self.run.cfg.train.eval_interval
        if self.valid_data is None or not interval or (step % interval and step != self.steps):
            return
        self.watchdog.progress(step, phase)
        iters = self.run.cfg.train.eval_iters
        self.monitor.eval_done(step, self.stepper.evaluate(self.valid_data, iters))

    def run_from(self, step: int, *, stop: StopRequest, comm_wait: CommWaitClock) -> int:
        """Train from ``step`` to the end, a stop signal or a failed save; the exit code."""
        batches = iter(self.run.data)
        while step < self.steps:
            done = step + 1
            verdict = self._step(step, batches, comm_wait)
            if verdict.rollback:
                step = resume.roll_back(self.run, verdict.rollback, done)
                self.guard.after_rollback()
                continue
            self.evaluate(done)
            code = self._save_or_stop(done, stop)
            if code is not None:
                return code
            step = done
        return 0

    def _step(self, step: int, batches: Iterator[Batch], comm_wait: CommWaitClock) -> Verdict:
        """Train step ``step + 1``, report it, and return every rank's common verdict on it."""
        run, plan, engine = self.run, self.run.plan, self.run.engine
        if not self.watchdog.in_startup:
            self.watchdog.progress(step, f"training step {step + 1}")
        start, waited_before = time.perf_counter(), comm_wait.total
        self.aids.before_step(int(run.data.state_dict()["position"]) // plan.num_micro_batches + 1)
        lr = engine.get_lr()[0]
        skips_before = engine.skipped_steps
        loss, grad_norm = self.stepper.train_step(batches)
        elapsed = time.perf_counter() - start
        self.watchdog.end_startup()
        waited = comm_wait.total - waited_before  # busy = step - waits: the straggler signal
        done = step + 1
        # Every rank the same verdict, whichever rank saw the fault.
        seen, skipped = agree(loss, skipped=engine.skipped_steps > skips_before, device=self.device)
        verdict = self.guard.observe(seen, skipped=skipped)
        scale = loss_scale(engine, plan.precision)
        self.monitor.step_done(
            step=done,
            loss=seen,
            lr=lr,
            grad_norm=grad_norm,
            elapsed=elapsed,
            comm_wait=waited,
            consumed_tokens=run.consumed_tokens(),
            skipped_steps=self.guard.skipped_total,
            loss_scale=scale,
            scaler_skips=self.guard.scaler_skips,
            log_now=verdict.skipped or done % run.cfg.train.log_interval == 0 or done == self.steps,
        )
        self._log_verdict(verdict, done, seen, grad_norm, scale)
        return verdict

    def _log_verdict(
        self, verdict: Verdict, done: int, loss: float, grad_norm: float | None, scale: float | None
    ) -> None:
        if verdict.scaler:
            log.info(
                "step %d/%d | fp16 loss scale overflow: not applied, scale now %s "
                "(scaler skips so far: %d; not bad steps)",
                done,
                self.steps,
                scale,
                self.guard.scaler_skips,
            )
        elif verdict.skipped:
            log.warning(
                "step %d/%d | skipped: loss %s, grad_norm %s (not applied)",
                done,
                self.steps,
                loss,
                grad_norm,
            )

    def _save_or_stop(self, done: int, stop: StopRequest) -> int | None:
        """Checkpoint when due; the exit code when the run ends here, else None."""
        cfg = self.run.cfg
        interval = cfg.checkpoint.interval
        stopping = stop.agreed() and done < self.steps  # a collective: every rank, every step
        exiting = done == cfg.train.exit_at_step
        if done == self.steps or stopping or exiting or (interval and done % interval == 0):
            try:
                self.watchdog.progress(done, "checkpoint save")
                resume.save(self.run, done)
            except checkpoint.CheckpointSaveError as exc:  # on every rank: end the run
                log.error("step %d/%d | %s", done, self.steps, exc)
                return EXIT_SAVE_FAILED
        if stopping:
            log.warning(
                "step %d/%d | stopped by signal %s: checkpoint written, exiting for requeue",
                done,
                self.steps,
                stop.signal or "(another rank's)",
            )
            return EXIT_REQUEUE
        if exiting:
            log.info("step %d/%d | train.exit_at_step reached", done, self.steps)
            return 0
        return None
