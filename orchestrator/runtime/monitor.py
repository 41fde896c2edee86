"""What a run tells its operators: the start-up banner, progress lines, metrics sinks.

Every rank keeps a ``Monitor``: it times the steps and puts the recent step
time, busy time (the step minus its waits in collectives, see
``orchestrator.runtime.commwait``) and peak memory into the rank's heartbeat
(``orchestrator.status.report`` compares busy times to find stragglers). Rank 0 also prints the banner and the progress line
and writes ``metrics.jsonl``, TensorBoard events (``RUN_DIR/tensorboard``) and,
when ``monitor.wandb_project`` is set and ``wandb`` is installed, Weights &
Biases.

Rank 0 holds the loss: without a pipeline it is all-reduced over dp; with one,
DeepSpeed's ``train_batch`` computes it on the last stage and broadcasts it
over the pipeline group, so the first stage's ranks return the same value.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from orchestrator.config.cluster import ClusterConfig
from orchestrator.config.model import ModelConfig
from orchestrator.config.schema import Config
from orchestrator.planning import cpu_allocator, cpu_costs
from orchestrator.planning.flops import hardware_flops_per_token, model_flops_per_token
from orchestrator.planning.plan import Plan, format_plan
from orchestrator.planning.precision import Precision
from orchestrator.runtime.faults import Heartbeat
from orchestrator.status.metrics import MetricsWriter, StepMetrics, peak_memory_gb, progress_line

log = logging.getLogger("orchestrator.runtime.monitor")

_ETA_WINDOW = 20  # steps in the mean step time behind the ETA


class Monitor:
    """Step timing on every rank; progress line and metrics sinks on rank 0."""

    def __init__(
        self,
        plan: Plan,
        model: ModelConfig,
        cluster: ClusterConfig,
        run_dir: Path,
        *,
        total_steps: int,
        rank: int,
        device: torch.device,
        heartbeat: Heartbeat,
        sinks: list[Sink] | None = None,
    ) -> None:
        """``sinks``: rank 0's TensorBoard and W&B writers (``open_sinks``); none elsewhere."""
        self.plan, self.device, self.heartbeat = plan, device, heartbeat
        self.total_steps = total_steps
        self.tokens_per_step = plan.global_batch_size * plan.seq_len
        args = model.to_args()
        self.model_flops = model_flops_per_token(args, plan.seq_len)
        self.peak_tflops = cluster.peak_for(plan.precision.name)
        self.hardware_flops = (
            hardware_flops_per_token(args, plan.seq_len, recompute=True)
            if plan.activation_checkpointing
            else None
        )
        self.last_step = 0
        self._recent: deque[float] = deque(maxlen=_ETA_WINDOW)
        self._recent_busy: deque[float] = deque(maxlen=_ETA_WINDOW)  # step minus collective waits
        self._interval_time, self._interval_steps = 0.0, 0
        self.writer = MetricsWriter(run_dir / "metrics.jsonl") if rank == 0 else None
        self._sinks: list[Sink] = list(sinks or [])

    def step_done(
        self,
        *,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        elapsed: float,
        comm_wait: float = 0.0,
        consumed_tokens: int,
        skipped_steps: int,
        loss_scale: float | None,
        log_now: bool,
        scaler_skips: int = 0,
    ) -> None:
        """After every optimiser step on every rank; logs on rank 0 when ``log_now``."""
        self.last_step = step
        self._recent.append(elapsed)
        self._recent_busy.append(max(elapsed - comm_wait, 0.0))
        self._interval_time += elapsed
        self._interval_steps += 1
        memory = peak_memory_gb(self.device)
        self.heartbeat.note(
            step_time_s=sum(self._recent) / len(self._recent),
            busy_s=sum(self._recent_busy) / len(self._recent_busy),
            peak_mem_gb=memory,
        )
        if self.writer is None or not log_now:
            return
        step_time = self._interval_time / self._interval_steps
        self._interval_time, self._interval_steps = 0.0, 0
        tokens_per_s = self.tokens_per_step / step_time
        per_device = tokens_per_s / self.plan.world_size
        peak = self.peak_tflops
        tflops = per_device * self.model_flops / 1e12
        mean_recent = sum(self._recent) / len(self._recent)
        metrics = StepMetrics(
            step=step,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            consumed_tokens=consumed_tokens,
            step_time_s=step_time,
            skipped_steps=skipped_steps,
            total_steps=self.total_steps,
            loss_scale=loss_scale,
            scaler_skips=scaler_skips,
            tokens_per_s_per_device=per_device,
            tflops_per_device=tflops,
            mfu=tflops / peak,
            hfu=None
            if self.hardware_flops is None
            else per_device * self.hardware_flops / 1e12 / peak,
            peak_mem_gb=memory,
            eta_s=max(0, self.total_steps - step) * mean_recent,
            time=time.time(),
        )
        self.writer.write(metrics)
        log.info(progress_line(metrics, total_steps=self.total_steps))
        scalars = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/loss_scale": loss_scale,
            "train/skipped_steps": skipped_steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": per_device,
            "perf/tflops_per_device": tflops,
            "perf/mfu": metrics.mfu,
            "perf/step_time_s": step_time,
            "perf/peak_mem_gb": memory,
        }
        self._emit(step, scalars)

    def eval_done(self, step: int, loss: float) -> None:
        if self.writer is None:
            return
        self.writer.write_eval(step, loss)
        ppl = math.exp(min(loss, 50.0))
        log.info("step %d/%d | valid_loss %.4f | valid_ppl %.2f", step, self.total_steps, loss, ppl)
        self._emit(step, {"valid/loss": loss, "valid/ppl": ppl})

    def close(self, *, phase: str = "exited") -> None:
        """Last heartbeat (status then knows this rank ended) and the sinks closed."""
        self.heartbeat.beat(self.last_step, phase)
        self.close_sinks()

    def close_sinks(self) -> None:
        """Close the metrics file and the sinks (again: nothing)."""
        writer, sinks = self.writer, self._sinks
        self.writer, self._sinks = None, []
        if writer is not None:
            writer.close()
        for sink in sinks:
            sink.close()

    def _emit(self, step: int, scalars: dict[str, float | int | None]) -> None:
        values = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(v)}
        for sink in list(self._sinks):
            try:
                sink.write(step, values)
            except Exception as exc:  # a metrics sink never stops training
                log.warning("%s: %s; no longer writing to it", type(sink).__name__, exc)
                self._sinks.remove(sink)


