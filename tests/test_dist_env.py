"""Launcher discovery from plain mappings: torchrun, SLURM job steps, MPI, and none."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.launch.launcher import child_env
from orchestrator.runtime.dist_env import (
    DistEnv,
    read_env,
    scontrol_first_node_addr,
    slurm_port,
    started_by,
    tasks_per_node,
)
from orchestrator.runtime.dist_env.mpi import discover_with, pick_rendezvous
from tests.launch import REPO
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 (fixture)

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}

# Task 3 of `srun -N2 --ntasks-per-node=2` inside job 1234 (the variables srun
# sets, plus the allocation's that the batch shell passes on).
SLURM_STEP = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOBID": "1234",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}

# The batch shell of the same job: an allocation, but not a task of a step.
SLURM_BATCH = {
    "SLURM_JOB_ID": "1234",
    "SLURM_JOBID": "1234",
    "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_NODELIST": "node[1-2]",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def no_scontrol(nodelist: str) -> str:
    raise AssertionError(f"scontrol asked for {nodelist}")


# -- started_by --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"HOME": "/root", "PATH": "/usr/bin"}, None),
        (TORCHRUN, "torchrun"),
        (SLURM_STEP, "slurm"),
        (SLURM_BATCH, None),
        ({**SLURM_BATCH, "SLURM_STEP_ID": "4294967291"}, None),  # the batch step, if shown
        ({**SLURM_BATCH, "SLURM_STEP_ID": "batch"}, None),
        ({**SLURM_BATCH, "SLURM_STEP_ID": "4294967292"}, None),  # extern
        ({**SLURM_BATCH, "SLURM_STEP_ID": "4294967290"}, None),  # salloc's interactive step
        ({**SLURM_BATCH, "SLURM_STEP_ID": "-5"}, None),
        ({"SLURM_STEP_ID": "0"}, None),  # no SLURM_PROCID: not a task
        ({**SLURM_STEP, **TORCHRUN}, "torchrun"),  # torchrun (or our launcher) inside srun
        ({**SLURM_BATCH, "RANK": "0", "WORLD_SIZE": "2"}, "torchrun"),
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
        ({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}, "mpi"),
        ({"PMIX_RANK": "0"}, "mpi"),
        ({"MPI_LOCALRANKID": "0"}, "mpi"),
        ({**SLURM_BATCH, "PMI_RANK": "1", "PMI_SIZE": "2"}, "mpi"),  # mpiexec in the batch shell
        # srun --mpi=pmi2 / pmix: the SLURM variables describe the same job.
        ({**SLURM_STEP, "PMI_RANK": "3", "PMI_SIZE": "4"}, "slurm"),
        ({**SLURM_STEP, "PMIX_RANK": "3"}, "slurm"),
        # mpiexec inside an allocation: hydra/ORTE daemons run as a one-task-per-node
        # step; the ranks inherit that step's variables, which do not describe them.
        ({**SLURM_STEP, "PMI_RANK": "3", "PMI_SIZE": "8"}, "mpi"),
        ({**SLURM_STEP, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8"}, "mpi"),
        ({**TORCHRUN, "OMPI_COMM_WORLD_RANK": "0"}, "torchrun"),
    ],
)
def test_started_by(environ: Mapping[str, str], expected: str | None) -> None:
    assert started_by(environ) == expected


def test_started_by_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ["RANK", "WORLD_SIZE", "SLURM_STEP_ID", "SLURM_PROCID", "PMI_RANK"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert started_by() == "torchrun"


# -- torchrun -----------------------------------------------------------------------------


def test_torchrun() -> None:
    assert read_env(TORCHRUN) == DistEnv(
        rank=5,
        world_size=8,
        local_rank=1,
        master_addr="10.0.0.1",
        master_port=29500,
        local_world_size=4,
        node_rank=1,
        num_nodes=2,
        launcher="torchrun",
    )


def test_torchrun_minimal_is_one_node() -> None:
    env = read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == (1, 2, 0, 1)


def test_local_launcher_round_trip() -> None:
    base = {"PATH": "/usr/bin", "RANK": "stale"}
    envs = [read_env(child_env(base, rank=r, world_size=3, port=4242)) for r in range(3)]
    assert [e.rank for e in envs] == [0, 1, 2]
    assert all(e.world_size == 3 and e.local_world_size == 3 and e.num_nodes == 1 for e in envs)
    assert {(e.master_addr, e.master_port, e.launcher) for e in envs} == {
        ("127.0.0.1", 4242, "torchrun")
    }
    assert child_env(base, rank=0, world_size=1, port=1)["PATH"] == "/usr/bin"


# -- SLURM --------------------------------------------------------------------------------


def test_slurm_step_with_master_exported() -> None:
    environ = {**SLURM_STEP, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}
    assert read_env(environ, resolve_host=no_scontrol) == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        master_addr="10.1.2.3",
        master_port=29400,
        local_world_size=2,
        node_rank=1,
        num_nodes=2,
        launcher="slurm",
    )


def test_slurm_step_resolves_first_node_and_derives_port() -> None:
    asked: list[str] = []

    def resolve(nodelist: str) -> str:
        asked.append(nodelist)
        return "192.168.7.1"

    env = read_env(SLURM_STEP, resolve_host=resolve)
    assert asked == ["node[1-2]"]
    assert (env.master_addr, env.master_port) == ("192.168.7.1", slurm_port(1234))
    assert slurm_port(1234) == 21234 and slurm_port(20000) == 20000
    # Every task of the step agrees on the rendezvous without talking.
    other = {**SLURM_STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    assert read_env(other, resolve_host=resolve).master_port == env.master_port


def test_slurm_uneven_tasks_per_node() -> None:
    environ = {
        **SLURM_STEP,
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_STEP_NUM_NODES": "3",
        "SLURM_STEP_TASKS_PER_NODE": "3(x2),1",
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "2",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "1",
    }
    env = read_env(environ)
    assert (env.world_size, env.local_world_size, env.node_rank, env.num_nodes) == (7, 1, 2, 3)


def test_slurm_step_variables_win_over_the_allocation() -> None:
    # srun -n1 inside a 4-task allocation: a one-task step.
    environ = {
        **SLURM_STEP,
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1",
        "SLURM_STEP_NODELIST": "node2",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    env = read_env(environ, resolve_host=lambda nodelist: f"addr-of-{nodelist}")
    assert (env.world_size, env.local_world_size, env.num_nodes) == (1, 1, 1)
    assert env.master_addr == "addr-of-node2"


def test_slurm_without_step_variables_uses_the_ntasks_ones() -> None:
    environ = {
        "SLURM_STEP_ID": "2",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "7",
        "MASTER_ADDR": "h",
    }
    env = read_env(environ)
    assert (env.rank, env.world_size, env.local_world_size, env.num_nodes) == (1, 2, 2, 1)
    assert env.master_port == 20007


@pytest.mark.parametrize(
    ("spec", "counts"),
    [("1", [1]), ("4(x2)", [4, 4]), ("2(x3),1", [2, 2, 2, 1]), ("1,2,3", [1, 2, 3])],
)
def test_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert tasks_per_node(spec) == counts


def test_scontrol_first_node_addr(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, ...]] = []
    outputs = {
        ("show", "hostnames", "n[3-4]"): "n3\nn4\n",
        ("show", "node", "n3"): "NodeName=n3 Arch=x86_64\n   NodeAddr=10.9.0.3 NodeHostName=n3\n",
    }

    def fake(*args: str) -> str:
        calls.append(args)
        return outputs[args]

    monkeypatch.setattr("orchestrator.runtime.dist_env.slurm._scontrol", fake)
    assert scontrol_first_node_addr("n[3-4]") == "10.9.0.3"
    assert calls == list(outputs)


def test_scontrol_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match=r"scontrol show hostnames .* set MASTER_ADDR"):
        read_env(SLURM_STEP)


# -- errors -------------------------------------------------------------------------------


def test_no_launcher() -> None:
    with pytest.raises(RuntimeError, match="not started by a launcher: .*RANK.*SLURM_PROCID"):
        read_env({"HOME": "/root"})


def test_sbatch_shell_is_told_to_use_srun() -> None:
    with pytest.raises(RuntimeError, match="SLURM allocation but not a job step.*srun"):
        read_env(SLURM_BATCH)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not"),
        ({**TORCHRUN, "RANK": "x"}, "RANK='x' is not an integer"),
        ({**TORCHRUN, "RANK": "8"}, r"rank\(8\) not in \[0, world_size\(8\)\)"),
        ({**TORCHRUN, "LOCAL_RANK": "4"}, r"local_rank\(4\) not in \[0, local_world_size\(4\)\)"),
        ({**TORCHRUN, "MASTER_PORT": "0"}, r"master_port\(0\)"),
        ({**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "2"}, "SLURM_NODEID=1 but tasks per node"),
        ({**SLURM_STEP, "SLURM_STEP_TASKS_PER_NODE": "two"}, "cannot parse SLURM tasks per node"),
    ],
)
def test_bad_values_are_one_clear_line(environ: Mapping[str, str], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        read_env(environ, resolve_host=lambda nodelist: "h")


def test_slurm_step_without_a_rendezvous() -> None:
    environ = {k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k}
    with pytest.raises(RuntimeError, match="without MASTER_ADDR, SLURM_STEP_NODELIST"):
        read_env(environ)


# -- MPI (discovery logic with a fake communicator; tests/test_dist_env_mpi.py runs the real one) ----


class FakeComm:
    """Just enough of an mpi4py communicator for one rank of a simulated job."""

    def __init__(self, rank: int, size: int, bcast_from_root: Any = None) -> None:
        self.rank, self.size, self.root_value = rank, size, bcast_from_root

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def bcast(self, value: Any, root: int = 0) -> Any:
        return value if self.rank == root else self.root_value

    def Free(self) -> None:  # noqa: N802
        pass


def fake_mpi(rank: int, hosts: list[int], rendezvous: Any) -> SimpleNamespace:
    """Ranks placed on nodes ``hosts[rank]``; COMM_WORLD broadcasts ``rendezvous``."""
    node = hosts[rank]
    node_ranks = [r for r, h in enumerate(hosts) if h == node]
    leaders = sorted(set(hosts))
    node_rank = leaders.index(node)
    local_rank = node_ranks.index(rank)

    class World(FakeComm):
        def Split_type(self, split_type: int, key: int = 0) -> FakeComm:  # noqa: N802
            assert split_type == "shared"
            return FakeComm(local_rank, len(node_ranks), (node_rank, len(leaders)))

        def Split(self, color: int, key: int = 0) -> FakeComm | None:  # noqa: N802
            return FakeComm(node_rank, len(leaders)) if color == 0 else None

    world = World(rank, len(hosts), rendezvous)
    return SimpleNamespace(COMM_WORLD=world, COMM_TYPE_SHARED="shared", UNDEFINED=-32766)


def test_mpi_discovery_two_nodes() -> None:
    hosts = [0, 0, 0, 1, 1, 1]
    envs = [discover_with(fake_mpi(r, hosts, ("10.0.0.9", 1234)), {}) for r in range(1, 6)]
    assert [(e.rank, e.local_rank, e.node_rank) for e in envs] == [
        (1, 1, 0),
        (2, 2, 0),
        (3, 0, 1),
        (4, 1, 1),
        (5, 2, 1),
    ]
    assert all(e.world_size == 6 and e.local_world_size == 3 and e.num_nodes == 2 for e in envs)
    assert {(e.master_addr, e.master_port, e.launcher) for e in envs} == {("10.0.0.9", 1234, "mpi")}


def test_mpi_rank0_picks_the_rendezvous() -> None:
    env = discover_with(fake_mpi(0, [0, 0], ("unused", 1)), {"MASTER_PORT": "2345"})
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 2345)
    assert pick_rendezvous({"MASTER_ADDR": "h", "MASTER_PORT": "9"}, single_node=False) == (
        "h",
        9,
    )
    try:
        addr, port = pick_rendezvous({}, single_node=False)
    except RuntimeError as err:  # a host with no network at all
        assert "set MASTER_ADDR" in str(err)
    else:
        assert not addr.startswith("127.") and 0 < port < 65536


def test_mpi_rank0_error_reaches_every_rank() -> None:
    # Rank 0 fails to pick the rendezvous; the others get its message instead of hanging.
    mpi = fake_mpi(1, [0, 1], "cannot find a non-loopback address of h; set MASTER_ADDR")
    with pytest.raises(RuntimeError, match="rank 0 found no rendezvous: cannot find"):
        discover_with(mpi, {})
    with pytest.raises(RuntimeError, match="rank 0 found no rendezvous: MASTER_PORT='x'"):
        discover_with(fake_mpi(0, [0, 0], None), {"MASTER_PORT": "x"})


def test_mpi_without_an_mpi_library_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_mpi4py(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("mpi4py"):
            raise ImportError("libmpi.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpi4py)
    with pytest.raises(RuntimeError, match="started by mpiexec but mpi4py cannot load MPI"):
        read_env({"PMI_RANK": "0", "PMI_SIZE": "1"})


def test_mpi_discovery_is_injectable() -> None:
    seen: list[Mapping[str, str]] = []

    def discover(environ: Mapping[str, str]) -> DistEnv:
        seen.append(environ)
        return read_env(TORCHRUN)

    environ = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    assert read_env(environ, mpi_discover=discover).rank == 5
    assert seen == [environ]


# -- habit 10: nobody else reads these variables ------------------------------------------

LAUNCHER_VARS = {
    *("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"),
    *("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_STEP_ID"),
    *("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_ARRAY_TASK_ID"),
    *("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    *("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID"),
}
# Where a launcher variable's name may appear outside dist_env, and why.
NAMED_ELSEWHERE = {
    "orchestrator/protocol.py": "torchrun_vars writes them (the local launcher, dist_env's export)",
}


def _launcher_var_names(path: Path) -> set[str]:
    """The launcher variables ``path`` names as a whole string constant (how code reads one)."""
    import ast

    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in LAUNCHER_VARS
    }


def test_only_dist_env_reads_launcher_variables() -> None:
    """STYLE habit 10: one reader of RANK, SLURM_PROCID, OMPI_COMM_WORLD_*, PMI_RANK, ..."""
    readers = {}
    for package in ("orchestrator", "model_parallel", "launch"):
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("orchestrator/runtime/dist_env/") or rel in NAMED_ELSEWHERE:
                continue
            names = _launcher_var_names(path)
            if names:
                readers[rel] = sorted(names)
    assert readers == {}, f"launcher variables read outside dist_env: {readers}"
    assert _launcher_var_names(REPO / "orchestrator/runtime/dist_env/slurm.py")  # the scan sees


# -- the same against a real SLURM (tests/slurm_cluster.py: two emulated nodes) -----------

REPORT = (
    "import dataclasses, json, os, sys\n"
    "from orchestrator.runtime.dist_env import read_env, started_by\n"
    "try:\n"
    "    found = dataclasses.asdict(read_env())\n"
    "except RuntimeError as err:\n"
    "    found = str(err)\n"
    "name = f\"{sys.argv[1]}-{os.environ.get('SLURM_PROCID')}-{os.environ.get('PMI_RANK')}\"\n"
    "with open(os.path.join(sys.argv[2], name), 'w') as f:\n"
    "    json.dump([started_by(), found], f)\n"
)


@pytest.mark.timeout(180)
def test_real_slurm_batch_shell_steps_and_mpiexec(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Batch shell: no launcher. srun tasks: SLURM, rendezvous from scontrol and the job id.

    mpiexec in the batch shell starts its per-node proxies as a one-task-per-node
    srun step; its ranks inherit that step's variables and must still be "mpi".
    """
    (tmp_path / "report.py").write_text(REPORT)
    out = tmp_path / "out"
    out.mkdir()
    report = f"python3 {tmp_path / 'report.py'}"
    mpi = f"mpiexec -n 4 {report} mpiexec {out}" if shutil.which("mpiexec") else ""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH -N2 --ntasks-per-node=2 -c1\n"
        f"#SBATCH -o {tmp_path / 'job.out'}\n"
        f"export PYTHONPATH={REPO} OMP_NUM_THREADS=1\n"
        "unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE\n"
        f"{report} batch {out}\n"
        f"srun {report} step {out}\n"
        f"{mpi}\n"
    )
    job_id = slurm_cluster.submit(script)
    result = slurm_cluster.wait_job(job_id, timeout_s=150)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert result.state == "COMPLETED", log
    reports = {f.name: json.loads(f.read_text()) for f in out.iterdir()}

    by, error = reports.pop("batch-0-None")
    assert by is None and "SLURM allocation but not a job step" in error

    steps = [DistEnv(**reports.pop(f"step-{r}-None")[1]) for r in range(4)]
    assert [(e.rank, e.local_rank, e.node_rank) for e in steps] == [
        (0, 0, 0),
        (1, 1, 0),
        (2, 0, 1),
        (3, 1, 1),
    ]
    rendezvous = (slurm_cluster.node_addr("n1"), slurm_port(job_id))
    assert {(e.world_size, e.local_world_size, e.num_nodes, e.launcher) for e in steps} == {
        (4, 2, 2, "slurm")
    }
    assert {(e.master_addr, e.master_port) for e in steps} == {rendezvous}

    if mpi:
        ranks = [reports.pop(name) for name in sorted(reports) if name.startswith("mpiexec-")]
        assert [by for by, _ in ranks] == ["mpi"] * 4, ranks
        envs = sorted((DistEnv(**found) for _, found in ranks), key=lambda e: e.rank)
        assert [(e.rank, e.local_rank, e.node_rank) for e in envs] == [
            (0, 0, 0),
            (1, 1, 0),
            (2, 0, 1),
            (3, 1, 1),
        ]
        assert {(e.world_size, e.local_world_size, e.num_nodes) for e in envs} == {(4, 2, 2)}
        assert len({(e.master_addr, e.master_port) for e in envs}) == 1
    assert not reports
