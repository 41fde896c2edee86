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


def padded_vocab_size(vocab_size: int, tp_size: int, *, multiple: int = 128) -> int:
    """Vocabulary padded to a multiple of ``multiple * tp_size`` (Megatron's rule).

    The padding rows are zero and their logits are masked out of the loss, so
    the padding never changes the model's numbers.
    """
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a LLaMA model. Field names follow Meta's ``params.json``."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def num_params(self) -> int:
        """Parameters of the unpadded model (embedding and output untied)."""
        per_layer = 4 * self.dim * self.dim + 3 * self.dim * self.hidden_dim + 2 * self.dim
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim
