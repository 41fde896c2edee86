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
the calls to ``scontrol`` and MPI are behind injectable functions. The package
keeps each launcher in its own module (``slurm``, ``mpi``; torchrun's few
variables are read here) over the shared ``values`` (``DistEnv`` and its
checks); nothing outside it reads these variables, and ``init_process_group``
is where they are written back in torchrun's form for DeepSpeed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch
import torch.distributed as dist

from orchestrator.protocol import CONSOLE_FD_VAR, torchrun_vars
from orchestrator.runtime.dist_env.mpi import (
    MPI_LOCAL_VARS,
    agrees_with_slurm,
    discover_mpi,
    mpi_rank_size,
)
from orchestrator.runtime.dist_env.slurm import (
    HostResolver,
    array_task,
    from_slurm,
    is_slurm_step,
    scontrol_first_node_addr,
    slurm_port,
    tasks_per_node,
)
from orchestrator.runtime.dist_env.values import (
    MPI,
    SLURM,
    TORCHRUN,
    DistEnv,
    checked,
    first_set,
    int_var,
    opt_int_var,
)

__all__ = [
    "MPI",
    "SLURM",
    "TORCHRUN",
    "DistEnv",
    "HostResolver",
    "array_task",
    "console_fd",
    "discover_mpi",
    "init_process_group",
    "read_env",
    "scontrol_first_node_addr",
    "slurm_port",
    "started_by",
    "tasks_per_node",
]


def started_by(environ: Mapping[str, str] | None = None) -> str | None:
    """Which launcher started this process: "torchrun", "slurm", "mpi", or None.

    None for a login shell, and also for the batch shell of an sbatch job or
    salloc's shell: they are inside an allocation but not tasks of a job step.
    After ``init_process_group`` it is "torchrun" (it exports those variables).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return TORCHRUN
    mpi = mpi_rank_size(env)
    if is_slurm_step(env):
        # mpiexec inside an allocation starts its per-node daemons with srun: the
        # ranks then see the daemons' step (one task per node), not the MPI job.
        if mpi is not None and not agrees_with_slurm(mpi, env):
            return MPI
        return SLURM
    if mpi is not None or any(k in env for k in MPI_LOCAL_VARS):
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
        return from_slurm(env, resolve_host or scontrol_first_node_addr)
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
    rank, world_size = int_var(env, "RANK"), int_var(env, "WORLD_SIZE")
    # Without the local variables, assume one node (what the old reader did).
    local_rank = first_set(opt_int_var(env, "LOCAL_RANK"), rank)
    local_world_size = first_set(opt_int_var(env, "LOCAL_WORLD_SIZE"), world_size)
    num_nodes_guess = max(1, world_size // max(1, local_world_size))
    return checked(
        DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            local_world_size=local_world_size,
            node_rank=first_set(opt_int_var(env, "GROUP_RANK"), rank // max(1, local_world_size)),
            num_nodes=first_set(opt_int_var(env, "GROUP_WORLD_SIZE"), num_nodes_guess),
            master_addr=env["MASTER_ADDR"],
            master_port=int_var(env, "MASTER_PORT"),
            launcher=TORCHRUN,
        )
    )


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
