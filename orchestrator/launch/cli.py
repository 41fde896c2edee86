"""Command-line front end behind ``launch/run.py``.

``main`` takes the config Hydra composed (``orchestrator.config.compose`` turns it
into dataclasses and every composition error into one line, exit 2), checks
it, prints the plan, and launches: here (``launcher=local``), as this rank
(``launcher=env``/``mpi``) or as a SLURM job (``launcher=slurm``). The run
folder is written by ``orchestrator.launch.run_folder``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.compose import (
    EXIT_BAD_CONFIG,
    command_line,
    describe_error,
    print_error,
    to_config,
)
from orchestrator.config.schema import Config
from orchestrator.data.build import resolve_paths
from orchestrator.launch import slurm
from orchestrator.launch.launcher import local_capacity, run_local
from orchestrator.launch.run_folder import (
    prepare_run_dir,
    run_dir_files,
    run_dir_of,
    with_run_dir,
)
from orchestrator.planning import cpu_allocator, perf
from orchestrator.planning.ds_config import deepspeed_config
from orchestrator.planning.plan import Plan, format_plan, validate_config, with_layout

if TYPE_CHECKING:
    from orchestrator.runtime.dist_env import DistEnv

_REPO_ROOT = Path(__file__).resolve().parents[2]
_RANK_WAIT_S = 600  # how long ranks > 0 wait for rank 0's run directory


def main(cfg: DictConfig) -> int:
    """Check one composed config, print its plan, and launch it unless ``dry_run``.

    Returns the process exit code: 2 for a bad setting (nothing started,
    nothing written), otherwise the launcher's (``launcher=slurm``: 0 once submitted).
    """
    try:
        # Each step returns a new config; the composed one is never changed.
        config = to_config(cfg, command_line())
        plan = validate_config(config)
        config = with_layout(config, plan)  # parallel.auto: the chosen layout
        ds_json = deepspeed_config(plan, config.train, config.deepspeed)  # checks deepspeed.extra
        if not config.dry_run:
            check_fits_memory(config, plan)
        launcher = "dry_run" if config.dry_run else choose_launcher(config, plan)
        env = _rank_env(config, plan) if launcher == "rank" else None  # needs the given run.dir
        config = with_run_dir(config)
        script = None
        if "slurm" in (launcher, config.launcher):
            script = job_script(config, plan)  # every SLURM rule, before anything is written
        if not config.dry_run:
            config = resolve_paths(config)  # data files exist; model and tokenizer agree
    except (ValueError, RuntimeError, OmegaConfBaseException) as exc:
        print_error(describe_error(exc))
        return EXIT_BAD_CONFIG
    if script is not None and not config.dry_run:
        return _submit(config, plan, ds_json, script)  # prints the plan once submitted
    if launcher == "dry_run":
        print(format_plan(plan, config), flush=True)
        print("dry run: config and layout are valid; nothing launched")
        return 0
    # A run's plan is in the banner rank 0 prints once it has started.
    if env is not None:
        return _run_as_rank(config, ds_json, env.rank)
    run_dir = prepare_run_dir(config, ds_json)
    print(
        f"run directory: {run_dir} ({plan.world_size} local workers; rank logs in {run_dir}/logs)",
        flush=True,
    )
    return run_local(run_dir, plan.world_size)


def choose_launcher(config: Config, plan: Plan) -> str:
    """Where this run goes: local, slurm, or rank (this process is one rank of a job that started it).

    ``launcher=auto``: a rank when srun, mpirun or torchrun started us; else
    local when the layout fits this machine; else sbatch when the cluster is a
    SLURM cluster and sbatch is here; else a ``ValueError`` naming the options.
    """
    if config.launcher == "local":
        _check_fits_locally(config, plan)
        return "local"
    if config.launcher == "slurm":
        if config.slurm.submit:
            slurm.find_sbatch()
        return "slurm"
    # Imported here, as train is: the rank's side. dist_env is the only reader of
    # the launcher's variables (srun, mpirun, torchrun), so it alone can say.
    from orchestrator.runtime import dist_env

    if dist_env.started_by() is not None:
        return "rank"
    try:
        _check_fits_locally(config, plan, launcher="auto")
        return "local"
    except ValueError as exc:
        if config.cluster.scheduler == "slurm" and shutil.which("sbatch"):
            return "slurm"
        where = (
            "sbatch is not on PATH here (launcher=slurm on a SLURM login node submits it)"
            if config.cluster.scheduler == "slurm"
            else f"cluster={config.cluster.name} is this machine (choose a SLURM cluster, "
            "e.g. cluster=a100_80g launcher=slurm, to submit it)"
        )
        raise ValueError(f"{exc}; {where}; or dry_run=true to only check it") from exc


def check_fits_memory(config: Config, plan: Plan) -> None:
    """Refuse a GPU layout whose planned memory per device exceeds ``cluster.device_memory_gb``.

    Whatever launches it (local, sbatch, a rank of a running job), such a run
    would only end in an out-of-memory error. CPU clusters are not checked:
    their ranks share the host's memory, which the per-device plan does not model.
    """
    if config.cluster.gpus_per_node == 0:
        return
    est = perf.estimate(plan, config.model, config.cluster)
    if est.fits:
        return
    peak = est.peak
    gib = 2.0**30
    largest = dict(peak.items())[peak.largest]
    raise ValueError(
        f"cluster.device_memory_gb={config.cluster.device_memory_gb:g}: the plan needs "
        f"{peak.total / gib:.1f} GiB per device on pipeline stage {peak.stage} "
        f"(largest item: {peak.largest} {largest / gib:.1f} GiB); raise parallel.tp or "
        "parallel.pp, use parallel.zero_stage, parallel.activation_checkpointing or a "
        "smaller parallel.micro_batch_size, or parallel=auto; dry_run=true prints the plan"
    )


def _check_fits_locally(config: Config, plan: Plan, *, launcher: str = "local") -> None:
    capacity, what = local_capacity(config.cluster.max_local_procs)
    gpus = config.cluster.gpus_per_node
    if launcher == "auto" and gpus > 0 and "GPU" not in what:
        raise ValueError(
            f"launcher=auto: cluster={config.cluster.name} runs one rank per GPU "
            f"(world size {plan.world_size}) and this machine has no GPU"
        )
    cpu_allocator.check(config.cluster)
    if config.train.precision == "fp16" and "GPU" not in what:
        raise ValueError(
            "train.precision=fp16: needs GPUs (loss scaling is a GPU path); use bf16 or fp32 on CPU"
        )
    if plan.world_size > capacity:
        hint = "; use a smaller layout, or dry_run=true to only check it"
        raise ValueError(
            f"launcher={launcher}: the layout needs {plan.world_size} processes "
            f"(tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp})) but {what} allow {capacity}"
            + (hint if launcher == "local" else "")
        )


def job_script(config: Config, plan: Plan) -> str:
    """The sbatch script of this run (``launcher=slurm``); chooses ``run.dir`` if unset."""
    run_dir = run_dir_of(config)
    python = config.slurm.python or sys.executable
    notes = (
        f"Run directory: {run_dir} (config.yaml, logs/rank_N.log, checkpoints/).",
        f"Submit again to resume: sbatch {run_dir / slurm.SCRIPT_NAME}",
    )
    return slurm.render_sbatch(
        config, plan, run_dir, python=python, workdir=_REPO_ROOT, notes=notes
    )


def _submit(config: Config, plan: Plan, ds_json: dict[str, Any], script_text: str) -> int:
    run_dir = run_dir_of(config)
    files = {**run_dir_files(config, ds_json), slurm.SCRIPT_NAME: script_text}
    try:
        sbatch = slurm.find_sbatch() if config.slurm.submit else None
        job_id = slurm.write_and_submit(run_dir, files, sbatch=sbatch, cwd=_REPO_ROOT)
    except ValueError as exc:
        print_error(describe_error(exc))
        return EXIT_BAD_CONFIG
    script = run_dir / slurm.SCRIPT_NAME
    print(format_plan(plan, config))
    if job_id is None:
        print(f"run directory: {run_dir}\nnot submitted (slurm.submit=false): sbatch {script}")
        return 0
    print(
        f"submitted batch job {job_id}\nrun directory: {run_dir}\n"
        f"watch: squeue -j {job_id}\n"
        f"logs: tail -f {run_dir}/logs/rank_0.log  (job script output: "
        f"{run_dir}/logs/slurm-{job_id}.out)",
        flush=True,
    )
    return 0


def _rank_env(config: Config, plan: Plan) -> DistEnv:
    """This rank's place, checked against the layout; every rank needs the same ``run.dir``."""
    from orchestrator.runtime import dist_env  # the rank's side (choose_launcher)

    launcher = dist_env.started_by()
    if config.run.dir is None:
        raise ValueError(
            f"run.dir=null: started by {launcher}, every rank must write one directory; "
            "set run.dir=PATH on a filesystem all nodes share"
        )
    env = dist_env.read_env()
    if env.world_size != plan.world_size:
        raise ValueError(
            f"launcher=auto: started by {launcher} with {env.world_size} ranks but the layout "
            f"needs world_size({plan.world_size}) = tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp})"
        )
    return env


def _run_as_rank(config: Config, ds_json: dict[str, Any], rank: int) -> int:
    """Rank 0 writes the run directory, the others wait for it; then each trains."""
    run_dir = run_dir_of(config)
    if rank == 0:
        prepare_run_dir(config, ds_json)
        print(f"run directory: {run_dir}", flush=True)
    else:
        deadline = time.monotonic() + _RANK_WAIT_S
        while not (run_dir / "config.yaml").exists():
            if time.monotonic() > deadline:
                print_error(f"run.dir={run_dir}: rank 0 wrote no config.yaml in {_RANK_WAIT_S}s")
                return 1
            time.sleep(0.5)
    # Imported here: it loads DeepSpeed (seconds, and a warning on stdout) that only ranks need.
    from orchestrator.protocol import ignore_stop_signals
    from orchestrator.runtime.train import train

    code = train(config, run_dir)
    ignore_stop_signals()
    return code
