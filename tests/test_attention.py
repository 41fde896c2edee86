"""``model_parallel.attention.flash_attention_cpu`` against SDPA in float64.

Its forward is ATen's CPU flash kernel; its backward recomputes the
probabilities from the saved logsumexp in blocks of query rows. Compared, eager
and compiled, with several row blocks (a block size that does not divide the
sequence) and with one, on transposed (non-contiguous) inputs as the model
passes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_parallel import attention


def _inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    # (B, S, h, hd) viewed as (B, h, S, hd), as Attention.forward passes them
    return [torch.randn(2, 37, 3, 16, dtype=dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("rows", [8, 512])
@pytest.mark.parametrize("compiled", [False, True])
def test_matches_sdpa(rows: int, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "BACKWARD_ROWS", rows)
    base = _inputs(torch.float64)
    grad = torch.randn(base[0].shape, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in base]
    F.scaled_dot_product_attention(*ref, is_causal=True).backward(grad)
    fn = attention.flash_attention_cpu
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn)
    got = [t.clone().requires_grad_() for t in base]
    out = fn(*got)
    out.backward(grad)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(*base, is_causal=True))
    for g, r in zip(got, ref, strict=True):
        assert g.grad is not None and r.grad is not None
        torch.testing.assert_close(g.grad, r.grad, rtol=1e-7, atol=1e-9)


def test_bf16_error_no_worse_than_sdpa() -> None:
    """In bf16 both kernels round; the matmul backward's error against float64 stays
    within twice SDPA's own (bf16 operands, fp32 probabilities)."""
    base = _inputs(torch.bfloat16)
    grad = torch.randn(base[0].shape).bfloat16()
    exact = [t.double().requires_grad_() for t in base]
    F.scaled_dot_product_attention(*exact, is_causal=True).backward(grad.double())
    errors = []
    for fn in (attention.flash_attention_cpu, attention.causal_attention):
        ts = [t.clone().requires_grad_() for t in base]
        fn(*ts).backward(grad)
        errors.append(
            max(
                float((t.grad.double() - e.grad).abs().max())
                for t, e in zip(ts, exact, strict=True)
            )  # type: ignore[union-attr]
        )
    ours, sdpa = errors
    assert ours <= 2 * sdpa + 1e-3, errors
