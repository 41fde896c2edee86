"""The only reader of the launcher's environment variables.

Which launcher started this process, and its place in the job:

* torchrun, or our local launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``GROUP_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``. These win whenever ``RANK`` and ``WORLD_SIZE`` are set.
* a task of a SLURM job step (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, the step's tasks per node and node list.
  The batch shell of an ``sbatch`` job (and ``salloc``'s shell) also carries
  ``SLURM_JOB_ID`` and often ``SLURM_PROCID=0`` but is not a task of a step:
  it has no ``SLURM_STEP_ID``, or the id of the batch/extern/interactive step.
* MPI (``mpiexec`` of MPICH or Open MPI): detected from its variables, then
  rank, size and local rank come from mpi4py, and rank 0 broadcasts the
  rendezvous address when ``MASTER_ADDR`` is unset.

Discovery from a mapping is pure (``started_by``, ``read_env`` with SLURM);
the calls to ``scontrol`` and MPI are behind injectable functions.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.protocol import CONSOLE_FD_VAR, torchrun_vars

TORCHRUN, SLURM, MPI = "torchrun", "slurm", "mpi"

# Step ids SLURM gives to steps that are not srun job steps (slurm.h, 22.05):
# pending 0xfffffffd, extern 0xfffffffc, batch 0xfffffffb, interactive 0xfffffffa.
_SPECIAL_STEP_IDS = {"batch", "extern", "interactive", "pending"}
_FIRST_SPECIAL_STEP_ID = 0xFFFFFFF0

# (rank, size) variables of the MPI launchers; PMIx gives no size variable.
_MPI_RANK_SIZE = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH hydra, Intel MPI, srun --mpi=pmi2
    ("PMIX_RANK", ""),  # PMIx (Open MPI 5, srun --mpi=pmix)
)
_MPI_LOCAL_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, whoever launched it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    launcher: str  # "torchrun", "slurm" or "mpi"


# Given a SLURM node list ("node[01-04]"), the address of its first node.
HostResolver = Callable[[str], str]


def started_by(environ: Mapping[str, str] | None = None) -> str | None:
    """Which launcher started this process: "torchrun", "slurm", "mpi", or None.

    None for a login shell, and also for the batch shell of an sbatch job or
    salloc's shell: they are inside an allocation but not tasks of a job step.
    After ``init_process_group`` it is "torchrun" (it exports those variables).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return TORCHRUN
    mpi = _mpi_rank_size(env)
    if _is_slurm_step(env):
        # mpiexec inside an allocation starts its per-node daemons with srun: the
        # ranks then see the daemons' step (one task per node), not the MPI job.
        if mpi is not None and not _agrees(mpi, env):
            return MPI
        return SLURM
    if mpi is not None or any(k in env for k in _MPI_LOCAL_VARS):
        return MPI
    return None


def read_env(
    environ: Mapping[str, str] | None = None,
    *,
    resolve_host: HostResolver | None = None,
    mpi_discover: Callable[[Mapping[str, str]], DistEnv] | None = None,
) -> DistEnv:
    """This process's place in the job, from the variables of whichever launcher started it.

    ``resolve_host`` (SLURM without ``MASTER_ADDR``) defaults to asking
    ``scontrol``; ``mpi_discover`` defaults to mpi4py (collective: every rank
    must call it).
    """
    env = os.environ if environ is None else environ
    launcher = started_by(env)
    if launcher == TORCHRUN:
        return _from_torchrun(env)
    if launcher == SLURM:
        return _from_slurm(env, resolve_host or scontrol_first_node_addr)
    if launcher == MPI:
        return (mpi_discover or discover_mpi)(env)
    hint = ""
    if "SLURM_JOB_ID" in env:
        hint = " (this is a SLURM allocation but not a job step: start the workers with srun)"
    raise RuntimeError(
        "not started by a launcher: none of RANK+WORLD_SIZE (torchrun), "
        "SLURM_PROCID+SLURM_STEP_ID (srun job step), OMPI_COMM_WORLD_RANK/PMI_RANK/PMIX_RANK "
        f"(mpiexec) is set{hint}"
    )


