"""The config schema: dataclasses registered with Hydra's ConfigStore.

The dataclasses are the single schema; YAML files under ``conf/`` only set
values. Because the primary config starts from the registered ``base_config``
node, every YAML file and command-line override is merged into a structured
(struct-mode) config, so an unknown or misspelled key, or a value of the wrong
type, is a composition error rather than silently ignored.

Each section checks its own fields in ``validate()`` and raises ``ValueError``
with one line naming the field, the value and the rule. Rules that need more
than one section (world size, divisibility by tp, layers over pp, ...) live in
``orchestrator.plan``. Past the entry point, code receives these dataclasses
(``OmegaConf.to_object``), never a ``DictConfig``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from model_parallel.args import ModelArgs

ACTIVATION_CHECKPOINTING = ("none", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
LAUNCHERS = ("auto", "local", "slurm")
SCHEDULERS = ("none", "slurm")
CPU_ALLOCATORS = ("auto", "tcmalloc", "system")
DATA_KINDS = ("synthetic", "blended", "alpaca")
RESUME_MODES = ("auto", "never")

# SLURM --time formats: "minutes", "minutes:seconds", "hours:minutes:seconds",
# "days-hours", "days-hours:minutes", "days-hours:minutes:seconds".
_SLURM_TIME = re.compile(r"^\d+(:\d{1,2}){0,2}$|^\d+-\d{1,2}(:\d{1,2}){0,2}$")
# SLURM names as #SBATCH lines take them unquoted: accounts, partitions (a
# comma-separated list), job names. Anything else is refused rather than escaped.
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_SLURM_NAME_LIST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(,[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _slurm_name(field_name: str, value: str | None, pattern: re.Pattern[str] = _SLURM_NAME) -> None:
    if value is not None and not pattern.match(value):
        raise _fail(field_name, value, "must be a SLURM name: letters, digits and _ . + - only")


def _fail(field_name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{field_name}={value}: {rule}")


def _positive(field_name: str, value: Any) -> None:
    # bool is an int subclass; a flag is never a size.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(field_name, value, "must be a positive integer")


def _non_negative(field_name: str, value: int) -> None:
    if value < 0:
        raise _fail(field_name, value, "must be >= 0")


def _positive_float(field_name: str, value: float) -> None:
    if not value > 0:
        raise _fail(field_name, value, "must be > 0")


def _one_of(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(field_name, value, f"must be one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    """LLaMA shape. Field names follow Meta's ``params.json``."""

    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    init_std: float = 0.02
    # Start from these weights (a Hugging Face LlamaForCausalLM directory, or a
    # Meta release with params.json) instead of the random init; any layout.
    init_from: str | None = None
    # torch.compile each transformer block, and the loss at any tp (inductor; on
    # CPU it needs a C++ compiler). The first step pays the compile (tens of
    # seconds); weights, their names and checkpoints are unchanged. Works with
    # every layout: at tp > 1 each collective splits the compiled graph.
    compile: bool = False

    def to_args(self) -> ModelArgs:
        """The shape fields, as the model package takes them."""
        return ModelArgs(**{f.name: getattr(self, f.name) for f in fields(ModelArgs)})

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            _positive(f"model.{name}", getattr(self, name))
        for name in ("norm_eps", "rope_theta", "init_std"):
            _positive_float(f"model.{name}", getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            _positive_float("model.ffn_dim_multiplier", self.ffn_dim_multiplier)
        if self.dim % self.n_heads != 0:
            raise _fail(
                "model.dim", self.dim, f"must be divisible by model.n_heads({self.n_heads})"
            )
        head_dim = self.dim // self.n_heads
        if head_dim % 2 != 0:
            raise _fail(
                "model.dim",
                self.dim,
                f"head_dim = dim / n_heads({self.n_heads}) = {head_dim} must be even for rotary",
            )


@dataclass
class ParallelConfig:
    """Layout: tensor (tp), pipeline (pp) and data (dp) parallel sizes."""

    name: str = MISSING
    tp: int = 1
    pp: int = 1
    dp: int = -1  # -1: derive from the world size
    zero_stage: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: str = "none"
    micro_batch_size: int = 1
    pipeline_split: list[int] | None = None  # explicit layers per pipeline stage
    # true: the plan searches tp, pp, ZeRO stage, micro-batch size and activation
    # checkpointing for the best predicted tokens/s that fits (conf/parallel/auto.yaml);
    # the fields above are then replaced by its choice.
    auto: bool = False

    def validate(self) -> None:
        _positive("parallel.tp", self.tp)
        _positive("parallel.pp", self.pp)
        if self.dp != -1:
            _positive("parallel.dp", self.dp)
        _positive("parallel.micro_batch_size", self.micro_batch_size)
        if not 0 <= self.zero_stage <= 3:
            raise _fail("parallel.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.zero_stage > 1 and self.pp > 1:
            raise _fail(
                "parallel.zero_stage",
                self.zero_stage,
                f"DeepSpeed's pipeline engine supports ZeRO stage <= 1 (pp={self.pp})",
            )
        _one_of(
            "parallel.activation_checkpointing",
            self.activation_checkpointing,
            ACTIVATION_CHECKPOINTING,
        )
        if self.pipeline_split is not None:
            self._validate_split(list(self.pipeline_split))

    def _validate_split(self, split: list[int]) -> None:
        if len(split) != self.pp:
            raise _fail(
                "parallel.pipeline_split",
                split,
                f"must have one entry per stage: length {len(split)} != pp({self.pp})",
            )
        if any(n < 1 for n in split):
            raise _fail("parallel.pipeline_split", split, "every stage needs >= 1 layer")


@dataclass
class ClusterConfig:
    """Where a run goes. ``gpus_per_node == 0`` means CPU worker processes."""

    name: str = MISSING
    nodes: int | None = None  # None: as many nodes as the layout needs
    gpus_per_node: int = MISSING
    device: str = MISSING
    device_memory_gb: float = MISSING
    peak_tflops: float = MISSING  # bf16 dense peak per device
    # fp32 dense peak per device (no TF32), what train.precision=fp32 runs' MFU and
    # step time are measured against; None: peak_tflops.
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
    # CPU worker processes' malloc (orchestrator.cpu_allocator): "auto" preloads
    # tcmalloc when the node has it, "tcmalloc" requires it, "system" is glibc's.
    cpu_allocator: str = "auto"
    # The plan's performance model (orchestrator.perf). Defaults are an A100 SXM
    # cluster's. compute_efficiency: the fraction of peak_tflops that a
    # transformer layer's matmuls sustain, one fixed number per device type (0.6
    # for A100, not tuned per case: with it the model reproduces LLaMA-65B's and
    # Megatron-LM 2022's published throughput within 15%, tests/test_perf.py). Bandwidths are what one device reaches in a ring
    # collective, in GB/s: NVLink inside a node (A100: 600 GB/s total, 300 per
    # direction), the network between nodes (A100 clusters: one 200 Gb/s HDR
    # InfiniBand link per GPU = 25 GB/s).
    compute_efficiency: float = 0.6
    intra_node_bandwidth_gbs: float = 300.0
    inter_node_bandwidth_gbs: float = 25.0
    # Framework allowance per device: CUDA context, NCCL and DeepSpeed buffers,
    # allocator fragmentation (not counted item by item).
    memory_overhead_gb: float = 3.0

    def peak_for(self, precision: str) -> float:
        """The dense peak (TFLOP/s per device) of ``precision``'s matmuls."""
        if precision == "fp32" and self.peak_tflops_fp32 is not None:
            return self.peak_tflops_fp32
        return self.peak_tflops

    def validate(self) -> None:
        if self.nodes is not None:
            _positive("cluster.nodes", self.nodes)
        _non_negative("cluster.gpus_per_node", self.gpus_per_node)
        _positive_float("cluster.device_memory_gb", self.device_memory_gb)
        _positive_float("cluster.peak_tflops", self.peak_tflops)
        if self.peak_tflops_fp32 is not None:
            _positive_float("cluster.peak_tflops_fp32", self.peak_tflops_fp32)
        if not 0 < self.compute_efficiency <= 1:
            raise _fail("cluster.compute_efficiency", self.compute_efficiency, "must be in (0, 1]")
        _positive_float("cluster.intra_node_bandwidth_gbs", self.intra_node_bandwidth_gbs)
        _positive_float("cluster.inter_node_bandwidth_gbs", self.inter_node_bandwidth_gbs)
        if self.memory_overhead_gb < 0:
            raise _fail("cluster.memory_overhead_gb", self.memory_overhead_gb, "must be >= 0")
        _positive("cluster.cpus_per_task", self.cpus_per_task)
        _positive("cluster.max_local_procs", self.max_local_procs)
        if self.tasks_per_node is not None:
            _positive("cluster.tasks_per_node", self.tasks_per_node)
        _one_of("cluster.scheduler", self.scheduler, SCHEDULERS)
        _one_of("cluster.cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS)
        _slurm_name("cluster.partition", self.partition, _SLURM_NAME_LIST)
        _slurm_name("cluster.account", self.account)
        for key, value in self.nccl_env.items():
            if not _ENV_NAME.match(key):
                raise _fail(f"cluster.nccl_env.{key}", value, "the key must be a variable name")
            if _has_control(str(value)):
                raise _fail(f"cluster.nccl_env.{key}", value, "must not hold control characters")
        if not _SLURM_TIME.match(self.time_limit):
            raise _fail(
                "cluster.time_limit",
                self.time_limit,
                "must be a SLURM time such as 04:00:00 or 2-00:00:00",
            )


@dataclass
class TrainConfig:
    """Optimiser and schedule (AdamW, warmup then cosine to min_lr_ratio * lr)."""

    seed: int = 1234
    steps: int = MISSING
    global_batch_size: int = MISSING  # sequences per optimiser step
    lr: float = MISSING
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "bf16"
    log_interval: int = 10
    seq_len: int | None = None  # tokens per training sequence; None: model.max_seq_len
    exit_at_step: int = 0  # stop after this step with a checkpoint (Megatron's --exit-interval)
    eval_interval: int = 0  # validation loss every N steps (and at step 0); 0: never
    eval_iters: int = 1  # global batches of validation data per evaluation

    def validate(self) -> None:
        _non_negative("train.seed", self.seed)
        _positive("train.steps", self.steps)
        _positive("train.global_batch_size", self.global_batch_size)
        _positive_float("train.lr", self.lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise _fail("train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _non_negative("train.warmup_steps", self.warmup_steps)
        if self.weight_decay < 0:
            raise _fail("train.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise _fail(f"train.{name}", value, "must be in [0, 1)")
        if self.grad_clip < 0:
            raise _fail("train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _one_of("train.precision", self.precision, PRECISIONS)
        _positive("train.log_interval", self.log_interval)
        if self.seq_len is not None:
            _positive("train.seq_len", self.seq_len)
        _non_negative("train.exit_at_step", self.exit_at_step)
        _non_negative("train.eval_interval", self.eval_interval)
        _positive("train.eval_iters", self.eval_iters)


@dataclass
class DataSourceConfig:
    """One indexed shard (``PREFIX.bin`` + ``PREFIX.idx``) of a blend, with its weight."""

    name: str = MISSING
    prefix: str = MISSING  # relative to data.root unless absolute
    weight: float = MISSING


@dataclass
class DataConfig:
    """Where training batches come from.

    ``synthetic``: seeded random tokens. ``blended``: indexed shards blended
    by weight, each split into train and validation documents. ``alpaca``:
    instruction records (``alpaca_path``) with the loss on the responses.
    """

    name: str = "synthetic"
    kind: str = "synthetic"
    root: str = "."  # directory the sources' prefixes are relative to
    tokenizer: str | None = None  # SentencePiece .model
    sources: list[DataSourceConfig] = field(default_factory=list)
    valid_fraction: float = 0.01  # documents held out per source
    split_seed: int = 1234  # the train/validation split does not move with train.seed
    num_samples: int = 0  # synthetic: distinct samples before repeating (0: never)
    alpaca_path: str | None = None
    packing: bool = False  # alpaca: pack examples back to back instead of padding

    def validate(self) -> None:
        _one_of("data.kind", self.kind, DATA_KINDS)
        _non_negative("data.num_samples", self.num_samples)
        if not 0 <= self.valid_fraction < 1:
            raise _fail("data.valid_fraction", self.valid_fraction, "must be in [0, 1)")
        if self.kind in ("blended", "alpaca") and not self.tokenizer:
            raise _fail(
                "data.tokenizer",
                self.tokenizer,
                f"data.kind={self.kind} needs a SentencePiece model (data.tokenizer=PATH)",
            )
        if self.kind == "blended":
            if not self.sources:
                raise _fail("data.sources", "[]", "data.kind=blended needs at least one source")
            for i, source in enumerate(self.sources):
                if not source.weight > 0:
                    raise _fail(f"data.sources[{i}].weight", source.weight, "must be > 0")
        if self.kind == "alpaca" and not self.alpaca_path:
            raise _fail(
                "data.alpaca_path",
                self.alpaca_path,
                "data.kind=alpaca needs a file (data.alpaca_path=PATH)",
            )


@dataclass
class RunConfig:
    """The run directory: resolved config, metrics, per-rank logs, checkpoints."""

    dir: str | None = None  # None: runs/<model>-<parallel>-<timestamp>
    root: str = "runs"
    resume: str = "auto"  # auto: continue from checkpoints/latest when there is one; never

    def validate(self) -> None:
        _one_of("run.resume", self.resume, RESUME_MODES)


@dataclass
class CheckpointConfig:
    """When to write checkpoints (always also at the end, and when signalled)."""

    interval: int = 0  # every N steps; 0: only at the end and on a stop signal
    keep: int = 3  # the newest K complete checkpoints are kept

    def validate(self) -> None:
        _non_negative("checkpoint.interval", self.interval)
        _positive("checkpoint.keep", self.keep)


@dataclass
class FaultsConfig:
    """Hangs and bad steps (see ``orchestrator.faults``)."""

    hang_timeout_s: float = 900.0  # a rank without progress this long ends the job
    max_consecutive_skips: int = 5  # NaN/Inf steps in a row before rolling back
    spike_factor: float = 0.0  # roll back when loss > factor x recent mean; 0: off
    spike_window: int = 50  # good steps in that mean
    # Testing aid: make the loss NaN on the N-th global batches drawn (pp = 1 only).
    inject_nan_at_steps: list[int] = field(default_factory=list)
    # Testing aid: this rank sleeps inject_slow_s at the start of every step (a straggler).
    inject_slow_rank: int | None = None
    inject_slow_s: float = 0.0

    def validate(self) -> None:
        _positive_float("faults.hang_timeout_s", self.hang_timeout_s)
        _positive("faults.max_consecutive_skips", self.max_consecutive_skips)
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise _fail("faults.spike_factor", self.spike_factor, "must be 0 (off) or > 1")
        _positive("faults.spike_window", self.spike_window)
        if self.inject_slow_s < 0:
            raise _fail("faults.inject_slow_s", self.inject_slow_s, "must be >= 0")


@dataclass
class MonitorConfig:
    """What a run writes for operators besides the progress line and ``metrics.jsonl``."""

    tensorboard: bool = True  # event files in RUN_DIR/tensorboard
    # Also log to Weights & Biases under this project when set and wandb is installed.
    wandb_project: str | None = None

    def validate(self) -> None:
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise _fail("monitor.wandb_project", self.wandb_project, "must be null or a name")


@dataclass
class SlurmConfig:
    """``launcher=slurm``: the generated sbatch script and its submission (see ``orchestrator.slurm``)."""

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
        _slurm_name("slurm.job_name", self.job_name)
        if not 1 <= self.signal_grace_s <= 65535:
            raise _fail("slurm.signal_grace_s", self.signal_grace_s, "must be in [1, 65535]")
        if self.max_requeues is not None:
            _non_negative("slurm.max_requeues", self.max_requeues)
        _positive("slurm.step_wait_s", self.step_wait_s)
        if self.python is not None and (not self.python or _has_control(self.python)):
            raise _fail("slurm.python", self.python, "must be a non-empty path")
        for i, arg in enumerate(self.extra_sbatch_args):
            if not arg.startswith("-") or _has_control(arg):
                raise _fail(
                    f"slurm.extra_sbatch_args[{i}]", arg, "must be one sbatch option (--name=value)"
                )


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or c == "\x7f" for c in text)


@dataclass
class DeepSpeedSection:
    """Extra DeepSpeed config keys, merged into the JSON built from this config.

    A key the config already sets (batch sizes, precision, ZeRO stage,
    clipping) may only repeat the same value; anything else is an error.
    """

    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    dry_run: bool = False
    # auto: one rank when srun/mpirun/torchrun started us; else local when the layout
    # fits this machine; else sbatch when cluster.scheduler=slurm and sbatch is here.
    launcher: str = "auto"

    def validate(self) -> None:
        """Each section's own rules; cross-section rules are in ``orchestrator.plan``."""
        self.model.validate()
        self.parallel.validate()
        self.cluster.validate()
        self.train.validate()
        self.data.validate()
        self.run.validate()
        self.checkpoint.validate()
        self.faults.validate()
        self.monitor.validate()
        self.slurm.validate()
        _one_of("launcher", self.launcher, LAUNCHERS)


BASE_CONFIG_NAME = "base_config"


def register_configs() -> None:
    """Register the schema as ``base_config`` (first entry of conf/config.yaml's defaults)."""
    ConfigStore.instance().store(name=BASE_CONFIG_NAME, node=Config)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what every rank of the run reads)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (what every rank of the run reads)."""
    path.write_text(config_yaml(cfg))


def load_config(path: Path) -> Config:
    """Read a config written by ``save_config``, strictly, back into dataclasses."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    config = OmegaConf.to_object(merged)
    assert isinstance(config, Config)
    return config
