"""Rotary position embeddings (Su et al.), in Meta's interleaved-pair convention:
consecutive pairs ``(x[2i], x[2i+1])`` of each head are rotated by the angle
``position * theta^(-2i/head_dim)``, computed in fp32 whatever the model's dtype. With ``RopeScaling`` (Llama 3.1)
the frequencies are rescaled first (``scaled_frequencies``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from model_parallel.args import RopeScaling


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling (the rule in ``RopeScaling``'s docstring), elementwise."""
    original = scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    low = wavelen > original / scaling.low_freq_factor
    high = wavelen < original / scaling.high_freq_factor
    return torch.where(high, inv_freq, torch.where(low, inv_freq / scaling.factor, blended))


def rotary_cos_sin(
    seq_len: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each ``(seq_len, head_dim/2)``, fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is not None:
        inv_freq = scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


class RotaryTables(nn.Module):
    """cos and sin of the rotary angles for positions ``[0, max_seq_len)``, fp32, computed once.

    Non-persistent buffers, so they follow the module's device but are not in
    state dicts; any ``_apply`` (``.to(device)``, ``model.bfloat16()``, DeepSpeed's
    bf16 or fp16 engine) recomputes them in fp32 where they now are, so a dtype
    cast never rounds them.
    Computing the tables in each forward instead puts ``pow``/``cos``/``sin``
    inside the compiled block, where inductor inlines them into the rotary
    kernel and evaluates them for every element of q and k (on the 60M model
    on CPU, 180 ms of a 900 ms bf16 step; with the tables as inputs, 20 ms).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        theta: float,
        max_seq_len: int,
        *,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_seq_len = head_dim, theta, max_seq_len
        self.scaling = scaling
        self._fill(torch.device("cpu"))

    def _fill(self, device: torch.device) -> None:
        cos, sin = rotary_cos_sin(self.max_seq_len, self.head_dim, self.theta, device, self.scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        super()._apply(fn, recurse)
        if self.cos.device.type != "meta":  # also refills after to_empty()
            self._fill(self.cos.device)
        return self

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(seq_len, head_dim/2)`` fp32 on ``device``."""
        if seq_len > self.max_seq_len or self.cos.device != device:
            return rotary_cos_sin(seq_len, self.head_dim, self.theta, device, self.scaling)
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` of ``x`` ``(B, S, h, hd)`` by position.

    Eager, as Meta's code does it: the pairs as complex numbers times
    ``cos + i sin``, one vectorised kernel each way (the 60M model's q or k:
    under 1 ms forward and backward against 5.2 ms for the real-valued form).
    Compiled, the real-valued form, which inductor fuses into the projections'
    epilogues and does not have to lower complex numbers for. Both in fp32.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, h, hd/2, 2)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, S, 1, hd/2)
    if not torch.compiler.is_compiling():
        rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin)
        return torch.view_as_real(rotated).flatten(-2).type_as(x)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
