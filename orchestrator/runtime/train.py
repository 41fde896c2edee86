"""The training loop, one process per rank, top to bottom:

init distributed -> layout and groups -> data -> model -> DeepSpeed engine -> loop.

Rank 0 prints the start-up banner and one progress line per logging interval
and writes ``metrics.jsonl`` and TensorBoard events (``orchestrator.runtime.monitor``);
the loss it reports is the global-batch mean. What the loop leans on, each in
its own module: the step of its engine kind (``orchestrator.runtime.steppers``),
the checkpoint operations on the built ``Run`` (``orchestrator.runtime.resume``),
the step loop itself (``orchestrator.runtime.loop``: step, verdict, save, stop),
the bad-step verdicts (``orchestrator.runtime.numerics``) and the testing aids
behind two hooks (``orchestrator.runtime.aids``). Teardown is an ``ExitStack``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model_parallel.args import ModelArgs
from model_parallel.groups import ProcessGroups
from model_parallel.layout import Layout
from model_parallel.llama import Transformer, compile_model
from model_parallel.pipeline import LlamaPipeline, load_stage_state_dict
from orchestrator.config.schema import Config, FaultsConfig, ModelConfig
from orchestrator.data.build import build_sources
from orchestrator.planning.plan import Plan, resolve_plan
from orchestrator.protocol import phase_label
from orchestrator.runtime import engine as ds_engine
from orchestrator.runtime import resume
from orchestrator.runtime.aids import TestingAids
from orchestrator.runtime.commwait import CommWaitClock
from orchestrator.runtime.dist_env import console_fd, init_process_group, read_env
from orchestrator.runtime.faults import Heartbeat, StopRequest, Watchdog
from orchestrator.runtime.loop import TrainLoop
from orchestrator.runtime.monitor import Monitor, banner, open_sinks
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
    heartbeat = Heartbeat(run_dir, env.rank, interval_s=_beat_interval(cfg.faults))
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
        phases = _Phases(signals, watchdog, TestingAids(cfg.faults, rank=env.rank))

        phases.enter("rendezvous")
        # Collectives time out well after the watchdog, so its clearer message comes first.
        device = init_process_group(env, timeout_s=2 * cfg.faults.hang_timeout_s)
        phases.enter("deepspeed comm")
        ds_engine.init_deepspeed_comm()
        plan = resolve_plan(cfg)
        groups = ProcessGroups.build(Layout(tp=plan.tp, pp=plan.pp, dp=plan.dp))
        _seed_everything(cfg.train.seed)

        phases.enter("data indexes")
        data, valid_data = build_sources(
            cfg,
            seq_len=plan.seq_len,
            dp_rank=groups.dp_rank,
            dp_size=groups.dp_size,
            global_batch=plan.global_batch_size,
            micro_batch=plan.micro_batch_size,
        )
        model = _model(cfg, plan, groups, run_dir, device, phases)
        phases.enter("engine")
        engine = ds_engine.initialize(
            model, plan, cfg.train, cfg.deepspeed, groups, on_gpu=device.type == "cuda"
        )
        run = Run(cfg, plan, groups, run_dir, engine, data)
        stepper = stepper_for(
            engine,
            model,
            num_micro_batches=plan.num_micro_batches,
            groups=groups,
            loss_hook=phases.aids.loss_hook,
        )
        start_step = _resume(run, phases, rank=env.rank)
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
        loop = TrainLoop(run, stepper, monitor, watchdog, phases.aids, valid_data, device)

        if start_step == 0:
            loop.evaluate(0, phase_label("first evaluation"))
        phases.enter("first step", start_step)  # compiling, the first pass of every collective
        signals.stop()
        stop = StopRequest()  # from now on a stop signal is honoured at the end of a step
        comm_wait = CommWaitClock().install()
        undo.callback(comm_wait.uninstall)
        code = loop.run_from(start_step, stop=stop, comm_wait=comm_wait)

        monitor.close()  # the last heartbeat says "exited"
        undo.close()  # collectives unpatched, watchdog stopped
        _shutdown(engine)
        return code


@dataclass
class _Phases:
    """The start-up phases: each one named in the heartbeat, under the watchdog's start-up limit."""

    signals: StartupSignals
    watchdog: Watchdog
    aids: TestingAids

    def enter(self, phase: str, step: int = 0) -> None:
        self.signals.phase = phase
        self.watchdog.progress(step, phase_label(phase))
        self.aids.at_phase(phase)


def _beat_interval(faults: FaultsConfig) -> float:
    """Beats finer than the hang limit: a frozen rank is silent for several intervals when
    its peers' watchdogs fire, so rank 0 can tell it from ranks waiting on it."""
    return min(faults.heartbeat_interval_s, faults.hang_timeout_s / 8)


def _model(
    cfg: Config,
    plan: Plan,
    groups: ProcessGroups,
    run_dir: Path,
    device: torch.device,
    phases: _Phases,
) -> torch.nn.Module:
    """This rank's model on ``device``: built, pretrained weights on a fresh run, compiled."""
    phases.enter("model build")
    model = build_model(cfg.model.to_args(), plan, groups, seed=cfg.train.seed)
    if cfg.model.init_from and checkpoint.latest_tag(run_dir) is None:
        phases.enter("pretrained weights")
        _load_pretrained(model, cfg.model)
    model = model.to(device)
    if cfg.model.compile:
        compile_model(model)  # each block, not the engine: DeepSpeed's hooks stay eager
    return model


def _resume(run: Run, phases: _Phases, *, rank: int) -> int:
    """Load the newest complete checkpoint (``run.resume=auto``); the step to go on from.

    Rank 0 then prints the start-up banner, which names where the run resumed.
    """
    phases.enter("checkpoint search")
    cfg = run.cfg
    tag = checkpoint.find_resumable(run.run_dir, run.layout) if cfg.run.resume == "auto" else None
    start_step = 0
    if tag is not None:
        phases.enter("re-shard" if resume.needs_reshard(run, tag) else "checkpoint load")
        start_step = resume.restore(run, tag)
    if rank == 0:
        resume_point = "fresh start" if tag is None else f"{tag} (step {start_step})"
        log.info("\n%s", banner(cfg, run.plan, run.run_dir, resume=resume_point))
    return start_step


def _load_pretrained(model: torch.nn.Module, model_cfg: ModelConfig) -> None:
    """Replace the random init by ``model.init_from``'s weights (Hugging Face or Meta)."""
    assert model_cfg.init_from is not None
    state = read_pretrained(Path(model_cfg.init_from), model_cfg.to_args())
    if isinstance(model, LlamaPipeline):
        load_stage_state_dict(model, state)
    else:
        assert isinstance(model, Transformer)
        model.load_full_state_dict(state)
    log.info("initialised from %s", model_cfg.init_from)


def build_model(
    args: ModelArgs, plan: Plan, groups: ProcessGroups, *, seed: int
) -> torch.nn.Module:
    """The whole model (pp = 1) or this rank's pipeline stage (pp > 1), as the plan carves it.

    ``seed``: the initialisation's (``train.seed``); the same weights under every layout.
    """
    model: LlamaPipeline | Transformer
    if plan.pp > 1:
        model = LlamaPipeline(
            args,
            groups=groups,
            stage_layers=plan.stage_layers,
            sequence_parallel=plan.sequence_parallel,
            activation_checkpointing=plan.activation_checkpointing,
            seed=seed,
        )
    else:
        model = Transformer(
            args,
            groups=groups,
            sequence_parallel=plan.sequence_parallel,
            activation_checkpointing=plan.activation_checkpointing,
            seed=seed,
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
