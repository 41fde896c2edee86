"""Where a run goes: the cluster (``conf/cluster/*.yaml``) and SLURM submission sections
of the config schema (``orchestrator.config.schema``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from omegaconf import MISSING

from orchestrator.config.rules import (
    CPU_ALLOCATORS,
    ENV_NAME,
    SCHEDULERS,
    SLURM_NAME_LIST,
    SLURM_TIME,
    fail,
    has_control,
    non_negative,
    one_of,
    positive,
    positive_float,
    slurm_name,
)

if TYPE_CHECKING:
    from orchestrator.planning.cpu_probe import RankCpus


@dataclass
class ClusterConfig:
    """Where a run goes. ``gpus_per_node == 0`` means CPU worker processes."""

    name: str = MISSING
    nodes: int | None = None  # None: as many nodes as the layout needs
    gpus_per_node: int = MISSING
    device: str = MISSING
    device_memory_gb: float = MISSING
    # bf16 dense peak per device. null (CPU clusters only): measured on each host
    # (orchestrator.planning.cpu_probe), in each precision, for one rank's share of the node.
    peak_tflops: float | None = MISSING
    # fp32 dense peak per device (no TF32), what train.precision=fp32 runs' MFU and
    # step time are measured against; None: peak_tflops (measured when that is null).
    peak_tflops_fp32: float | None = None
    # "slurm": launcher=auto submits a layout that does not fit on this machine
    # with sbatch; "none": this machine only.
    scheduler: str = "none"
    partition: str | None = None
    partition_required: bool = False  # launcher=slurm refuses to submit without a partition
    account: str | None = None
    time_limit: str = "04:00:00"
    cpus_per_task: int = 1
    # CPU clusters under SLURM (gpus_per_node == 0): ranks per node. None: all on one
    # node. GPU clusters run one rank per GPU.
    tasks_per_node: int | None = None
    exclusive: bool = False
    nccl_env: dict[str, str] = field(default_factory=dict)
    # The most worker processes launcher=local starts on one CPU machine (on a
    # GPU machine the limit is the number of GPUs).
    max_local_procs: int = 8
    # CPU worker processes' malloc (orchestrator.planning.cpu_allocator): "auto" preloads
    # tcmalloc when the node has it, "tcmalloc" requires it, "system" is glibc's.
    cpu_allocator: str = "auto"
    # The plan's performance model (orchestrator.planning.perf). Defaults are an A100 SXM
    # cluster's. compute_efficiency: the fraction of peak_tflops that a
    # transformer layer's matmuls sustain, one fixed number per device type (0.6
    # for A100, not tuned per case: with it the model reproduces LLaMA-65B's and
    # Megatron-LM 2022's published throughput within 15%, tests/test_perf.py). Bandwidths are what one device reaches in a ring
    # collective, in GB/s: NVLink inside a node (A100: 600 GB/s total, 300 per
    # direction), the network between nodes (A100 clusters: one 200 Gb/s HDR
    # InfiniBand link per GPU = 25 GB/s).
    compute_efficiency: float = 0.6
    # null (CPU clusters only): gloo's measured on this host (orchestrator.planning.cpu_probe).
    intra_node_bandwidth_gbs: float | None = 300.0
    inter_node_bandwidth_gbs: float = 25.0
    # Framework allowance per device: CUDA context, NCCL and DeepSpeed buffers,
    # allocator fragmentation (not counted item by item).
    memory_overhead_gb: float = 3.0

    def peak_for(self, precision: str, *, ranks_per_node: int | None = None) -> float:
        """The dense peak (TFLOP/s per device) of ``precision``'s matmuls.

        A CPU cluster with ``peak_tflops`` null measures it (``peak_source``).
        """
        return self.peak_source(precision, ranks_per_node=ranks_per_node)[0]

    def peak_source(
        self, precision: str, *, ranks_per_node: int | None = None
    ) -> tuple[float, str]:
        """(TFLOP/s per device, where it came from) for ``precision``.

        Configured: ``peak_tflops_fp32`` (fp32) or ``peak_tflops``. Measured:
        this host's matmul peak at one rank's thread count times its share of
        the cores, with ``ranks_per_node`` ranks (None: the launcher's count in a
        worker, else 1).
        """
        if precision == "fp32" and self.peak_tflops_fp32 is not None:
            return self.peak_tflops_fp32, "from cluster.peak_tflops_fp32"
        if self.peak_tflops is not None:
            return self.peak_tflops, "from cluster.peak_tflops"
        from orchestrator.planning import cpu_probe  # torch, only when measuring

        cpus = self.rank_cpus(ranks_per_node=ranks_per_node)
        peaks, path = cpu_probe.measured_peaks(cpus.threads)
        tflops = peaks["fp32" if precision == "fp32" else "bf16"] * cpus.share
        return tflops, f"measured on this host ({cpus.describe()}), cached {path}"

    def rank_cpus(self, *, ranks_per_node: int | None = None) -> RankCpus:
        """How a CPU node's cores are shared by ``ranks_per_node`` ranks (None: as launched)."""
        from orchestrator.planning import cpu_probe

        ranks = ranks_per_node or cpu_probe.launched_ranks_per_node() or 1
        slurm = self.scheduler == "slurm" and self.tasks_per_node is not None
        return cpu_probe.rank_cpus(
            ranks_per_node=ranks, cpus_per_task=self.cpus_per_task if slurm else None
        )

    def validate(self) -> None:
        if self.nodes is not None:
            positive("cluster.nodes", self.nodes)
        non_negative("cluster.gpus_per_node", self.gpus_per_node)
        positive_float("cluster.device_memory_gb", self.device_memory_gb)
        if self.peak_tflops is None and self.gpus_per_node > 0:
            raise fail(
                "cluster.peak_tflops",
                None,
                "a GPU cluster states its peak (null, measure it, is for CPU clusters)",
            )
        if self.peak_tflops is not None:
            positive_float("cluster.peak_tflops", self.peak_tflops)
        if self.peak_tflops_fp32 is not None:
            positive_float("cluster.peak_tflops_fp32", self.peak_tflops_fp32)
        if not 0 < self.compute_efficiency <= 1:
            raise fail("cluster.compute_efficiency", self.compute_efficiency, "must be in (0, 1]")
        if self.intra_node_bandwidth_gbs is None and self.gpus_per_node > 0:
            raise fail(
                "cluster.intra_node_bandwidth_gbs",
                None,
                "a GPU cluster states it (null, measure it, is for CPU clusters)",
            )
        if self.intra_node_bandwidth_gbs is not None:
            positive_float("cluster.intra_node_bandwidth_gbs", self.intra_node_bandwidth_gbs)
        positive_float("cluster.inter_node_bandwidth_gbs", self.inter_node_bandwidth_gbs)
        if self.memory_overhead_gb < 0:
            raise fail("cluster.memory_overhead_gb", self.memory_overhead_gb, "must be >= 0")
        positive("cluster.cpus_per_task", self.cpus_per_task)
        positive("cluster.max_local_procs", self.max_local_procs)
        if self.tasks_per_node is not None:
            positive("cluster.tasks_per_node", self.tasks_per_node)
        one_of("cluster.scheduler", self.scheduler, SCHEDULERS)
        one_of("cluster.cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS)
        slurm_name("cluster.partition", self.partition, SLURM_NAME_LIST)
        slurm_name("cluster.account", self.account)
        for key, value in self.nccl_env.items():
            if not ENV_NAME.match(key):
                raise fail(f"cluster.nccl_env.{key}", value, "the key must be a variable name")
            if has_control(str(value)):
                raise fail(f"cluster.nccl_env.{key}", value, "must not hold control characters")
        if not SLURM_TIME.match(self.time_limit):
            raise fail(
                "cluster.time_limit",
                self.time_limit,
                "must be a SLURM time such as 04:00:00 or 2-00:00:00",
            )


@dataclass
class SlurmConfig:
    """``launcher=slurm``: the generated sbatch script and its submission (see ``orchestrator.launch.slurm``)."""

    submit: bool = True  # false: write the run directory and the script, submit nothing
    job_name: str | None = None  # None: llama-<model>-<parallel>
    # SIGUSR1 this long before the time limit: every rank checkpoints and exits 75.
    signal_grace_s: int = 600
    requeue: bool = True  # requeue the job when its ranks stopped for time (exit 75)
    max_requeues: int | None = None  # None: no bound (SLURM_RESTART_COUNT counts them)
    # After the first rank exits, how long srun lets the others finish before killing
    # them (a dead rank must not leave the rest hanging in a collective).
    step_wait_s: int = 300
    python: str | None = None  # interpreter on the compute nodes; None: this one
    extra_sbatch_args: list[str] = field(default_factory=list)  # e.g. ["--constraint=a100"]

    def validate(self) -> None:
        slurm_name("slurm.job_name", self.job_name)
        if not 1 <= self.signal_grace_s <= 65535:
            raise fail("slurm.signal_grace_s", self.signal_grace_s, "must be in [1, 65535]")
        if self.max_requeues is not None:
            non_negative("slurm.max_requeues", self.max_requeues)
        positive("slurm.step_wait_s", self.step_wait_s)
        if self.python is not None and (not self.python or has_control(self.python)):
            raise fail("slurm.python", self.python, "must be a non-empty path")
        for i, arg in enumerate(self.extra_sbatch_args):
            if not arg.startswith("-") or has_control(arg):
                raise fail(
                    f"slurm.extra_sbatch_args[{i}]", arg, "must be one sbatch option (--name=value)"
                )
