"""The plan's performance model: memory per device and time per step of a layout.

Pure arithmetic on the config and the resolved ``Plan``; nothing is allocated.
Notation: b micro-batch size, s sequence length, h = ``dim``, f the SwiGLU
width, t = tp, p = pp, m micro-batches per step, e bytes per activation and
weight element (2 in bf16/fp16, 4 in fp32), Psi' the parameters one device
holds on its stage (``Plan.stage_params_per_rank``).

**Memory per device**: ``orchestrator.planning.memory`` (model state as
DeepSpeed 0.19 allocates it, activations as autograd saves them, logits).

**Time per step**: hardware FLOPs (``orchestrator.planning.flops``) over the peak
in the run's precision (``cluster.peak_for``) x ``compute_efficiency``,
stages assumed balanced; tp all-reduces (4 per layer per micro-batch, 6 with
recomputation, of s·b·h·e bytes, a ring moving 2(t-1)/t of it) over NVLink; the 1F1B bubble (p-1)/m of the busy time,
i.e. (p-1)/(m+p-1) of the pipeline's time; pipeline sends (2 per micro-batch,
s·b·h·e/t bytes) on the critical path, each followed by a tp all-gather of the
rest when DeepSpeed partitions them (tp > 1 without sequence parallelism); the dp gradient reduction
(2(d-1)/d x Psi' elements; fp32 in fp32 and bf16, fp16 in fp16) after the last
micro-batch; at ZeRO-3 instead one reduce-scatter of the gradients and two
all-gathers of the weights (e bytes) per micro-batch, one before its forward and
one before its backward (DeepSpeed releases gathered weights after use).
On a GPU the engine asks DeepSpeed to overlap its ZeRO 1-3 communication
(``overlap_comm``; not inside the pipeline engine, which reduces after the
schedule): the gradients' reduce-scatter runs behind the last micro-batch's
backward (2/3 of its compute) and each ZeRO-3 gather behind its forward (1/3) or
backward (2/3); only what exceeds the compute is counted. Nothing else is
assumed to overlap.

**On a CPU cluster** (``gpus_per_node == 0``) the host's own numbers
(``orchestrator.planning.cpu_probe``, measured once and cached) replace what a GPU
cluster states, unless the config sets them:

- the peak is the matmul probe's at one rank's thread count times the rank's
  share of the cores (ranks on a node share its cores: 4 single-thread ranks
  on 2 cores each run half the time);
- every collective also costs a measured latency: gloo all-reduces of two
  ranks (x (t-1) for a ring of t) for each of the tp all-reduces above plus the
  embedding's or output's and the loss's three per micro-batch, one per
  pipeline send and per partitioned all-gather, two per dp reduction; the
  probe runs as many processes as the run puts on the node, so waiting for a
  time-shared peer is in it; ``intra_node_bandwidth_gbs: null`` takes its
  measured bandwidth;
- per step, the framework's optimiser step: the probe's fp32 AdamW seconds
  per parameter x the stage's parameters, over the rank's share.

On a GPU cluster collective latencies and framework time are not modelled
(the plan says so). Not modelled anywhere: other processes' load on the same
cores, the slowdown of a multi-threaded rank whose threads are descheduled,
DeepSpeed's bf16 bookkeeping (fp32 gradient copies), data loading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.config.cluster import ClusterConfig
from orchestrator.config.model import ModelConfig
from orchestrator.planning import cpu_costs
from orchestrator.planning.cpu_costs import CpuHost, ranks_per_node
from orchestrator.planning.flops import hardware_flops_per_token, model_flops_per_token
from orchestrator.planning.memory import GIB, StageMemory, stage_memory
from orchestrator.planning.plan_view import PlanView


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimiser step, by cause (nothing overlaps)."""

    compute: float
    tp_comm: float
    bubble: float
    pp_comm: float
    dp_comm: float
    framework: float | None = None  # per-step framework time (CPU, measured); None: not modelled

    @property
    def total(self) -> float:
        busy = self.compute + self.tp_comm + self.bubble + self.pp_comm + self.dp_comm
        return busy + (self.framework or 0.0)


