"""Optional NVIDIA apex kernels, with torch's native equivalents as the fallback,
and the inductor-compiled loss of the ``model.compile`` fast path.

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


def _ce_forward(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and ``logsumexp`` over the first ``vocab_size`` columns, fp32."""
    z = logits[..., :vocab_size].float()
    lse = torch.logsumexp(z, dim=-1)
    valid = target != ignore_index
    picked = z.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, lse - picked, 0.0), lse


def _ce_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
) -> torch.Tensor:
    """``grad * (softmax(z) - one_hot(target))`` in one pass, zero in padding columns
    and ignored rows, in the logits' dtype."""
    col = torch.arange(logits.shape[-1], device=logits.device)
    g = torch.where(target != ignore_index, grad, 0.0).unsqueeze(-1)
    p = torch.exp(logits.float() - lse.unsqueeze(-1)) - (col == target.unsqueeze(-1)).float()
    return torch.where(col < vocab_size, p * g, 0.0).to(logits.dtype)


class _CompiledCrossEntropy(torch.autograd.Function):
    """``cross_entropy`` with both directions inductor-compiled and nothing but the
    logits and one ``logsumexp`` per token kept for backward.

    Left to autograd, the compiled ``F.cross_entropy`` keeps ``max`` and
    ``log(sum(exp))`` and spends its backward in two loops, one of them a
    reduction of ``one_hot * grad`` over the whole vocabulary; here backward is
    one pass over the logits.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, vocab_size: int, ignore_index: int
    ) -> torch.Tensor:
        loss, lse = _compiled(_ce_forward)(logits, target, vocab_size, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.vocab_size, ctx.ignore_index = vocab_size, ignore_index
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, lse = ctx.saved_tensors
        backward = _compiled(_ce_backward)
        dlogits = backward(logits, target, lse, grad, ctx.vocab_size, ctx.ignore_index)
        return dlogits, None, None, None


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn)


def compiled_cross_entropy() -> Callable[..., torch.Tensor]:
    """``cross_entropy`` through inductor (``model.compile`` at tp = 1): the fp32
    upcast, ``logsumexp`` and the backward's ``softmax - one_hot`` fuse into a
    few passes over the logits instead of about ten (the loss over a
    32,000-word vocabulary is a large share of a small model's step on CPU)."""

    def loss(
        logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int, ignore_index: int = -100
    ) -> torch.Tensor:
        return _CompiledCrossEntropy.apply(logits, target, vocab_size, ignore_index)

    return loss
