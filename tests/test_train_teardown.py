"""A training step that raises leaves the process as it found it.

``train()`` patches ``torch.distributed``'s collectives (``CommWaitClock``,
the straggler signal) and runs a watchdog thread; a step that raises must
undo both and close the metrics sinks, while the exception still reaches the
caller. One rank, in a fresh interpreter (it initialises a process group).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, threading
from pathlib import Path
import torch.distributed as dist
from orchestrator.runtime import train as train_module
from orchestrator.runtime.steppers import DataParallelStepper
from orchestrator.runtime.commwait import COLLECTIVES
from orchestrator.config.compose import compose_config
from orchestrator.planning.plan import validate_config
from orchestrator.launch.run_folder import prepare_run_dir
from orchestrator.planning.ds_config import deepspeed_config

run_dir = Path(sys.argv[1])
cfg = compose_config(
    ["model=tiny", "parallel=tp1pp1", "data=synthetic", "train.steps=4", "checkpoint.interval=0", f"run.dir={run_dir}"],
    conf_dir=Path(sys.argv[2]),
)
prepare_run_dir(cfg, deepspeed_config(validate_config(cfg), cfg.train, cfg.deepspeed))
before = {name: getattr(dist, name, None) for name in COLLECTIVES}
calls = []

def failing_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("the second step fails")
    return original(*args, **kwargs)

original = DataParallelStepper.train_step
DataParallelStepper.train_step = failing_step
try:
    train_module.train(cfg, run_dir)
    raised = None
except RuntimeError as exc:
    raised = str(exc)
after = {name: getattr(dist, name, None) for name in COLLECTIVES}
threading.Event().wait(0.5)
print("RESULT " + json.dumps({
    "raised": raised,
    "steps": len(calls),
    "unpatched": [n for n in COLLECTIVES if after[n] is not before[n]],
    "watchdog_alive": any(t.name == "watchdog" and t.is_alive() for t in threading.enumerate()),
}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(300)
def test_a_raising_step_unpatches_collectives_and_stops_the_watchdog(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(REPO / "conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["raised"] == "the second step fails"
    assert result["steps"] == 2
    assert result["unpatched"] == []
    assert result["watchdog_alive"] is False
