"""The run folder: where it is, and the files it starts with (written atomically).

``prepare_run_dir`` is called by rank 0 of a local launch and by the first
step of a SLURM job (``slurm.prepare``); the other ranks wait for its
``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config, config_yaml


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if path.suffix == ".sh":
            os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_run_dir(config: Config) -> Config:
    """``config`` with ``run.dir`` made absolute (default runs/<model>-<parallel>-<timestamp>).

    Creates nothing; ``config`` itself is not changed. A launch applies it once,
    so every file it writes names the same folder.
    """
    given = config.run.dir
    if given is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        given = str(Path(config.run.root) / f"{config.model.name}-{config.parallel.name}-{stamp}")
    run_dir = str(Path(given).resolve())
    if run_dir == config.run.dir:
        return config
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=run_dir))


def run_dir_of(config: Config) -> Path:
    """The run folder of a config ``with_run_dir`` has resolved."""
    if config.run.dir is None or not Path(config.run.dir).is_absolute():
        raise ValueError(f"run.dir={config.run.dir}: not resolved (with_run_dir)")
    return Path(config.run.dir)


def run_dir_files(config: Config, deepspeed_json: dict[str, Any]) -> dict[str, str]:
    """What a run directory starts with: the resolved config and the DeepSpeed JSON.

    ``deepspeed_json``: ``orchestrator.planning.ds_config.deepspeed_config`` of the
    run, built once by the caller (whose check of ``deepspeed.extra`` it is).
    """
    return {
        "config.yaml": config_yaml(config),
        "deepspeed.json": json.dumps(deepspeed_json, indent=2),
    }


def prepare_run_dir(config: Config, deepspeed_json: dict[str, Any]) -> Path:
    """Create the run directory and write the resolved config and DeepSpeed JSON into it."""
    config = with_run_dir(config)
    run_dir = run_dir_of(config)
    files = run_dir_files(config, deepspeed_json)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomic(run_dir / name, text)  # other ranks may be waiting for config.yaml
    return run_dir
