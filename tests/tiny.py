"""The tiny LLaMA shape that tests build their models from.

``tiny_args()`` is the base: ``dim=64, n_layers=2, n_heads=4, vocab_size=300,
multiple_of=32, max_seq_len=32`` (head_dim 16, FFN 192), every other field
``ModelArgs``' default. It is small enough that a forward and backward on a
few gloo ranks take milliseconds, yet has every part a layout splits: 4 heads
for tp = 2 and 4, 2 layers for a stage each at pp = 2, and a vocabulary that
is padded (300 is no multiple of 128).

A test passes only the fields it deliberately differs in, e.g.
``tiny_args(n_layers=4)`` so that pp = 3 has a stage of each size, with a
one-line comment at the call saying why where it is not obvious. Shapes that
are not tiny models stay ``ModelArgs(...)``: real sizes (7B, 65B), shapes
computed from the world size or a tokenizer, and hand counts that spell out
every field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model_parallel.args import ModelArgs

BASE = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=32)


def tiny_args(**overrides: Any) -> ModelArgs:
    """The base tiny shape with ``overrides`` (``ModelArgs`` field names) replaced."""
    return dataclasses.replace(BASE, **overrides)
