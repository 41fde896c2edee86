"""Command-line front end behind ``launch/run.py``.

Hydra composes ``conf/`` with the overrides; ``main`` turns the result into
dataclasses, checks it and prints the plan. ``run_entry_point`` wraps the
``@hydra.main`` function so that every bad setting, Hydra's and OmegaConf's
composition errors included, ends as one ``error: ...`` line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator import cpu_allocator, dist_env, perf, slurm
from orchestrator.config import Config, config_yaml, register_configs
from orchestrator.data.build import resolve_paths
from orchestrator.engine import deepspeed_config
from orchestrator.launcher import local_capacity, run_local
from orchestrator.plan import Plan, format_plan, validate_config
from orchestrator.pretrained_config import fill_model_from_checkpoint

EXIT_BAD_CONFIG = 2
_REPO_ROOT = Path(__file__).resolve().parents[1]
_RANK_WAIT_S = 600  # how long ranks > 0 wait for rank 0's run directory
# How Hydra names the override in its composition errors.
_MERGING_OVERRIDE = re.compile(r"^Error merging override (\S+)", re.MULTILINE)
_APPEND_HINT = re.compile(r"^To append to your config use \+(\S+)", re.MULTILINE)


def to_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> Config:
    """The typed config; library code past the entry point only sees this.
    ``overrides``: the command line's (``model=pretrained`` fills the rest)."""
    _reject_unknown_keys(cfg)
    fill_model_from_checkpoint(cfg, overrides)  # the architecture of model.init_from
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]}=???: must be set (add {missing[0]}=... to the command)")
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, Config):
        raise TypeError(f"expected the structured Config schema, got {type(config).__name__}")
    return config


def _command_line() -> list[str]:
    """Hydra's task overrides (the ``key=value`` words of the command line)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Raise for keys a dataclass node does not declare.

    Hydra's ``+key=value`` lifts the struct flag to add a key, even inside a
    dataclass node, and ``OmegaConf.to_object`` then drops it silently.
    Dict-typed fields (``cluster.nccl_env``) may still take new keys.
    """
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    known = {f.name for f in dataclasses.fields(schema)}
    for key in node:
        name = f"{prefix}{key!s}"
        if key not in known:
            raise ValueError(f"{name}: unknown key, {schema.__name__} has no such field")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, prefix=f"{name}.")


def compose_config(overrides: Sequence[str] = (), *, conf_dir: Path) -> Config:
    """Compose ``conf_dir`` with overrides in-process, as ``launch/run.py`` would.

    For tests and tools; raises Hydra's or OmegaConf's errors (see ``describe_error``).
    """
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_config(cfg, overrides)


def main(cfg: DictConfig) -> int:
    """Check one composed config, print its plan, and launch it unless ``dry_run``.

    Returns the process exit code: 2 for a bad setting (nothing started,
    nothing written), otherwise the launcher's (``launcher=slurm``: 0 once submitted).
    """
    try:
        config = to_config(cfg, _command_line())
        plan = validate_config(config)
        deepspeed_config(config, plan)  # an extra key that conflicts fails here
        if not config.dry_run:
            check_fits_memory(config, plan)
        launcher = "dry_run" if config.dry_run else choose_launcher(config, plan)
        script = None
        if "slurm" in (launcher, config.launcher):
            script = job_script(config, plan)  # every SLURM rule, before anything is written
        env = _rank_env(config, plan) if launcher == "rank" else None
        if not config.dry_run:
            resolve_paths(config)  # data files exist; model and tokenizer vocabularies agree
    except (ValueError, RuntimeError, OmegaConfBaseException) as exc:
        _print_error(describe_error(exc))
        return EXIT_BAD_CONFIG
    if script is not None and not config.dry_run:
        return _submit(config, plan, script)  # prints the plan once submitted
    if launcher == "dry_run":
        print(format_plan(plan, config), flush=True)
        print("dry run: config and layout are valid; nothing launched")
        return 0
    # A run's plan is in the banner rank 0 prints once it has started.
    if env is not None:
        return _run_as_rank(config, plan, env.rank)
    run_dir = prepare_run_dir(config, plan)
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
    est = perf.estimate(config, plan)
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
    run_dir = choose_run_dir(config)
    python = config.slurm.python or sys.executable
    notes = (
        f"Run directory: {run_dir} (config.yaml, logs/rank_N.log, checkpoints/).",
        f"Submit again to resume: sbatch {run_dir / slurm.SCRIPT_NAME}",
    )
    return slurm.render_sbatch(
        config, plan, run_dir, python=python, workdir=_REPO_ROOT, notes=notes
    )


