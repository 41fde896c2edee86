"""The config schema: dataclasses registered with Hydra's ConfigStore.

The dataclasses are the single schema; YAML files under ``conf/`` only set
values. Because the primary config starts from the registered ``base_config``
node, every YAML file and command-line override is merged into a structured
(struct-mode) config, so an unknown or misspelled key, or a value of the wrong
type, is a composition error rather than silently ignored.

Each section checks its own fields in ``validate()`` and raises ``ValueError``
with one line naming the field, the value and the rule. Rules that need more
than one section (world size, divisibility by tp, layers over pp, ...) live in
``orchestrator.planning.plan``. The cluster and SLURM sections are in
``orchestrator.config.cluster``, the shared choices and field checks in
``orchestrator.config.rules``. Past the entry point, code receives these dataclasses
(``OmegaConf.to_object``), never a ``DictConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from model_parallel.args import kv_heads_rule
from orchestrator.config.cluster import ClusterConfig, SlurmConfig
from orchestrator.config.model import ModelConfig, RopeScalingConfig
from orchestrator.config.rules import (
    ACTIVATION_CHECKPOINTING,
    CPU_ALLOCATORS,
    DATA_KINDS,
    LAUNCHERS,
    PRECISIONS,
    RESUME_MODES,
    SCHEDULERS,
    fail,
    non_negative,
    one_of,
    positive,
    positive_float,
)
from orchestrator.protocol import STARTUP_PHASES

# The sections and choices defined beside this module, importable from here as before.
__all__ = [
    "ACTIVATION_CHECKPOINTING",
    "CPU_ALLOCATORS",
    "DATA_KINDS",
    "LAUNCHERS",
    "PRECISIONS",
    "RESUME_MODES",
    "SCHEDULERS",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "DataSourceConfig",
    "DeepSpeedSection",
    "FaultsConfig",
    "ModelConfig",
    "MonitorConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "RunConfig",
    "SlurmConfig",
    "TrainConfig",
    "config_yaml",
    "load_config",
    "register_configs",
    "save_config",
]


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
        positive("parallel.tp", self.tp)
        positive("parallel.pp", self.pp)
        if self.dp != -1:
            positive("parallel.dp", self.dp)
        positive("parallel.micro_batch_size", self.micro_batch_size)
        if not 0 <= self.zero_stage <= 3:
            raise fail("parallel.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.zero_stage > 1 and self.pp > 1:
            raise fail(
                "parallel.zero_stage",
                self.zero_stage,
                f"DeepSpeed's pipeline engine supports ZeRO stage <= 1 (pp={self.pp})",
            )
        one_of(
            "parallel.activation_checkpointing",
            self.activation_checkpointing,
            ACTIVATION_CHECKPOINTING,
        )
        if self.pipeline_split is not None:
            self._validate_split(list(self.pipeline_split))

    def _validate_split(self, split: list[int]) -> None:
        if len(split) != self.pp:
            raise fail(
                "parallel.pipeline_split",
                split,
                f"must have one entry per stage: length {len(split)} != pp({self.pp})",
            )
        if any(n < 1 for n in split):
            raise fail("parallel.pipeline_split", split, "every stage needs >= 1 layer")


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
    adam_eps: float = 1e-8  # Llama 2 and 3: 1e-5
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "bf16"
    log_interval: int = 10
    seq_len: int | None = None  # tokens per training sequence; None: model.max_seq_len
    exit_at_step: int = 0  # stop after this step with a checkpoint (Megatron's --exit-interval)
    eval_interval: int = 0  # validation loss every N steps (and at step 0); 0: never
    eval_iters: int = 1  # global batches of validation data per evaluation

    def validate(self) -> None:
        non_negative("train.seed", self.seed)
        positive("train.steps", self.steps)
        positive("train.global_batch_size", self.global_batch_size)
        positive_float("train.lr", self.lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise fail("train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        non_negative("train.warmup_steps", self.warmup_steps)
        positive_float("train.adam_eps", self.adam_eps)
        if self.weight_decay < 0:
            raise fail("train.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise fail(f"train.{name}", value, "must be in [0, 1)")
        if self.grad_clip < 0:
            raise fail("train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        one_of("train.precision", self.precision, PRECISIONS)
        positive("train.log_interval", self.log_interval)
        if self.seq_len is not None:
            positive("train.seq_len", self.seq_len)
        non_negative("train.exit_at_step", self.exit_at_step)
        non_negative("train.eval_interval", self.eval_interval)
        positive("train.eval_iters", self.eval_iters)


@dataclass
class DataSourceConfig:
    """One source of a blend, with its weight: a shard, a folder of shards or a glob.

    ``prefix`` is one shard (``PREFIX.bin`` + ``PREFIX.idx``), a folder (every
    shard in it, not recursive) or a glob of shard files or prefixes
    (``common_crawl/*``); inside a source, shards are read in proportion to
    their tokens.
    """

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
    tokenizer: str | None = (
        None  # SentencePiece .model, or a tokenizer.json (or a folder holding one)
    )
    sources: list[DataSourceConfig] = field(default_factory=list)
    valid_fraction: float = 0.01  # documents held out per source
    split_seed: int = 1234  # the train/validation split does not move with train.seed
    # Whole-run indexes (document order, samples, blend), built once and
    # memory-mapped by every rank; null: DATA_ROOT/index_cache (Megatron keeps
    # its index cache beside the data too).
    cache_dir: str | None = None
    num_samples: int = 0  # synthetic: distinct samples before repeating (0: never)
    alpaca_path: str | None = None
    packing: bool = False  # alpaca: pack examples back to back instead of padding

    def validate(self) -> None:
        one_of("data.kind", self.kind, DATA_KINDS)
        non_negative("data.num_samples", self.num_samples)
        if not 0 <= self.valid_fraction < 1:
            raise fail("data.valid_fraction", self.valid_fraction, "must be in [0, 1)")
        if self.kind in ("blended", "alpaca") and not self.tokenizer:
            raise fail(
                "data.tokenizer",
                self.tokenizer,
                f"data.kind={self.kind} needs a tokenizer (data.tokenizer=PATH: a SentencePiece .model or a tokenizer.json)",
            )
        if self.kind == "blended":
            if not self.sources:
                raise fail("data.sources", "[]", "data.kind=blended needs at least one source")
            for i, source in enumerate(self.sources):
                if not source.weight > 0:
                    raise fail(f"data.sources[{i}].weight", source.weight, "must be > 0")
        if self.kind == "alpaca" and not self.alpaca_path:
            raise fail(
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
        one_of("run.resume", self.resume, RESUME_MODES)


@dataclass
class CheckpointConfig:
    """When to write checkpoints (always also at the end, and when signalled)."""

    interval: int = 0  # every N steps; 0: only at the end and on a stop signal
    keep: int = 3  # the newest K complete checkpoints are kept

    def validate(self) -> None:
        non_negative("checkpoint.interval", self.interval)
        positive("checkpoint.keep", self.keep)


@dataclass
class FaultsConfig:
    """Hangs and bad steps (see ``orchestrator.runtime.faults``)."""

    hang_timeout_s: float = 900.0  # a rank without progress this long ends the job
    # A rank in one start-up phase this long ends the job (orchestrator.runtime.startup): sized for
    # 2,048 ranks joining, a whole-run index build and a re-sharded 65B checkpoint load.
    startup_timeout_s: float = 1800.0
    # Training beats at most this often: 2,048 ranks rewrite their files ~200 times a second,
    # however short the step. Every rank's watchdog rewrites its beat this often while it
    # lives (a frozen rank goes silent); capped at hang_timeout_s / 8.
    heartbeat_interval_s: float = 10.0
    max_consecutive_skips: int = 5  # NaN/Inf steps in a row before rolling back
    spike_factor: float = 0.0  # roll back when loss > factor x recent mean; 0: off
    spike_window: int = 50  # good steps in that mean
    # Testing aids (orchestrator.runtime.numerics.LossFault) on the N-th global batches drawn: a NaN
    # loss; a finite loss with an Inf gradient; the loss x 1000 (a bad update that is
    # applied, clipped, and shows as a spike). inject_rank: on that global rank only.
    inject_nan_at_steps: list[int] = field(default_factory=list)
    inject_inf_grad_at_steps: list[int] = field(default_factory=list)
    inject_spike_at_steps: list[int] = field(default_factory=list)
    inject_rank: int | None = None
    # Testing aid: this rank sleeps inject_slow_s at the start of every step (a straggler).
    inject_slow_rank: int | None = None
    inject_slow_s: float = 0.0
    # Testing aid: this rank stops for good when it enters start-up phase inject_stall_phase.
    inject_stall_rank: int | None = None
    inject_stall_phase: str = "data indexes"

    def validate(self) -> None:
        positive_float("faults.hang_timeout_s", self.hang_timeout_s)
        positive_float("faults.startup_timeout_s", self.startup_timeout_s)
        positive_float("faults.heartbeat_interval_s", self.heartbeat_interval_s)
        if self.inject_stall_phase not in STARTUP_PHASES:
            raise fail(
                "faults.inject_stall_phase",
                self.inject_stall_phase,
                f"must be a start-up phase: {', '.join(STARTUP_PHASES)}",
            )
        positive("faults.max_consecutive_skips", self.max_consecutive_skips)
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise fail("faults.spike_factor", self.spike_factor, "must be 0 (off) or > 1")
        positive("faults.spike_window", self.spike_window)
        if self.inject_slow_s < 0:
            raise fail("faults.inject_slow_s", self.inject_slow_s, "must be >= 0")


@dataclass
class MonitorConfig:
    """What a run writes for operators besides the progress line and ``metrics.jsonl``."""

    tensorboard: bool = True  # event files in RUN_DIR/tensorboard
    # Also log to Weights & Biases under this project when set and wandb is installed.
    wandb_project: str | None = None

    def validate(self) -> None:
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise fail("monitor.wandb_project", self.wandb_project, "must be null or a name")


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
        """Each section's own rules; cross-section rules are in ``orchestrator.planning.plan``."""
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
        one_of("launcher", self.launcher, LAUNCHERS)
        # Spans model and parallel; here until orchestrator.planning.plan._check_tensor_parallel
        # (which checks n_heads and the FFN width against tp) takes it over.
        if not self.parallel.auto:
            n_kv = self.model.n_kv_heads or self.model.n_heads
            rule = kv_heads_rule(tp=self.parallel.tp, n_heads=self.model.n_heads, n_kv_heads=n_kv)
            if rule is not None:
                raise fail("parallel.tp", self.parallel.tp, rule)


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
