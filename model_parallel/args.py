"""LLaMA model hyper-parameters, named as in Meta's ``params.json``."""

from __future__ import annotations

from dataclasses import dataclass


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden width: 2/3 * 4 * dim, optionally scaled, rounded up to ``multiple_of``.

    This is Meta's rule (7B: 11008, 13B: 13824, 33B: 17920, 65B: 22016).
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


VOCAB_MULTIPLE = 128  # the padded vocabulary is a multiple of VOCAB_MULTIPLE * tp


def padded_vocab_size(vocab_size: int, tp_size: int, *, multiple: int = VOCAB_MULTIPLE) -> int:
    """Vocabulary padded to a multiple of ``multiple * tp_size`` (Megatron's rule).

    The padding rows are zero and their logits are masked out of the loss, so
    the padding never changes the model's numbers.
    """
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (Meta's ``use_scaled_rope``, Hugging Face's
    ``rope_type: llama3``), for context longer than ``original_max_seq_len``.

    With wavelength ``w = 2 pi / f`` of frequency ``f``: ``w < original /
    high_freq_factor`` (high frequencies) keep ``f``; ``w > original /
    low_freq_factor`` (low) become ``f / factor``; in between,
    ``(1 - a) f / factor + a f`` with
    ``a = (original / w - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


def kv_heads_rule(*, tp: int, n_heads: int, n_kv_heads: int) -> str | None:
    """Why heads cannot be split over ``tp`` (None when they can).

    Query heads split evenly over tp. Key/value heads split over tp when tp
    divides them; when tp exceeds them, each KV head is replicated on the
    ``tp / n_kv_heads`` consecutive ranks whose query heads use it, so tp must
    then be a multiple of n_kv_heads.
    """
    if n_heads % tp:
        return f"model.n_heads({n_heads}) must be divisible by tp"
    if tp <= n_kv_heads and n_kv_heads % tp:
        return f"model.n_kv_heads({n_kv_heads}) must be divisible by tp (tp <= n_kv_heads)"
    if tp > n_kv_heads and tp % n_kv_heads:
        return (
            f"tp > model.n_kv_heads({n_kv_heads}) replicates KV heads, so tp must be a "
            "multiple of n_kv_heads"
        )
    return None


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a LLaMA model. Field names follow Meta's ``params.json``."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # grouped-query attention; None: n_heads
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: ``n_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def kv_replicas(self, tp: int) -> int:
        """tp ranks holding a copy of each KV head: ``tp / n_kv_heads`` when tp exceeds it, else 1."""
        return max(1, tp // self.num_kv_heads)

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def num_params(self) -> int:
        """Parameters of the unpadded model (embedding and output untied): per layer
        wq and wo ``dim^2`` each, wk and wv ``dim * kv_dim`` each, three FFN
        matrices ``dim * hidden_dim``, two norms."""
        attention = 2 * self.dim * self.dim + 2 * self.dim * self.kv_dim
        per_layer = attention + 3 * self.dim * self.hidden_dim + 2 * self.dim
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim
