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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import Config, register_configs, save_config
from orchestrator.data.build import resolve_paths
from orchestrator.engine import deepspeed_config
from orchestrator.launcher import local_capacity, run_local
from orchestrator.plan import Plan, format_plan, validate_config

EXIT_BAD_CONFIG = 2
# How Hydra names the override in its composition errors.
_MERGING_OVERRIDE = re.compile(r"^Error merging override (\S+)", re.MULTILINE)
_APPEND_HINT = re.compile(r"^To append to your config use \+(\S+)", re.MULTILINE)


def to_config(cfg: DictConfig) -> Config:
    """The typed config; library code past the entry point only sees this."""
    _reject_unknown_keys(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]}=???: must be set (add {missing[0]}=... to the command)")
    config = OmegaConf.to_object(cfg)
    if not isinstance(config, Config):
        raise TypeError(f"expected the structured Config schema, got {type(config).__name__}")
    return config


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
    return to_config(cfg)


def main(cfg: DictConfig) -> int:
    """Check one composed config, print its plan, and launch it unless ``dry_run``.

    Returns the process exit code: 2 for a bad setting (nothing started,
    nothing written), otherwise the launcher's.
    """
    try:
        config = to_config(cfg)
        plan = validate_config(config)
        deepspeed_config(config, plan)  # an extra key that conflicts fails here
        if not config.dry_run:
            _check_fits_locally(config, plan)
            resolve_paths(config)  # data files exist; model and tokenizer vocabularies agree
    except (ValueError, OmegaConfBaseException) as exc:
        _print_error(describe_error(exc))
        return EXIT_BAD_CONFIG
    print(format_plan(plan, config))
    if config.dry_run:
        print("dry run: config and layout are valid; nothing launched")
        return 0
    run_dir = prepare_run_dir(config, plan)
    print(f"run directory: {run_dir}", flush=True)
    return run_local(run_dir, plan.world_size)


def _check_fits_locally(config: Config, plan: Plan) -> None:
    capacity, what = local_capacity(config.cluster.max_local_procs)
    if config.train.precision == "fp16" and "GPU" not in what:
        raise ValueError(
            "train.precision=fp16: needs GPUs (loss scaling is a GPU path); use bf16 or fp32 on CPU"
        )
    if plan.world_size > capacity:
        raise ValueError(
            f"launcher=local: the layout needs {plan.world_size} processes "
            f"(tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp})) but {what} allow {capacity}; "
            "use a smaller layout, or dry_run=true to only check it"
        )


def prepare_run_dir(config: Config, plan: Plan) -> Path:
    """Create the run directory and write the resolved config and DeepSpeed JSON into it."""
    if config.run.dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config.run.dir = str(
            Path(config.run.root) / f"{config.model.name}-{config.parallel.name}-{stamp}"
        )
    run_dir = Path(config.run.dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    config.run.dir = str(run_dir)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "deepspeed.json").write_text(json.dumps(deepspeed_config(config, plan), indent=2))
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
