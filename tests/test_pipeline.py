"""``model_parallel.pipeline``: the one way the model is carved into stages, on gloo.

Each rank builds only its stage of ``LlamaPipeline`` (a plan's uneven split),
runs its layers by hand, and passes the hidden state (forward) and its
gradient (backward) to the neighbouring stage with point-to-point sends, so
the carving is checked without DeepSpeed's pipeline schedule. The reference
is the whole ``Transformer`` in one process: the logits, the loss and every
parameter's gradient must match it, at tp = 1 bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks
from tests.tiny import tiny_args

pytestmark = pytest.mark.timeout(300)

TINY = tiny_args(n_layers=4)  # uneven stages: 1 + 3 layers at pp = 2, 2 + 1 + 1 at pp = 3
SEED = 3


def _tokens() -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, 17), generator=torch.Generator().manual_seed(8))


def _dense() -> dict[str, Any]:
    """The whole model in one process: logits, loss and every gradient (Meta's names)."""
    from model_parallel.cross_entropy import masked_mean
    from model_parallel.llama import Transformer

    model = Transformer(TINY, seed=SEED)
    tokens = _tokens()
    logits = model(tokens[:, :-1])
    loss = masked_mean(model.loss(logits, tokens[:, 1:]), tokens[:, 1:])
    loss.backward()
    grads = model.full_state_dict(grads=True)
    return {"logits": logits[..., : TINY.vocab_size].detach(), "loss": loss.item(), "grads": grads}


def _stage(rank: int, ws: int, tp: int, stage_layers: tuple[tuple[int, int], ...]) -> dict:
    os.environ["LOCAL_RANK"] = str(rank)
    from model_parallel.groups import ProcessGroups
    from model_parallel.layout import Layout
    from model_parallel.mappings import gather_from_tp_region
    from model_parallel.pipeline import BlockPipe, LlamaPipeline, stage_modules, stage_state_dict
    from orchestrator.runtime.engine import init_deepspeed_comm

    init_deepspeed_comm()
    pp = len(stage_layers)
    groups = ProcessGroups.build(Layout(tp=tp, pp=pp, dp=ws // (tp * pp)))
    pipeline = LlamaPipeline(TINY, groups=groups, stage_layers=stage_layers, seed=SEED)
    stage = groups.coords.pp_rank
    modules = list(stage_modules(pipeline))
    blocks = [m.layer_id for m in modules if isinstance(m, BlockPipe)]

    tokens = _tokens()
    prev = groups.pp_ranks[stage - 1] if stage > 0 else None
    nxt = groups.pp_ranks[stage + 1] if stage < pp - 1 else None
    hidden_shape = (*tokens[:, :-1].shape, TINY.dim)
    if prev is None:
        h_in: torch.Tensor = tokens[:, :-1]
    else:
        h_in = torch.empty(hidden_shape)
        dist.recv(h_in, prev)
        h_in.requires_grad_(True)
    h = h_in
    for module in modules:
        h = module(h)
    out: dict[str, Any] = {"stage": stage, "blocks": blocks, "tp_rank": groups.coords.tp_rank}
    if nxt is not None:
        dist.send(h.detach().contiguous(), nxt)
        grad = torch.empty(hidden_shape)
        dist.recv(grad, nxt)
        h.backward(grad)
    else:
        loss = pipeline.loss_fn(h, tokens[:, 1:])
        loss.backward()
        logits = gather_from_tp_region(h.detach(), groups.tp_group)[..., : TINY.vocab_size]
        out.update(loss=loss.item(), logits=logits)
    if prev is not None:
        assert h_in.grad is not None
        dist.send(h_in.grad.contiguous(), prev)
    out["grads"] = stage_state_dict(pipeline, grads=True)  # full tensors, Meta names
    return out


@pytest.mark.parametrize(
    "tp,stage_layers",
    [(1, ((0, 0), (1, 3))), (1, ((0, 1), (2, 2), (3, 3))), (2, ((0, 2), (3, 3)))],
    ids=["pp2-uneven", "pp3", "tp2pp2"],
)
def test_stages_chain_to_the_whole_model(tp: int, stage_layers: tuple) -> None:
    ws = tp * len(stage_layers)
    dense = _dense()
    results = run_ranks(_stage, ws, tp, stage_layers)
    exact = tp == 1  # tp splits the reductions, so the sums are grouped differently
    tol: dict[str, float] = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    # every stage holds the blocks of its split, and nothing else
    for got in results:
        first, last = stage_layers[got["stage"]]
        assert got["blocks"] == list(range(first, last + 1)), got["blocks"]
    last_stage = [r for r in results if "loss" in r]
    assert {r["stage"] for r in last_stage} == {len(stage_layers) - 1}
    for got in last_stage:
        torch.testing.assert_close(got["logits"], dense["logits"], **tol)
        assert got["loss"] == pytest.approx(dense["loss"], rel=0 if exact else 1e-6)
    # between them, the stages hold every parameter once, with the dense gradient
    seen: dict[str, torch.Tensor] = {}
    for got in results:
        for name, grad in got["grads"].items():
            if got["tp_rank"] == 0:
                assert name not in seen, f"{name} on two stages"
                seen[name] = grad
    assert sorted(seen) == sorted(dense["grads"])
    for name, grad in seen.items():
        torch.testing.assert_close(grad, dense["grads"][name], **tol, msg=name)
