"""From ``conf/`` and command-line overrides to the typed ``Config``, and one line per error.

Hydra composes ``conf/`` with the overrides; ``to_config`` turns the result
into dataclasses. ``run_entry_point`` wraps the ``@hydra.main`` function so
that every bad setting, Hydra's and OmegaConf's composition errors included,
ends as one ``error: ...`` line on stderr and exit code 2, never a traceback;
``describe_error`` makes that line. Used by ``cli`` (``launch/run.py``), the
job side of ``slurm`` and ``data.prepare``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.pretrained import fill_model_from_checkpoint
from orchestrator.config.schema import Config, register_configs

EXIT_BAD_CONFIG = 2
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


def command_line() -> list[str]:
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
        print_error(describe_error(exc, conf_dir=conf_dir))
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


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