# -- torchrun -------------------------------------------------------------------------


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not")
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    # Without the local variables, assume one node (what the old reader did).
    local_rank = _or(_opt_int(env, "LOCAL_RANK"), rank)
    local_world_size = _or(_opt_int(env, "LOCAL_WORLD_SIZE"), world_size)
    num_nodes_guess = max(1, world_size // max(1, local_world_size))
    return _checked(
        DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node_rank=_or(_opt_int(env, "GROUP_RANK"), rank // max(1, local_world_size)),
            num_nodes=_or(_opt_int(env, "GROUP_WORLD_SIZE"), num_nodes_guess),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
            launcher=TORCHRUN,
        )
    )


# -- SLURM ----------------------------------------------------------------------------


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    """A task of an srun job step (not the batch, extern or interactive step)."""
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None or "SLURM_PROCID" not in env:
        return False
    if step.strip().lower() in _SPECIAL_STEP_IDS:
        return False
    try:
        step_id = int(step)
    except ValueError:
        return False
    return 0 <= step_id < _FIRST_SPECIAL_STEP_ID


def _from_slurm(env: Mapping[str, str], resolve_host: HostResolver) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    world_size = _or(_opt_int(env, "SLURM_STEP_NUM_TASKS"), _opt_int(env, "SLURM_NTASKS"), 0)
    if world_size <= 0:
        raise RuntimeError("srun job step without SLURM_STEP_NUM_TASKS or SLURM_NTASKS")
    node_rank = _or(_opt_int(env, "SLURM_NODEID"), 0)
    num_nodes = _or(_opt_int(env, "SLURM_STEP_NUM_NODES"), _opt_int(env, "SLURM_NNODES"), 1)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = tasks_per_node(per_node)
        if node_rank >= len(counts):
            raise RuntimeError(f"SLURM_NODEID={node_rank} but tasks per node is {per_node!r}")
        local_world_size = counts[node_rank]
    else:
        local_world_size = _or(_opt_int(env, "SLURM_NTASKS_PER_NODE"), world_size // num_nodes)
    master_addr, master_port = _slurm_rendezvous(env, resolve_host)
    return _checked(
        DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=_or(_opt_int(env, "SLURM_LOCALID"), 0),
            local_world_size=local_world_size,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=master_addr,
            master_port=master_port,
            launcher=SLURM,
        )
    )


def _slurm_rendezvous(env: Mapping[str, str], resolve_host: HostResolver) -> tuple[str, int]:
    """``MASTER_ADDR``/``MASTER_PORT`` if set, else the first node and a port from the job id."""
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise RuntimeError(
                "srun job step without MASTER_ADDR, SLURM_STEP_NODELIST or SLURM_JOB_NODELIST"
            )
        master_addr = resolve_host(nodelist)
    if "MASTER_PORT" in env:
        return master_addr, _int(env, "MASTER_PORT")
    if "SLURM_JOB_ID" in env:
        return master_addr, slurm_port(_int(env, "SLURM_JOB_ID"))
    raise RuntimeError("srun job step without MASTER_PORT or SLURM_JOB_ID")


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a job when ``MASTER_PORT`` is unset: the same on every node."""
    return 20000 + job_id % 20000


def array_task(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """This SLURM array task's ``(index, count)``, index in ``[0, count)``; None outside one.

    The index is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``
    (``--array=1-9:2`` gives 0..4) and the count ``SLURM_ARRAY_TASK_COUNT``. A list
    of ids with gaps (``--array=1,4,5``) gives no dense index and is an error.
    """
    env = os.environ if environ is None else environ
    task_id = _opt_int(env, "SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return None
    count = _int(env, "SLURM_ARRAY_TASK_COUNT")
    first = _or(_opt_int(env, "SLURM_ARRAY_TASK_MIN"), 0)
    step = _or(_opt_int(env, "SLURM_ARRAY_TASK_STEP"), 1)
    index, rest = divmod(task_id - first, max(step, 1))
    if rest or not 0 <= index < count:
        raise RuntimeError(
            f"SLURM_ARRAY_TASK_ID={task_id}: not min({first}) + k * step({step}) "
            f"with k in [0, count({count})); use a range --array=A-B[:S]"
        )
    return index, count


def tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's compressed tasks per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise RuntimeError(f"cannot parse SLURM tasks per node {spec!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def scontrol_first_node_addr(nodelist: str) -> str:
    """NodeAddr of the first node of ``nodelist``, asking scontrol (node names may not resolve)."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} printed no host")
    match = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", hosts[0]))
    return match[1] if match else hosts[0]


def _scontrol(*args: str) -> str:
    try:
        proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"scontrol {' '.join(args)} failed ({err}); set MASTER_ADDR") from err
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"scontrol {' '.join(args)} failed: {detail[0]}; set MASTER_ADDR")
    return proc.stdout


# -- MPI ------------------------------------------------------------------------------


def _mpi_rank_size(env: Mapping[str, str]) -> tuple[int, int | None] | None:
    for rank_var, size_var in _MPI_RANK_SIZE:
        if rank_var in env:
            size = _int(env, size_var) if size_var in env else None
            return _int(env, rank_var), size
    return None


def _agrees(mpi: tuple[int, int | None], env: Mapping[str, str]) -> bool:
    """Whether the MPI rank (and size, when known) is the SLURM task's (``srun --mpi=...``)."""
    rank, size = mpi
    slurm_size = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    if size is not None and slurm_size is not None:
        return str(size) == slurm_size.strip()
    return str(rank) == env["SLURM_PROCID"].strip()


