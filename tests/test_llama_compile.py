"""The CPU fast path: torch's fused AdamW, the tp = 1 loss and ``model.compile``.

- ``build_optimizer`` picks torch's fused AdamW on CPU; in fp32 it agrees
  with the foreach path to a few ulps of the update (about 1% of elements
  differ in the last bits: the kernel orders the same fp32 operations
  differently); on bf16 parameters it rounds once from fp32 math, so it lands
  nearer an fp32 reference than the foreach path does;
- ``fused.cross_entropy`` (the loss ``model.compile`` compiles at tp = 1)
  equals ``vocab_parallel_cross_entropy`` at tp = 1 in loss and gradient,
  with vocabulary padding and ignored targets;
- a compiled tiny model against the same model eager, in fp32: logits, loss
  and every gradient within TOL (inductor reorders fp32 sums; slow: the first
  compile takes tens of seconds on 2 CPU cores);
- ``model.compile=true`` through ``launch/run.py`` (real DeepSpeed, gloo) at
  tp = 2 (each collective is a graph break; the pieces between compile) and
  pp = 2 (DeepSpeed's pipeline engine): the same loss and gradient-norm curve
  as the eager tp = pp = 1 run, within the layout-invariance RTOL.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

from model_parallel.args import padded_vocab_size
from model_parallel.cross_entropy import vocab_parallel_cross_entropy
from model_parallel.fused import cross_entropy
from model_parallel.llama import Transformer, compile_model
from orchestrator.config.schema import TrainConfig
from orchestrator.runtime.engine import build_optimizer
from orchestrator.status.metrics import read_metrics
from tests.launch import run_launch
from tests.tiny import tiny_args

TOL = dict(rtol=1e-4, atol=1e-5)
SMALL = tiny_args(vocab_size=1000)  # 1,000 tokens (1,024 padded), as in the loss tests below


def _train_cfg() -> TrainConfig:
    return TrainConfig(steps=1, global_batch_size=1, lr=1e-2, weight_decay=0.1)


def _adamw_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def test_cpu_optimizer_is_fused_adamw() -> None:
    opt = build_optimizer(torch.nn.Linear(4, 3), _train_cfg())
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices, then bias


def test_fused_adamw_matches_foreach_in_fp32() -> None:
    fused_model = Transformer(SMALL, seed=0)
    foreach_model = copy.deepcopy(fused_model)
    _adamw_steps(fused_model, build_optimizer(fused_model, _train_cfg()), 5)
    opt = torch.optim.AdamW(
        [
            {
                "params": [p for p in foreach_model.parameters() if p.dim() >= 2],
                "weight_decay": 0.1,
            },
            {"params": [p for p in foreach_model.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=True,
    )
    _adamw_steps(foreach_model, opt, 5)
    for (name, a), b in zip(
        fused_model.named_parameters(), foreach_model.parameters(), strict=True
    ):
        # 5 updates of ~lr = 1e-2, each exact to an ulp of 1e-2 (~1e-9)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_fused_adamw_in_bf16_is_nearer_fp32() -> None:
    """bf16 params: fused does fp32 math and rounds once; foreach rounds every op."""
    reference = Transformer(SMALL, seed=0)
    fused_model = copy.deepcopy(reference).to(torch.bfloat16)
    foreach_model = copy.deepcopy(fused_model)
    cfg = _train_cfg()
    _adamw_steps(reference, build_optimizer(reference, cfg), 5)
    _adamw_steps(fused_model, build_optimizer(fused_model, cfg), 5)
    opt = torch.optim.AdamW(foreach_model.parameters(), lr=1e-2, betas=(0.9, 0.95), foreach=True)
    for group in opt.param_groups:  # same decay rule as build_optimizer
        group["weight_decay"] = 0.1
    _adamw_steps(foreach_model, opt, 5)

    def error(model: torch.nn.Module) -> float:
        return max(
            float((p.detach().float() - r.detach()).abs().max())
            for p, r in zip(model.parameters(), reference.parameters(), strict=True)
            if p.dim() >= 2
        )

    fused_err, foreach_err = error(fused_model), error(foreach_model)
    # Within a few bf16 roundoffs of weights ~N(0, 0.02) moved by 5 steps of lr 1e-2.
    assert fused_err < 0.01, fused_err
    assert fused_err <= foreach_err, (fused_err, foreach_err)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp1_cross_entropy_matches_vocab_parallel(dtype: torch.dtype, compiled: bool) -> None:
    vocab = 1000
    padded = padded_vocab_size(vocab, 1)  # 1024: 24 padding columns
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, padded) * 3).to(dtype)
    logits[..., vocab:] = 50.0  # padding must never count, however large
    target = torch.randint(0, vocab, (3, 7))
    target[0, :2] = -100
    grad = torch.randn(3, 7)
    results = []
    tp1 = (
        functools.partial(vocab_parallel_cross_entropy, compiled=True)
        if compiled
        else cross_entropy
    )
    for fn in (tp1, vocab_parallel_cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, target, vocab_size=vocab)
        loss.backward(grad)
        assert loss.dtype == torch.float32 and x.grad is not None and x.grad.dtype == dtype
        results.append((loss.detach(), x.grad))
    (loss, dx), (ref_loss, ref_dx) = results
    assert torch.equal(loss[0, :2], torch.zeros(2))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=2**-8)
    torch.testing.assert_close(dx.float(), ref_dx.float(), **tol)
    assert torch.equal(dx[..., vocab:], torch.zeros_like(dx[..., vocab:]))
    assert torch.equal(dx[0, :2], torch.zeros_like(dx[0, :2]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_model_matches_eager_fp32() -> None:
    eager = Transformer(SMALL, seed=0)
    compiled = copy.deepcopy(eager)
    assert compile_model(compiled) == SMALL.n_layers
    assert compiled.compiled_loss
    blocks = compiled.layers.values()
    assert all(b.attention.cpu_matmul_backward for b in blocks)  # type: ignore[union-attr]
    torch.manual_seed(0)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 17))
    target = tokens[:, 1:].clone()
    target[1, -3:] = -100
    out = []
    for model in (eager, compiled):
        for _ in range(2):  # the second call runs the compiled graphs without recompiling
            model.zero_grad(set_to_none=True)
            logits = model(tokens[:, :-1])
            loss = model.loss(logits, target).sum() / (target != -100).sum()
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        out.append((logits.detach(), loss.detach(), grads))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = out[1], out[0]
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


RUN = ["model=tiny", "data=synthetic", "data.num_samples=16", "train.steps=4"]
RUN += ["train.log_interval=1", "train.warmup_steps=2", "train.lr=3e-3"]
RTOL = 1e-4  # tests/test_train_end_to_end.py's layout invariance


def _curve(run_dir: Path, *overrides: str) -> list[tuple[float, float]]:
    run_launch(*RUN, f"run.dir={run_dir}", *overrides)
    return [(m["loss"], m["grad_norm"]) for m in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def eager_curve(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[float, float]]:
    return _curve(tmp_path_factory.mktemp("runs") / "eager", "parallel=tp1pp1")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", ["parallel=tp2pp1", "parallel=tp1pp2"])
def test_compiled_training_follows_the_eager_curve(
    layout: str, eager_curve: list[tuple[float, float]], tmp_path: Path
) -> None:
    got = _curve(tmp_path / "compiled", layout, "model.compile=true")
    assert len(got) == len(eager_curve) == 4
    for (loss, norm), (ref_loss, ref_norm) in zip(got, eager_curve, strict=True):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (got, eager_curve)
        assert abs(norm - ref_norm) <= RTOL * abs(ref_norm), (got, eager_curve)
