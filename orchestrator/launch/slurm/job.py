"""The job's first step on the allocation: ``prepare`` creates or reuses RUN_DIR/config.yaml.

Run by the rendered script before ``srun`` starts the ranks
(``python -m orchestrator.launch.slurm prepare RUN_DIR --ntasks N -- [OVERRIDE ...]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from orchestrator.config.compose import compose_config
from orchestrator.config.schema import Config, load_config
from orchestrator.data.build import resolve_paths
from orchestrator.launch.run_folder import prepare_run_dir
from orchestrator.launch.slurm.render import REPO_ROOT
from orchestrator.planning.ds_config import deepspeed_config
from orchestrator.planning.plan import Plan, validate_config, with_layout


def prepare(run_dir: Path, overrides: Sequence[str] = (), *, ntasks: int = 0) -> str:
    """The job's first step: reuse RUN_DIR/config.yaml, or compose and write it.

    ``ntasks``: the job's task count (0: unknown), which must be the layout's
    world size. Returns a line saying what it did; ``ValueError`` for a bad config.
    """
    path = run_dir / "config.yaml"
    if path.exists():
        plan = validate_config(load_config(path))
        _check_ntasks(ntasks, plan)
        return f"reusing {path} (run.resume=auto continues from the latest checkpoint, if any)"
    composed = compose(overrides)
    # run.dir is not an override: Hydra would parse the path
    config = dataclasses.replace(composed, run=dataclasses.replace(composed.run, dir=str(run_dir)))
    plan = validate_config(config)
    config = with_layout(config, plan)
    _check_ntasks(ntasks, plan)
    ds_json = deepspeed_config(plan, config.train, config.deepspeed)  # checks deepspeed.extra
    prepare_run_dir(resolve_paths(config), ds_json)
    return f"wrote {path}"


def compose(overrides: Sequence[str]) -> Config:
    """``conf/`` of this checkout with ``overrides``."""
    return compose_config(overrides, conf_dir=REPO_ROOT / "conf")


def _check_ntasks(ntasks: int, plan: Plan) -> None:
    if ntasks and ntasks != plan.world_size:
        raise ValueError(
            f"the job has {ntasks} tasks (SLURM_NTASKS) but the layout needs world_size"
            f"({plan.world_size}) = tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp}); "
            "submit with the script's --nodes/--ntasks or change the layout"
        )
