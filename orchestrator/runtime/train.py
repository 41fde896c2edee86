"""The training loop, one process per rank, top to bottom:

init distributed -> layout and groups -> data -> model -> DeepSpeed engine -> loop.

Rank 0 prints the start-up banner and one progress line per logging interval
and writes ``metrics.jsonl`` and TensorBoard events (``orchestrator.runtime.monitor``);
the loss it reports is the global-batch mean. What the loop leans on, each in
its own module: the step of its engine kind (``orchestrator.runtime.steppers``),
the checkpoint operations on the built ``Run`` (``orchestrator.runtime.resume``),
the bad-step verdicts (``orchestrator.runtime.numerics``) and the testing aids
behind two hooks (``orchestrator.runtime.aids``). Teardown is an ``ExitStack``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model_parallel.groups import ProcessGroups
from model_parallel.layout import Layout
from model_parallel.llama import Transformer, compile_model
from model_parallel.pipeline import LlamaPipeline, load_stage_state_dict
from orchestrator.config.schema import Config
from orchestrator.data.build import build_sources
from orchestrator.planning.plan import Plan, resolve_plan
from orchestrator.protocol import EXIT_REQUEUE, EXIT_SAVE_FAILED, phase_label
from orchestrator.runtime import engine as ds_engine
from orchestrator.runtime import resume
from orchestrator.runtime.aids import TestingAids
from orchestrator.runtime.commwait import CommWaitClock
from orchestrator.runtime.dist_env import console_fd, init_process_group, read_env
from orchestrator.runtime.faults import Heartbeat, StopRequest, Watchdog
from orchestrator.runtime.monitor import Monitor, banner, loss_scale, open_sinks
from orchestrator.runtime.numerics import NumericsGuard, agree
from orchestrator.runtime.resume import Run
from orchestrator.runtime.startup import StartupSignals
from orchestrator.runtime.steppers import stepper_for
from orchestrator.state import checkpoint
from orchestrator.state.weights import read_pretrained

log = logging.getLogger("orchestrator.runtime.train")


def train(cfg: Config, run_dir: Path, *, signals: StartupSignals | None = None) -> int:
    """Train one rank; returns the exit code (0, or ``EXIT_REQUEUE`` after a stop signal).

    ``signals``: the worker's ``StartupSignals``, started before torch was
    imported; else they are taken from here on.
    """
    signals = signals or StartupSignals().start()
    env = read_env()
    _setup_logging(env.rank)
    signals.who = f"rank {env.rank}"
    aids = TestingAids(cfg.faults, rank=env.rank)
    # Beats finer than the hang limit: a frozen rank is silent for several intervals when
    # its peers' watchdogs fire, so rank 0 can tell it from ranks waiting on it.
    beat_interval = min(cfg.faults.heartbeat_interval_s, cfg.faults.hang_timeout_s / 8)
    heartbeat = Heartbeat(run_dir, env.rank, interval_s=beat_interval)
    # A step that raises leaves nothing behind: torch.distributed unpatched, the
    # watchdog stopped, the sinks closed (the normal end also beats "exited" and
    # shuts the engine and process group down, which a failing rank must not wait on).
    with contextlib.ExitStack() as undo:
        watchdog = Watchdog(
            heartbeat,
            timeout_s=cfg.faults.hang_timeout_s,
            startup_timeout_s=cfg.faults.startup_timeout_s,
            world_size=env.world_size,
            reporter=env.rank == 0,
        ).start()
        undo.callback(watchdog.stop)

        def enter(phase: str, step: int = 0) -> None:
            """The next start-up phase: in the heartbeat, under the watchdog's start-up limit."""
            signals.phase = phase
            watchdog.progress(step, phase_label(phase))
            aids.at_phase(phase)

        enter("rendezvous")
        # Collectives time out well after the watchdog, so its clearer message comes first.
        device = init_process_group(env, timeout_s=2 * cfg.faults.hang_timeout_s)
        enter("deepspeed comm")
        ds_engine.init_deepspeed_comm()
        plan = resolve_plan(cfg)
        groups = ProcessGroups.build(Layout(tp=plan.tp, pp=plan.pp, dp=plan.dp))
        _seed_everything(cfg.train.seed)

        enter("data indexes")
        data, valid_data = build_sources(
            cfg,
            seq_len=plan.seq_len,
            dp_rank=groups.dp_rank,
            dp_size=groups.dp_size,
            global_batch=plan.global_batch_size,
            micro_batch=plan.micro_batch_size,
        )
        enter("model build")
        model = build_model(cfg, plan, groups)
        if cfg.model.init_from and checkpoint.latest_tag(run_dir) is None:
            enter("pretrained weights")
            _load_pretrained(model, cfg)
        model = model.to(device)
        if cfg.model.compile:
            compile_model(model)  # each block, not the engine: DeepSpeed's hooks stay eager
        enter("engine")
        on_gpu = device.type == "cuda"
        engine = ds_engine.initialize(model, plan, cfg.train, cfg.deepspeed, groups, on_gpu=on_gpu)
        run = Run(cfg, plan, groups, run_dir, engine, data)
        stepper = stepper_for(
            engine,
            model,
            num_micro_batches=plan.num_micro_batches,
            groups=groups,
            loss_hook=aids.loss_hook,
        )
        enter("checkpoint search")
        tag = checkpoint.find_resumable(run_dir, run.layout) if cfg.run.resume == "auto" else None
        start_step = 0
        if tag is not None:
            enter("re-shard" if resume.needs_reshard(run, tag) else "checkpoint load")
            start_step = resume.restore(run, tag)
        if env.rank == 0:
            resume_point = "fresh start" if tag is None else f"{tag} (step {start_step})"
            log.info("\n%s", banner(cfg, plan, run_dir, resume=resume_point))
        monitor = Monitor(
            plan,
            cfg.model,
            cfg.cluster,
            run_dir,
            total_steps=cfg.train.steps,
            rank=env.rank,
            device=device,
            heartbeat=heartbeat,
            sinks=open_sinks(cfg, run_dir) if env.rank == 0 else None,
        )
        undo.callback(monitor.close_sinks)

        def evaluate(step: int, phase: str = "evaluation") -> None:
            interval = cfg.train.eval_interval
            if valid_data is None or not interval or (step % interval and step != cfg.train.steps):
                return
            watchdog.progress(step, phase)
            monitor.eval_done(step, stepper.evaluate(valid_data, cfg.train.eval_iters))

        batches = iter(data)
        guard = NumericsGuard(
            max_consecutive_skips=cfg.faults.max_consecutive_skips,
            spike_factor=cfg.faults.spike_factor,
            spike_window=cfg.faults.spike_window,
            fp16=plan.precision.loss_scaling,
        )
        stopping = save_failed = False
        if start_step == 0:
            evaluate(0, phase_label("first evaluation"))
        step = start_step
        enter("first step", step)  # compiling, the first pass of every collective
        signals.stop()
        stop = StopRequest()  # from now on a stop signal is honoured at the end of a step
        comm_wait = CommWaitClock().install()  # busy = step - waits: the straggler signal
        undo.callback(comm_wait.uninstall)
        while step < cfg.train.steps:
            if not watchdog.in_startup:
                watchdog.progress(step, f"training step {step + 1}")
            start, waited_before = time.perf_counter(), comm_wait.total
            aids.before_step(int(data.state_dict()["position"]) // plan.num_micro_batches + 1)
            lr = engine.get_lr()[0]
            skips_before = engine.skipped_steps
            loss, grad_norm = stepper.train_step(batches)
            elapsed = time.perf_counter() - start
            watchdog.end_startup()
            waited = comm_wait.total - waited_before
            done = step + 1
            # Every rank the same verdict, whichever rank saw the fault.
            seen, skipped = agree(loss, skipped=engine.skipped_steps > skips_before, device=device)
            verdict = guard.observe(seen, skipped=skipped)
            scale = loss_scale(engine, plan.precision)
            monitor.step_done(
                step=done,
                loss=seen,
                lr=lr,
                grad_norm=grad_norm,
                elapsed=elapsed,
                comm_wait=waited,
                consumed_tokens=run.consumed_tokens(),
                skipped_steps=guard.skipped_total,
                loss_scale=scale,
                scaler_skips=guard.scaler_skips,
                log_now=verdict.skipped
                or done % cfg.train.log_interval == 0
                or done == cfg.train.steps,
            )
            if verdict.scaler:
                log.info(
                    "step %d/%d | fp16 loss scale overflow: not applied, scale now %s "
                    "(scaler skips so far: %d; not bad steps)",
                    done,
                    cfg.train.steps,
                    scale,
                    guard.scaler_skips,
                )
            elif verdict.skipped:
                log.warning(
                    "step %d/%d | skipped: loss %s, grad_norm %s (not applied)",
                    done,
                    cfg.train.steps,
                    seen,
                    grad_norm,
                )
            if verdict.rollback:
                step = resume.roll_back(run, verdict.rollback, done)
                guard.after_rollback()
                continue
            evaluate(done)
            interval = cfg.checkpoint.interval
            stopping = stop.agreed() and done < cfg.train.steps
            exiting = done == cfg.train.exit_at_step
            if (
                done == cfg.train.steps
                or stopping
                or exiting
                or (interval and done % interval == 0)
            ):
                try:
                    watchdog.progress(done, "checkpoint save")
                    resume.save(run, done)
                except checkpoint.CheckpointSaveError as exc:  # on every rank: end the run
                    log.error("step %d/%d | %s", done, cfg.train.steps, exc)
                    save_failed = True
                    break
            if stopping:
                log.warning(
                    "step %d/%d | stopped by signal %s: checkpoint written, exiting for requeue",
                    done,
                    cfg.train.steps,
                    stop.signal or "(another rank's)",
                )
                break
            if exiting:
                log.info("step %d/%d | train.exit_at_step reached", done, cfg.train.steps)
                break
            step = done

        monitor.close()  # the last heartbeat says "exited"
        undo.close()  # collectives unpatched, watchdog stopped
        _shutdown(engine)
        if save_failed:
            return EXIT_SAVE_FAILED
        return EXIT_REQUEUE if stopping else 0


def _load_pretrained(model: torch.nn.Module, cfg: Config) -> None:
    """Replace the random init by ``model.init_from``'s weights (Hugging Face or Meta)."""
    assert cfg.model.init_from is not None
    state = read_pretrained(Path(cfg.model.init_from), cfg.model.to_args())
    if isinstance(model, LlamaPipeline):
        load_stage_state_dict(model, state)
    else:
        assert isinstance(model, Transformer)
        model.load_full_state_dict(state)
    log.info("initialised from %s", cfg.model.init_from)


def build_model(cfg: Config, plan: Plan, groups: ProcessGroups) -> torch.nn.Module:
    """The whole model (pp = 1) or this rank's pipeline stage (pp > 1)."""
    args = cfg.model.to_args()
    model: LlamaPipeline | Transformer
    if plan.pp > 1:
        model = LlamaPipeline(
            args,
            groups=groups,
            stage_layers=plan.stage_layers,
            sequence_parallel=plan.sequence_parallel,
            activation_checkpointing=plan.activation_checkpointing,
            seed=cfg.train.seed,
        )
    else:
        model = Transformer(
            args,
            groups=groups,
            sequence_parallel=plan.sequence_parallel,
            activation_checkpointing=plan.activation_checkpointing,
            seed=cfg.train.seed,
        )
    return model


def _seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (the model's init has its own)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    """Every line carries the date and time, the rank and the node.

    All goes to the rank's log (stdout); our own lines also to the console
    pipe when the local launcher gave one (``dist_env.console_fd``).
    """
    fmt = f"%(asctime)s [rank {rank} {socket.gethostname()}] %(levelname)s %(message)s"
    datefmt = "%Y-%m-%d %H:%M:%S"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt=datefmt, force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    fd = console_fd()
    if fd is not None:
        console = logging.StreamHandler(os.fdopen(fd, "w", buffering=1, errors="replace"))
        console.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
        logging.getLogger("orchestrator").addHandler(console)


def _shutdown(engine: Any) -> None:
    """ZeRO-3 can abort at exit unless the engine is destroyed before the process group."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    dist.barrier()
    dist.destroy_process_group()
