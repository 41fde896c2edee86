"""A CPU plan's measured side: what ``orchestrator.planning.perf`` takes from this host.

``cpu_host`` gathers, for one plan, how its ranks share a node's cores and
what ``orchestrator.planning.cpu_probe`` measured (cached) at that thread and process
count: matmul peaks, the optimiser's step per parameter, gloo latencies and
bandwidth. GPU plans have none of it (``None``), and their estimate says the
latency and framework terms are not modelled.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.cluster import ClusterConfig
from orchestrator.planning import cpu_probe
from orchestrator.planning.cpu_probe import CommCosts, RankCpus
from orchestrator.planning.plan_view import PlanView

LOADED_CORES = 1.0  # other processes' load (cores' worth) that earns a warning


@dataclass(frozen=True)
class CpuHost:
    """What this host measured for a CPU plan (``orchestrator.planning.cpu_probe``)."""

    cpus: RankCpus
    rates: dict[str, float]  # fp32/bf16 TFLOP/s at cpus.threads, adamw_s_per_param
    comm: CommCosts | None  # None: one rank, no collectives, or the gloo probe failed
    cache: Path
    comm_error: str | None = None  # why the gloo probe gave no answer
    other_load: float | None = None  # load average before the run starts; None: in a worker


def ranks_per_node(plan: PlanView) -> int:
    return -(-plan.world_size // plan.nodes)


def cpu_host(cluster: ClusterConfig, plan: PlanView) -> CpuHost | None:
    """The measured costs of a CPU plan on this host (cached); None on a GPU cluster."""
    if cluster.gpus_per_node > 0:
        return None
    ranks = ranks_per_node(plan)
    cpus = cluster.rank_cpus(ranks_per_node=ranks)
    rates, path = cpu_probe.measured_peaks(cpus.threads)
    comm, error = None, None
    if plan.world_size > 1:
        try:
            comm, path = cpu_probe.comm_costs(ranks, cpus.threads)
        except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            error = f"the gloo probe failed: {exc}"  # a plan without latencies, not no plan
    # Inside a worker the load average counts this run's own ranks: only the
    # plan made before they start (the command line's) can tell others' load.
    other = None if cpu_probe.launched_ranks_per_node() else os.getloadavg()[0]
    return CpuHost(cpus, rates, comm, path, error, other)


def latencies(host: CpuHost | None) -> tuple[float, float]:
    """(all-reduce over two ranks, send/recv) seconds; zero (not modelled) on GPUs.

    The probe ran as many processes as the run puts on the node: waiting for
    a time-shared peer is in these numbers.
    """
    if host is None or host.comm is None:
        return 0.0, 0.0
    return host.comm.allreduce_s, host.comm.p2p_s


def latency_line(host: CpuHost | None) -> str:
    """The estimate's line on collective latencies (measured, none, or not modelled)."""
    if host is None:
        return "collective latencies: not modelled (bandwidth only); framework time: not modelled"
    if host.comm_error is not None:
        return f"collective latencies and gloo bandwidth: not modelled ({host.comm_error})"
    if host.comm is None:
        return "collective latencies: none (one rank)"
    c = host.comm
    return (
        f"collective latencies (gloo, measured on this host, {host.cpus.describe()}): "
        f"all-reduce {1e3 * c.allreduce_s:.2f} ms, send/recv {1e3 * c.p2p_s:.2f} ms, "
        f"{c.bandwidth_gbs:.2g} GB/s"
    )


def warnings(host: CpuHost | None, precision: str) -> tuple[str, ...]:
    """bf16 slower than fp32 here; other processes already loading the cores."""
    if host is None:
        return ()
    found = []
    if precision == "bf16":
        found.append(cpu_probe.bf16_warning(host.rates))
    if host.other_load is not None and host.other_load >= LOADED_CORES:
        found.append(
            f"warning: this host's load average is {host.other_load:.1f} on "
            f"{host.cpus.cores} cores before the run starts: the plan assumes idle cores; "
            "sharing them with other processes a rank runs slower than planned, one of "
            "several threads several times slower"
        )
    return tuple(line for line in found if line)
