"""MPI (``mpiexec`` of MPICH or Open MPI, ``srun --mpi=...``): detection and mpi4py discovery.

Part of ``orchestrator.runtime.dist_env``, the only reader of launcher variables.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from orchestrator.runtime.dist_env.values import MPI, DistEnv, checked, int_var

# (rank, size) variables of the MPI launchers; PMIx gives no size variable.
_MPI_RANK_SIZE = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH hydra, Intel MPI, srun --mpi=pmi2
    ("PMIX_RANK", ""),  # PMIx (Open MPI 5, srun --mpi=pmix)
)
MPI_LOCAL_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def mpi_rank_size(env: Mapping[str, str]) -> tuple[int, int | None] | None:
    for rank_var, size_var in _MPI_RANK_SIZE:
        if rank_var in env:
            size = int_var(env, size_var) if size_var in env else None
            return int_var(env, rank_var), size
    return None


def agrees_with_slurm(mpi: tuple[int, int | None], env: Mapping[str, str]) -> bool:
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
    return discover_with(mpi, environ)


def discover_with(mpi: Any, environ: Mapping[str, str]) -> DistEnv:
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
            rendezvous = pick_rendezvous(environ, single_node=num_nodes == 1)
        except RuntimeError as err:
            rendezvous = str(err)  # every rank raises it, none waits forever
    rendezvous = world.bcast(rendezvous, root=0)
    if isinstance(rendezvous, str):
        raise RuntimeError(f"mpi: rank 0 found no rendezvous: {rendezvous}")
    assert rendezvous is not None
    master_addr, master_port = rendezvous
    return checked(
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


def pick_rendezvous(environ: Mapping[str, str], *, single_node: bool) -> tuple[str, int]:
    """Rank 0's choice: ``MASTER_ADDR``/``MASTER_PORT`` if set, else its address and a free port."""
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    else:
        addr = "127.0.0.1" if single_node else _own_address()
    if "MASTER_PORT" in environ:
        return addr, int_var(environ, "MASTER_PORT")
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
