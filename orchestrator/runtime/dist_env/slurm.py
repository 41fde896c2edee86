"""SLURM job steps (``srun``): the task's place from ``SLURM_*``, the rendezvous, array tasks.

Part of ``orchestrator.runtime.dist_env``, the only reader of launcher variables.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping

from orchestrator.runtime.dist_env.values import (
    SLURM,
    DistEnv,
    checked,
    first_set,
    int_var,
    opt_int_var,
)

# Step ids SLURM gives to steps that are not srun job steps (slurm.h, 22.05):
# pending 0xfffffffd, extern 0xfffffffc, batch 0xfffffffb, interactive 0xfffffffa.
_SPECIAL_STEP_IDS = {"batch", "extern", "interactive", "pending"}
_FIRST_SPECIAL_STEP_ID = 0xFFFFFFF0

# Given a SLURM node list ("node[01-04]"), the address of its first node.
HostResolver = Callable[[str], str]


def is_slurm_step(env: Mapping[str, str]) -> bool:
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


def from_slurm(env: Mapping[str, str], resolve_host: HostResolver) -> DistEnv:
    rank = int_var(env, "SLURM_PROCID")
    world_size = first_set(
        opt_int_var(env, "SLURM_STEP_NUM_TASKS"), opt_int_var(env, "SLURM_NTASKS"), 0
    )
    if world_size <= 0:
        raise RuntimeError("srun job step without SLURM_STEP_NUM_TASKS or SLURM_NTASKS")
    node_rank = first_set(opt_int_var(env, "SLURM_NODEID"), 0)
    num_nodes = first_set(
        opt_int_var(env, "SLURM_STEP_NUM_NODES"), opt_int_var(env, "SLURM_NNODES"), 1
    )
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = tasks_per_node(per_node)
        if node_rank >= len(counts):
            raise RuntimeError(f"SLURM_NODEID={node_rank} but tasks per node is {per_node!r}")
        local_world_size = counts[node_rank]
    else:
        local_world_size = first_set(
            opt_int_var(env, "SLURM_NTASKS_PER_NODE"), world_size // num_nodes
        )
    master_addr, master_port = _slurm_rendezvous(env, resolve_host)
    return checked(
        DistEnv(
            rank=rank,
            world_size=world_size,
            local_rank=first_set(opt_int_var(env, "SLURM_LOCALID"), 0),
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
        return master_addr, int_var(env, "MASTER_PORT")
    if "SLURM_JOB_ID" in env:
        return master_addr, slurm_port(int_var(env, "SLURM_JOB_ID"))
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
    task_id = opt_int_var(env, "SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return None
    count = int_var(env, "SLURM_ARRAY_TASK_COUNT")
    first = first_set(opt_int_var(env, "SLURM_ARRAY_TASK_MIN"), 0)
    step = first_set(opt_int_var(env, "SLURM_ARRAY_TASK_STEP"), 1)
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
