"""One rank of a run: ``python -m orchestrator.worker RUN_DIR``.

Started by a launcher that sets the torchrun-style variables (see
``orchestrator.dist_env``); reads ``RUN_DIR/config.yaml`` and trains.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# A stop signal (SIGUSR1/SIGTERM: SLURM's time limit, scancel) that arrives in
# the seconds torch and DeepSpeed take to import would kill this rank. Hold it
# until train() installs its handler; StopRequest unblocks it then.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})

from orchestrator import cpu_allocator  # noqa: E402
from orchestrator.config import load_config  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m orchestrator.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    config = load_config(run_dir / "config.yaml")
    try:
        env = cpu_allocator.worker_env(config.cluster, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if env is not None:  # before torch is imported: start again with tcmalloc preloaded
        os.execve(sys.executable, [sys.executable, "-m", "orchestrator.worker", *argv], env)
    # Imported after the re-exec decision: torch and DeepSpeed take seconds.
    from orchestrator.faults import ignore_stop_signals
    from orchestrator.train import train

    code = train(config, run_dir)
    ignore_stop_signals()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
