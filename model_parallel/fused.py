"""Optional NVIDIA apex kernels, with torch's native equivalents as the fallback,
and ``cross_entropy``, the plain tp = 1 loss the compiled one is tested against.

apex is never a dependency: on the package index ``apex`` is an unrelated web
toolkit. When something named ``apex`` is importable but is not NVIDIA's
(no ``apex.normalization``), we warn once and use the torch path.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@functools.cache
def _nvidia_apex_module(name: str) -> Any | None:
    try:
        apex = importlib.import_module("apex")
    except ImportError:
        return None
    try:
        return importlib.import_module(f"apex.{name}")
    except ImportError:
        log.warning(
            "an 'apex' package is importable (%s) but it is not NVIDIA apex (no apex.%s); "
            "using torch's native kernels",
            getattr(apex, "__file__", "?"),
            name,
        )
        return None


def fused_rms_norm_affine() -> Callable[..., torch.Tensor] | None:
    """apex's fused RMSNorm (``fn(x, weight, normalized_shape, eps)``) or None."""
    mod = _nvidia_apex_module("normalization")
    if mod is None or not torch.cuda.is_available():
        return None
    fn = getattr(getattr(mod, "fused_layer_norm", None), "fused_rms_norm_affine", None)
    return fn if callable(fn) else None


def fused_adam_class() -> type | None:
    """apex's ``FusedAdam`` (AdamW with ``adam_w_mode=True``) or None."""
    mod = _nvidia_apex_module("optimizers")
    if mod is None or not torch.cuda.is_available():
        return None
    cls = getattr(mod, "FusedAdam", None)
    return cls if isinstance(cls, type) else None


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token ``logsumexp(z) - z[target]`` ``(...)`` from full (tp = 1) logits ``(..., V_pad)``.

    Computed in fp32 whatever the logits' dtype; columns at or past
    ``vocab_size`` (padding) are dropped; ``ignore_index`` targets give zero
    loss and zero gradient. The same numbers as ``vocab_parallel_cross_entropy``
    at tp = 1, up to fp32 rounding.
    """
    z = logits[..., :vocab_size].float()  # (..., V)
    loss = F.cross_entropy(
        z.flatten(0, -2), target.flatten(), reduction="none", ignore_index=ignore_index
    )
    return loss.view(target.shape)
