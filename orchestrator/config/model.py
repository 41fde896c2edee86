"""The model section of the config schema: LLaMA's shape, named as in Meta's
``params.json``, and Llama 3.1's rotary scaling. Importable from
``orchestrator.config.schema`` with the other sections."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from omegaconf import MISSING

from model_parallel.args import ModelArgs, RopeScaling
from orchestrator.config.rules import fail, positive, positive_float


@dataclass
class RopeScalingConfig:
    """Llama 3.1's rotary frequency scaling (``model_parallel.args.RopeScaling``).

    ``factor: 1.0`` (the default) is no scaling: the rule then leaves every
    frequency as it is. A section rather than null, so that a command line can
    set one field (``model.rope_scaling.factor=8``; OmegaConf cannot merge
    into a null section).
    """

    factor: float = 1.0  # Llama 3.1: 8
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def validate(self) -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            positive_float(f"model.rope_scaling.{name}", getattr(self, name))
        positive("model.rope_scaling.original_max_seq_len", self.original_max_seq_len)
        if self.high_freq_factor <= self.low_freq_factor:
            raise fail(
                "model.rope_scaling.high_freq_factor",
                self.high_freq_factor,
                f"must be > model.rope_scaling.low_freq_factor({self.low_freq_factor})",
            )


@dataclass
class ModelConfig:
    """LLaMA shape. Field names follow Meta's ``params.json``."""

    name: str = MISSING
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int | None = None  # grouped-query attention (Llama 2 70B, Llama 3); None: n_heads
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0  # Llama 3: 500000
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # Llama 3.1
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
        values = {f.name: getattr(self, f.name) for f in fields(ModelArgs)}
        scaled = self.rope_scaling.factor != 1.0
        values["rope_scaling"] = RopeScaling(**asdict(self.rope_scaling)) if scaled else None
        return ModelArgs(**values)

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            positive(f"model.{name}", getattr(self, name))
        for name in ("norm_eps", "rope_theta", "init_std"):
            positive_float(f"model.{name}", getattr(self, name))
        if self.ffn_dim_multiplier is not None:
            positive_float("model.ffn_dim_multiplier", self.ffn_dim_multiplier)
        self.rope_scaling.validate()
        if self.n_kv_heads is not None:
            positive("model.n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads != 0:
                raise fail(
                    "model.n_kv_heads",
                    self.n_kv_heads,
                    f"must divide model.n_heads({self.n_heads})",
                )
        if self.dim % self.n_heads != 0:
            raise fail("model.dim", self.dim, f"must be divisible by model.n_heads({self.n_heads})")
        head_dim = self.dim // self.n_heads
        if head_dim % 2 != 0:
            raise fail(
                "model.dim",
                self.dim,
                f"head_dim = dim / n_heads({self.n_heads}) = {head_dim} must be even for rotary",
            )