@dataclass(frozen=True)
class Estimate:
    """The plan's estimate: memory per stage, time per step, throughput, verdict."""

    stages: tuple[StageMemory, ...]
    time: StepTime
    tokens_per_s_per_device: float
    mfu: float
    device_memory: float  # bytes
    peak_tflops: float  # the device's dense peak in the run's precision
    peak_source: str = ""  # "from cluster.peak_tflops", "measured on this host (...)"
    host: CpuHost | None = None  # a CPU plan's measured costs
    warnings: tuple[str, ...] = ()  # e.g. bf16 emulated on this CPU

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.device_memory


def estimate(plan: PlanView, model: ModelConfig, cluster: ClusterConfig) -> Estimate:
    """Memory per stage and time per step of ``plan`` for ``model`` on ``cluster``."""
    stages = tuple(stage_memory(plan, model, cluster, stage) for stage in range(plan.pp))
    host = cpu_costs.cpu_host(cluster, plan)
    time = step_time(plan, model, cluster, host=host)
    tokens = plan.global_batch_size * plan.seq_len / time.total / plan.world_size
    args = model.to_args()
    precision = plan.precision.name
    peak, source = cluster.peak_source(precision, ranks_per_node=ranks_per_node(plan))
    mfu = tokens * model_flops_per_token(args, plan.seq_len) / (peak * 1e12)
    memory = cluster.device_memory_gb * GIB
    warnings = cpu_costs.warnings(host, precision)
    return Estimate(stages, time, tokens, mfu, memory, peak, source, host, warnings)


def _bandwidth(cluster: ClusterConfig, *, crosses_nodes: bool, host: CpuHost | None) -> float:
    if crosses_nodes:
        return cluster.inter_node_bandwidth_gbs * 1e9
    if cluster.intra_node_bandwidth_gbs is not None:
        return cluster.intra_node_bandwidth_gbs * 1e9
    if host is None or host.comm is None:  # one CPU rank (GPU clusters state the bandwidth)
        return math.inf
    return host.comm.bandwidth_gbs * 1e9


def step_time(
    plan: PlanView, model: ModelConfig, cluster: ClusterConfig, *, host: CpuHost | None = None
) -> StepTime:
    """Seconds per optimiser step (module docstring); ``host``: a CPU plan's measured costs."""
    args = model.to_args()
    e = plan.precision.weight_bytes
    recompute = plan.activation_checkpointing
    tokens = plan.global_batch_size * plan.seq_len
    flops = hardware_flops_per_token(args, plan.seq_len, recompute=recompute) * tokens
    peak = cluster.peak_for(plan.precision.name, ranks_per_node=ranks_per_node(plan)) * 1e12
    compute = flops / plan.world_size / (peak * cluster.compute_efficiency)
    m, p, t, d = plan.num_micro_batches, plan.pp, plan.tp, plan.dp
    allreduce_s, p2p_s = cpu_costs.latencies(host)
    micro_bytes = plan.micro_batch_size * plan.seq_len * args.dim * e  # one (b, s, h) tensor
    layers_per_stage = args.n_layers / p
    all_reduces = (6 if recompute else 4) * layers_per_stage * m
    nvlink = _bandwidth(cluster, crosses_nodes=False, host=host)
    tp_comm = all_reduces * micro_bytes * 2 * (t - 1) / t / nvlink
    if t > 1:  # + the embedding's or the output's, and the loss's three (last stage)
        tp_comm += (all_reduces + (4 if p > 1 else 5) * m) * allreduce_s * (t - 1)
    bubble = (compute + tp_comm) * (p - 1) / m
    gpus = cluster.gpus_per_node
    pipeline_spans_nodes = gpus > 0 and plan.world_size > gpus
    pp_bw = _bandwidth(cluster, crosses_nodes=pipeline_spans_nodes, host=host)
    transfers = 2 * (m + p - 1) if p > 1 else 0
    pp_comm = transfers * (micro_bytes / t / pp_bw + p2p_s)
    if t > 1 and not plan.sequence_parallel:  # DeepSpeed's pipe_partitioned
        pp_comm += transfers * (micro_bytes * (t - 1) / t / nvlink + allreduce_s * (t - 1))
    stage_params = max(plan.stage_params_per_rank)
    dp_bw = _bandwidth(cluster, crosses_nodes=gpus > 0 and t * d > gpus, host=host)
    # engine.py's overlap_comm: on a GPU, ZeRO 1-3 outside the pipeline engine
    overlap = gpus > 0 and plan.zero_stage > 0 and p == 1
    dp_comm = _dp_comm(plan, stage_params / dp_bw, allreduce_s, compute / m, overlap)
    framework = None
    if host is not None:  # the optimiser's step on this rank's parameters, its share of the cores
        framework = host.rates["adamw_s_per_param"] * stage_params / host.cpus.share
    return StepTime(compute, tp_comm, bubble, pp_comm, dp_comm, framework)


