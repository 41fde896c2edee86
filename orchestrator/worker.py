"""One rank of a run: ``python -m orchestrator.worker RUN_DIR``.

Started by a launcher that sets the torchrun-style variables (see
``orchestrator.dist_env``); reads ``RUN_DIR/config.yaml`` and trains.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

# A stop signal (SIGUSR1/SIGTERM: SLURM's time limit, scancel) that arrives in
# the seconds torch and DeepSpeed take to import would kill this rank. Hold it
# until train() installs its handler; StopRequest unblocks it then.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})

from orchestrator.config import load_config  # noqa: E402
from orchestrator.faults import ignore_stop_signals  # noqa: E402
from orchestrator.train import train  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m orchestrator.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    code = train(load_config(run_dir / "config.yaml"), run_dir)
    ignore_stop_signals()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
