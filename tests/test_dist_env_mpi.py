"""Workers started by ``mpiexec`` (MPICH from the dev dependencies): discovery through mpi4py.

No ``RANK``/``MASTER_ADDR`` reaches the ranks: rank, size and local rank come
from ``MPI.COMM_WORLD``, and rank 0 broadcasts the rendezvous address and port.
A tp2 run started this way has the same per-step losses as under the local
launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.compose import compose_config
from orchestrator.launch.run_folder import prepare_run_dir
from orchestrator.planning.ds_config import deepspeed_config
from orchestrator.planning.plan import validate_config
from orchestrator.runtime.dist_env import DistEnv
from orchestrator.status.metrics import read_metrics
from tests.launch import REPO, run_launch

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")

LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
OVERRIDES = [
    "model=tiny",
    "data=synthetic",
    "data.num_samples=16",
    "parallel=tp2pp1",
    "train.steps=4",
    "train.log_interval=1",
    "train.lr=3e-3",
    "train.warmup_steps=1",
]


def mpiexec(num_ranks: int, *command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``mpiexec -n num_ranks command`` in its own process group; kill it all on timeout."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    assert MPIEXEC is not None
    proc = subprocess.Popen(
        [MPIEXEC, "-n", str(num_ranks), *command],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        # On success the ranks are gone with mpiexec; on a timeout or error, they go now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, (
        f"mpiexec exited {proc.returncode}\n{stdout[-4000:]}\n{stderr[-4000:]}"
    )
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.timeout(120)
def test_ranks_discover_their_place_and_the_rendezvous(tmp_path: Path) -> None:
    # Each rank writes its own file: mpiexec interleaves the ranks' stdout.
    script = (
        "import dataclasses, json, sys\n"
        "from orchestrator.runtime.dist_env import read_env, started_by\n"
        "env = read_env()\n"
        "with open(f'{sys.argv[1]}/rank_{env.rank}.json', 'w') as f:\n"
        "    json.dump([started_by(), dataclasses.asdict(env)], f)\n"
    )
    mpiexec(2, sys.executable, "-c", script, str(tmp_path), timeout=100)
    found = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert [by for by, _ in found] == ["mpi", "mpi"]
    envs = [DistEnv(**fields) for _, fields in found]
    assert [(e.rank, e.local_rank) for e in envs] == [(0, 0), (1, 1)]
    assert {(e.world_size, e.local_world_size, e.node_rank, e.num_nodes) for e in envs} == {
        (2, 2, 0, 1)
    }
    # One rendezvous for both, chosen by rank 0 and broadcast over MPI.
    assert len({(e.master_addr, e.master_port) for e in envs}) == 1
    assert envs[0].master_addr == "127.0.0.1" and envs[0].launcher == "mpi"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_under_mpiexec_matches_the_local_launcher(tmp_path: Path) -> None:
    run_launch(*OVERRIDES, f"run.dir={tmp_path / 'local'}")
    reference = read_metrics(tmp_path / "local" / "metrics.jsonl")

    config = compose_config([*OVERRIDES, f"run.dir={tmp_path / 'mpi'}"], conf_dir=REPO / "conf")
    run_dir = prepare_run_dir(
        config, deepspeed_config(validate_config(config), config.train, config.deepspeed)
    )
    mpiexec(2, sys.executable, "-m", "orchestrator.runtime.worker", str(run_dir), timeout=500)
    losses = read_metrics(run_dir / "metrics.jsonl")

    assert [m["step"] for m in losses] == [m["step"] for m in reference] == [1, 2, 3, 4]
    for got, want in zip(losses, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (losses, reference)