def _submit(config: Config, plan: Plan, script_text: str) -> int:
    run_dir = choose_run_dir(config)
    files = {**run_dir_files(config, plan), slurm.SCRIPT_NAME: script_text}
    try:
        sbatch = slurm.find_sbatch() if config.slurm.submit else None
        job_id = slurm.write_and_submit(run_dir, files, sbatch=sbatch, cwd=_REPO_ROOT)
    except ValueError as exc:
        _print_error(describe_error(exc))
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


def _rank_env(config: Config, plan: Plan) -> dist_env.DistEnv:
    """This rank's place, checked against the layout; every rank needs the same ``run.dir``."""
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


def _run_as_rank(config: Config, plan: Plan, rank: int) -> int:
    """Rank 0 writes the run directory, the others wait for it; then each trains."""
    run_dir = choose_run_dir(config)
    if rank == 0:
        prepare_run_dir(config, plan)
        print(f"run directory: {run_dir}", flush=True)
    else:
        deadline = time.monotonic() + _RANK_WAIT_S
        while not (run_dir / "config.yaml").exists():
            if time.monotonic() > deadline:
                _print_error(f"run.dir={run_dir}: rank 0 wrote no config.yaml in {_RANK_WAIT_S}s")
                return 1
            time.sleep(0.5)
    # Imported here: it loads DeepSpeed (seconds, and a warning on stdout) that only ranks need.
    from orchestrator.faults import ignore_stop_signals
    from orchestrator.train import train

    code = train(config, run_dir)
    ignore_stop_signals()
    return code


def choose_run_dir(config: Config) -> Path:
    """``run.dir`` made absolute (default runs/<model>-<parallel>-<timestamp>); creates nothing."""
    if config.run.dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config.run.dir = str(
            Path(config.run.root) / f"{config.model.name}-{config.parallel.name}-{stamp}"
        )
    run_dir = Path(config.run.dir).resolve()
    config.run.dir = str(run_dir)
    return run_dir


def run_dir_files(config: Config, plan: Plan) -> dict[str, str]:
    """What a run directory starts with: the resolved config and the DeepSpeed JSON."""
    return {
        "config.yaml": config_yaml(config),
        "deepspeed.json": json.dumps(deepspeed_config(config, plan), indent=2),
    }


def prepare_run_dir(config: Config, plan: Plan) -> Path:
    """Create the run directory and write the resolved config and DeepSpeed JSON into it."""
    run_dir = choose_run_dir(config)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in run_dir_files(config, plan).items():
        slurm.write_atomic(run_dir / name, text)  # other ranks may be waiting for config.yaml
    return run_dir


def run_entry_point(hydra_main: Callable[[], Any], *, conf_dir: Path) -> int:
    """Call a ``@hydra.main`` function; a composition error becomes one line and exit 2.

    Left alone, Hydra prints a multi-line report and exits 1. With
    ``HYDRA_FULL_ERROR=1`` it raises instead, so we set it for the call and
    catch. A user who set ``HYDRA_FULL_ERROR=1`` gets Hydra's full traceback.
    """
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as exc:
        if previous == "1":
            raise
        _print_error(describe_error(exc, conf_dir=conf_dir))
        return EXIT_BAD_CONFIG
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return 0


def describe_error(exc: BaseException, *, conf_dir: Path | None = None) -> str:
    """One line naming the setting and what is wrong with it."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return _describe_missing_config(exc, conf_dir)
    cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else None
    if isinstance(exc, HydraException) and cause is not None:
        setting = _override_in(str(exc)) or getattr(cause, "full_key", None)
        return f"{setting}: {_omegaconf_message(cause)}" if setting else _omegaconf_message(cause)
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None)
        message = _omegaconf_message(exc)
        return f"{key}: {message}" if key else message
    return _first_line(str(exc))


def _override_in(message: str) -> str | None:
    """The override a Hydra composition error is about, when its message names it."""
    match = _MERGING_OVERRIDE.search(message) or _APPEND_HINT.search(message)
    return match.group(1) if match else None


def _describe_missing_config(exc: MissingConfigException, conf_dir: Path | None) -> str:
    path = exc.missing_cfg_file or ""
    group, _, name = path.rpartition("/")
    options = _group_options(conf_dir, group) or sorted(exc.options or [])
    if not group:
        return _first_line(str(exc))
    available = ", ".join(options) if options else "none"
    return f"{group}={name}: no config '{path}'; available: {available}"


def _group_options(conf_dir: Path | None, group: str) -> list[str]:
    if conf_dir is None or not group or not (conf_dir / group).is_dir():
        return []
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    # ``msg`` is the bare message; str(exc) appends full_key/object_type lines.
    return _first_line(getattr(exc, "msg", None) or str(exc))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else "invalid configuration"


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
