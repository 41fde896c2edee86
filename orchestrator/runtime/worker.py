"""One rank of a run: ``python -m orchestrator.runtime.worker RUN_DIR``.

Started by a launcher that sets the torchrun-style variables (see
``orchestrator.runtime.dist_env``); reads ``RUN_DIR/config.yaml`` and trains.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# A stop signal (SIGUSR1/SIGTERM: SLURM's time limit, scancel) must not kill
# this rank with Python's default action before we look at it: hold it (it
# stays pending, across the tcmalloc re-exec too) until StartupSignals takes it.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})

from orchestrator.config.schema import load_config  # noqa: E402
from orchestrator.planning import cpu_allocator  # noqa: E402
from orchestrator.runtime.startup import StartupSignals  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m orchestrator.runtime.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    config = load_config(run_dir / "config.yaml")
    try:
        env = cpu_allocator.worker_env(config.cluster, os.environ)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if env is not None:  # before torch is imported: start again with tcmalloc preloaded
        os.execve(sys.executable, [sys.executable, "-m", "orchestrator.runtime.worker", *argv], env)
    # From here a stop signal ends the rank at once (requeue), even inside the
    # seconds torch and DeepSpeed take to import, until training begins.
    signals = StartupSignals().start()
    from orchestrator.protocol import ignore_stop_signals
    from orchestrator.runtime.train import train

    code = train(config, run_dir, signals=signals)
    ignore_stop_signals()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