def discover_mpi(environ: Mapping[str, str]) -> DistEnv:
    """Rank, size and local rank from MPI; rank 0 broadcasts the rendezvous unless preset.

    Collective over ``MPI.COMM_WORLD``: every rank must call it.
    """
    try:
        from mpi4py import MPI as mpi  # lazy: only MPI-launched processes need an MPI library
    except ImportError as err:
        raise RuntimeError(f"started by mpiexec but mpi4py cannot load MPI: {err}") from err
    return _discover_with(mpi, environ)


def _discover_with(mpi: Any, environ: Mapping[str, str]) -> DistEnv:
    world = mpi.COMM_WORLD
    rank, world_size = world.Get_rank(), world.Get_size()
    node = world.Split_type(mpi.COMM_TYPE_SHARED, key=rank)
    local_rank, local_world_size = node.Get_rank(), node.Get_size()
    # Node leaders number the nodes; each leader tells its node.
    leaders = world.Split(0 if local_rank == 0 else mpi.UNDEFINED, key=rank)
    leader_view = (leaders.Get_rank(), leaders.Get_size()) if local_rank == 0 else None
    node_rank, num_nodes = node.bcast(leader_view, root=0)
    if local_rank == 0:
        leaders.Free()
    node.Free()
    rendezvous: tuple[str, int] | str | None = None
    if rank == 0:
        try:
            rendezvous = _pick_rendezvous(environ, single_node=num_nodes == 1)
        except RuntimeError as err:
            rendezvous = str(err)  # every rank raises it, none waits forever
    rendezvous = world.bcast(rendezvous, root=0)
    if isinstance(rendezvous, str):
        raise RuntimeError(f"mpi: rank 0 found no rendezvous: {rendezvous}")
    assert rendezvous is not None
    master_addr, master_port = rendezvous
    return _checked(
        DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=master_addr,
            master_port=master_port,
            launcher=MPI,
        )
    )


def _pick_rendezvous(environ: Mapping[str, str], *, single_node: bool) -> tuple[str, int]:
    """Rank 0's choice: ``MASTER_ADDR``/``MASTER_PORT`` if set, else its address and a free port."""
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        addr = "127.0.0.1" if single_node else _own_address()
    if "MASTER_PORT" in environ:
        return addr, _int(environ, "MASTER_PORT")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("" if addr != "127.0.0.1" else addr, 0))
        return addr, int(s.getsockname()[1])


def _own_address() -> str:
    """An address of this host that other nodes can reach (not loopback)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = ""
    if addr and not addr.startswith("127."):
        return addr
    # The source address of the default route; a UDP connect sends nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1, never routed anywhere
            return str(s.getsockname()[0])
        except OSError as err:
            raise RuntimeError(
                f"cannot find a non-loopback address of {socket.gethostname()}; set MASTER_ADDR"
            ) from err


# -- shared ---------------------------------------------------------------------------


def _int(env: Mapping[str, str], key: str) -> int:
    """``int(env[key])``, with a one-line error when absent or not an integer."""
    value = _opt_int(env, key)
    if value is None:
        raise RuntimeError(f"{key} is not set")
    return value


def _opt_int(env: Mapping[str, str], key: str) -> int | None:
    if key not in env:
        return None
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"{key}={env[key]!r} is not an integer") from None


def _or(*values: int | None) -> int:
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def _checked(env: DistEnv) -> DistEnv:
    """Reject values no launcher would give, printing every factor."""
    rules = [
        (
            0 <= env.rank < env.world_size,
            f"rank({env.rank}) not in [0, world_size({env.world_size}))",
        ),
        (
            0 <= env.local_rank < env.local_world_size,
            f"local_rank({env.local_rank}) not in [0, local_world_size({env.local_world_size}))",
        ),
        (
            0 <= env.node_rank < env.num_nodes,
            f"node_rank({env.node_rank}) not in [0, num_nodes({env.num_nodes}))",
        ),
        (0 < env.master_port < 65536, f"master_port({env.master_port}) not in [1, 65535]"),
    ]
    for ok, message in rules:
        if not ok:
            raise RuntimeError(f"{env.launcher}: {message}")
    return env


def init_process_group(env: DistEnv, *, timeout_s: float = 600.0) -> torch.device:
    """Join the job: NCCL with one GPU per rank when CUDA exists, else gloo on CPU.

    Also exports the torchrun-style variables of ``env``: DeepSpeed reads
    ``LOCAL_RANK`` itself, whichever launcher started us.
    """
    os.environ.update(_torchrun_vars(env))
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return device


def _torchrun_vars(env: DistEnv) -> dict[str, str]:
    return torchrun_vars(
        rank=env.rank,
        world_size=env.world_size,
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
        node_rank=env.node_rank,
        num_nodes=env.num_nodes,
        master_addr=env.master_addr,
        master_port=env.master_port,
    )


def console_fd(environ: Mapping[str, str] | None = None) -> int | None:
    """The console pipe's file descriptor, when a local launcher gave this rank one."""
    value = (os.environ if environ is None else environ).get(CONSOLE_FD_VAR, "")
    return int(value) if value.isdigit() else None
