"""Build a run's data indexes ahead of time: ``python -m orchestrator.data.prepare OVERRIDES``.

Takes the same overrides as ``launch/run.py``, builds (or finds) the
whole-run indexes the run will use (``orchestrator.data.run_index``), and
prints their folder; the run then finds them and starts at once. It runs on
a login node or as a one-task SLURM job (one core is enough)::

    python -m orchestrator.data.prepare model=65b parallel=tp8pp4 cluster=a100_80g \\
        cluster.nodes=256 data=llama_mixture data.root=/data/rp data.tokenizer=tok.model
    sbatch -c 2 --mem=64G --wrap "python -m orchestrator.data.prepare ..."

A bad setting is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def main(argv: Sequence[str] | None = None) -> int:
    from hydra.errors import HydraException

    from orchestrator.config.compose import compose_config, describe_error
    from orchestrator.data.build import prepare_index, resolve_paths
    from orchestrator.planning.plan import validate_config

    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(o in ("-h", "--help") for o in overrides):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        config = compose_config(overrides, conf_dir=_CONF_DIR)
        plan = validate_config(config)
        if config.data.kind != "blended":
            raise ValueError(f"data.kind={config.data.kind}: only blended data has indexes")
        config = resolve_paths(config)
        start = time.perf_counter()
        folder = prepare_index(config, seq_len=plan.seq_len, global_batch=plan.global_batch_size)
    except (ValueError, RuntimeError, OSError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {describe_error(exc, conf_dir=_CONF_DIR)}", file=sys.stderr)
        return 2
    print(f"data index: {folder} ({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
