"""Hydra entry point: ``python launch/run.py model=13b parallel=tp8pp4 dry_run=true``.

Composes ``conf/`` with the command-line overrides against the dataclass
schema (strict: unknown keys and wrong types are errors), checks the layout and
prints the plan. Any bad setting ends as one ``error: ...`` line on stderr and
exit code 2. ``--cfg job`` prints the composed config; ``--help`` lists the
config groups.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's packages, whatever is installed elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from orchestrator.config import compose  # noqa: E402
from orchestrator.config.schema import register_configs  # noqa: E402
from orchestrator.launch import cli  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    code = cli.main(cfg)
    if code != 0:
        # SystemExit passes through Hydra, which only catches Exception.
        sys.exit(code)


if __name__ == "__main__":
    sys.exit(compose.run_entry_point(hydra_main, conf_dir=CONF_DIR))