class Sink:
    def write(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TensorBoard(Sink):
    """Event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb(Sink):
    def __init__(self, cfg: Config, run_dir: Path) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.monitor.wandb_project,
            name=run_dir.name,
            dir=str(run_dir),
            config=dataclasses.asdict(cfg),
            resume="allow",
        )

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(cfg: Config, run_dir: Path) -> list[Sink]:
    """The sinks ``cfg.monitor`` asks for that can be opened (rank 0's).

    A missing package is a warning, not an error. The whole ``cfg`` is W&B's
    record of the run.
    """
    sinks: list[Sink] = []
    if cfg.monitor.tensorboard:
        try:
            sinks.append(_TensorBoard(run_dir / "tensorboard"))
        except ImportError as exc:
            log.warning("monitor.tensorboard=true but %s: no TensorBoard events", exc)
    if cfg.monitor.wandb_project:
        try:
            sinks.append(_Wandb(cfg, run_dir))
        except ImportError:
            log.warning(
                "monitor.wandb_project is set but wandb is not installed: not logging there"
            )
        except Exception as exc:  # no network, no login: the run goes on
            log.warning("monitor.wandb_project: wandb.init failed (%s): not logging there", exc)
    return sinks


def loss_scale(engine: Any, precision: Precision) -> float | None:
    """fp16's current dynamic loss scale (None for bf16/fp32)."""
    if not precision.loss_scaling:
        return None
    from orchestrator.runtime.ds_compat import loss_scale as current_scale

    return current_scale(getattr(engine, "optimizer", None))


def banner(cfg: Config, plan: Plan, run_dir: Path, *, resume: str) -> str:
    """The start-up summary rank 0 prints once: layout, sizes, estimates, where, from where.

    A warning of the estimate (bf16 emulated on this CPU) is also logged as one.
    """
    args = cfg.model.to_args()
    flops = model_flops_per_token(args, plan.seq_len)
    summary = format_plan(plan, cfg, estimate=False)
    # Estimated once; a failing model never stops a run.
    estimate = estimate_lines(plan, cfg.model, cfg.cluster)
    checkpointing = "full" if plan.activation_checkpointing else "none"
    allocator = []
    if cfg.cluster.gpus_per_node == 0:
        allocator = [
            f"cpu allocator: {cpu_allocator.loaded()} (cluster.cpu_allocator={cfg.cluster.cpu_allocator})"
        ]
    lines = [
        "=" * 72,
        f"run directory: {run_dir}",
        f"resume: {resume}",
        summary,
        f"precision: {plan.precision.name}; activation checkpointing: "
        f"{checkpointing}; sequence parallel: {plan.sequence_parallel}",
        f"steps: {cfg.train.steps} x {plan.global_batch_size * plan.seq_len:,} tokens "
        f"(seq {plan.seq_len}); log every {cfg.train.log_interval}",
        f"model FLOPs per token: {flops:.4g} (6N + 12*l*s*d, orchestrator.planning.flops); "
        f"{_peak_phrase(plan, cfg.cluster)}",
        *allocator,
        *estimate,
        "=" * 72,
    ]
    for line in estimate:
        if line.startswith("warning: "):
            log.warning("%s", line.removeprefix("warning: "))
    return "\n".join(lines)


def _peak_phrase(plan: Plan, cluster: ClusterConfig) -> str:
    """``device peak X TFLOP/s (precision)``, and whether it was measured or configured."""
    precision = plan.precision.name
    try:
        ranks = cpu_costs.ranks_per_node(plan)
        peak, source = cluster.peak_source(precision, ranks_per_node=ranks)
    except Exception as exc:  # the banner never stops a run
        return f"device peak not known ({type(exc).__name__}: {exc})"
    where = "measured on this host" if source.startswith("measured") else source
    return f"device peak {peak:.3g} TFLOP/s ({precision}), {where}"


def estimate_lines(plan: Plan, model: ModelConfig, cluster: ClusterConfig) -> list[str]:
    """The plan's memory and throughput estimate per device.

    From the planner (``orchestrator.planning.perf``: ``format_estimate(estimate(plan,
    model, cluster), cluster)``) when it is there and answers; otherwise the model
    state alone, from the ZeRO formulas (16 bytes per parameter with mixed
    precision Adam, split over dp as the stage splits it).
    """
    try:
        from orchestrator.planning import perf  # type: ignore[attr-defined,unused-ignore]

        estimate = perf.estimate(plan, model, cluster)
        return [str(line) for line in perf.format_estimate(estimate, cluster)]
    except Exception as exc:  # the banner never stops a run
        reason = f"orchestrator.planning.perf: {type(exc).__name__}: {exc}"
    per_rank = max(plan.stage_params_per_rank)
    dp, stage = plan.dp, plan.zero_stage
    bytes_per_param = {0: 16.0, 1: 4 + 12 / dp, 2: 2 + 14 / dp, 3: 16 / dp}[stage]
    state_gb = per_rank * bytes_per_param / 2**30
    return [
        f"memory estimate per device: model state {state_gb:.2f} GB (ZeRO-{stage}, "
        f"{bytes_per_param:.2f} B/param x {per_rank:,} params on the largest stage; "
        f"activations not counted) of {cluster.device_memory_gb:g} GB",
        f"predicted throughput: n/a ({reason})",
    ]