def _dp_comm(
    plan: PlanView,
    seconds_per_element: float,
    latency_s: float,
    micro_s: float,
    overlap: bool,
) -> float:
    """Seconds of data-parallel communication on the critical path (module docstring).

    One ring pass moves (d-1)/d of the stage's parameters. ZeRO 0-2: two passes of
    gradients (an all-reduce; at 1/2 a reduce-scatter and the all-gather of the
    updated weights). ZeRO-3: a reduce-scatter of gradients, and an all-gather of
    the weights (in their own precision) before each micro-batch's forward and
    again before its backward. With ``overlap``, a gather runs behind its
    micro-batch's forward (1/3 of its compute ``micro_s``) or backward (2/3), and
    the gradients' reduce-scatter behind the last backward.
    """
    d, m = plan.dp, plan.num_micro_batches
    if d == 1:
        return 0.0
    grad_e = plan.precision.reduce_bytes  # bf16 reduces in fp32
    ring = (d - 1) / d * seconds_per_element
    latency = latency_s * (d - 1)
    reduce = ring * grad_e + latency
    forward, backward = micro_s / 3, 2 * micro_s / 3
    if plan.zero_stage < 3:
        return (max(0.0, reduce - backward) if overlap else reduce) + reduce
    gather = ring * plan.precision.weight_bytes + latency
    if not overlap:
        return 2 * m * gather + reduce
    hidden = m * max(0.0, gather - forward) + (m - 1) * max(0.0, gather - backward)
    return hidden + max(0.0, gather + reduce - backward)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def format_estimate(est: Estimate, cluster: ClusterConfig) -> list[str]:
    """The estimate as ``key: value`` lines for ``format_plan``."""
    peak = est.peak
    items = ", ".join(f"{name} {_gib(value)}" for name, value in peak.items())
    t = est.time
    verdict = "fits" if est.fits else "does NOT fit"
    lines = [
        f"memory per device (stage {peak.stage}, the fullest): {_gib(peak.total)} = {items}",
    ]
    if len(est.stages) > 1:
        lines.append("memory per stage: " + ", ".join(_gib(s.total) for s in est.stages))
    framework = "not modelled" if t.framework is None else f"{t.framework:.3f}"
    lines += [
        f"memory verdict: {verdict} in {_gib(est.device_memory)} ({cluster.device}); "
        f"largest item: {peak.largest}",
        f"step time: {t.total:.3f} s = compute {t.compute:.3f} + tp comm {t.tp_comm:.3f} "
        f"+ bubble {t.bubble:.3f} + pp comm {t.pp_comm:.3f} + dp comm {t.dp_comm:.3f} "
        f"+ framework {framework} "
        f"(efficiency {cluster.compute_efficiency} of {est.peak_tflops:.3g} TFLOP/s)",
        f"peak: {est.peak_tflops:.3g} TFLOP/s per device, {est.peak_source}",
        cpu_costs.latency_line(est.host),
        f"throughput: {est.tokens_per_s_per_device:,.1f} tokens/s per device, "
        f"MFU {100 * est.mfu:.1f}%",
        *est.warnings,
    ]
    return lines
