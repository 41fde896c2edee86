"""What every launcher's reader shares: the ``DistEnv`` it returns and the checks of its values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN, SLURM, MPI = "torchrun", "slurm", "mpi"


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


def int_var(env: Mapping[str, str], key: str) -> int:
    """``int(env[key])``, with a one-line error when absent or not an integer."""
    value = opt_int_var(env, key)
    if value is None:
        raise RuntimeError(f"{key} is not set")
    return value


def opt_int_var(env: Mapping[str, str], key: str) -> int | None:
    if key not in env:
        return None
    try:
        return int(env[key])
    except ValueError:
        raise RuntimeError(f"{key}={env[key]!r} is not an integer") from None


def first_set(*values: int | None) -> int:
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def checked(env: DistEnv) -> DistEnv:
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
