"""One rank of a run: ``python -m orchestrator.worker RUN_DIR``.

Started by a launcher that sets the torchrun-style variables (see
``orchestrator.dist_env``); reads ``RUN_DIR/config.yaml`` and trains.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.train import train


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m orchestrator.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    return train(load_config(run_dir / "config.yaml"), run_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
