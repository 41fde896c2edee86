"""Import from and export to Hugging Face / Meta formats through real training runs.

A random ``LlamaForCausalLM`` (nothing downloaded) starts a tp2 x pp2 run;
its first loss must equal transformers' loss on the same batch. The trained
checkpoint is exported, loaded by ``from_pretrained``, and must give the same
logits as our model holding the checkpoint's weights; the export then starts
a run in another layout (weights re-sharded from tp2pp2 to tp1pp2 x dp2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_parallel.llama import Transformer
from orchestrator.data.synthetic import SyntheticData
from orchestrator.state.checkpoint import checkpoint_dir
from orchestrator.state.convert import hf_config, save_meta_checkpoint
from orchestrator.state.export import main as export_main
from orchestrator.state.weights import read_checkpoint
from orchestrator.status.metrics import read_metrics
from tests.launch import run_launch

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BASE = ["model=tiny", "data=synthetic", "train.log_interval=1"]


def _run(run_dir: Path, *overrides: str) -> None:
    run_launch(*BASE, f"run.dir={run_dir}", *overrides)


def _tiny_args():  # the config the runs use
    return load_config_from_overrides().model.to_args()


def load_config_from_overrides():
    from orchestrator.config.compose import compose_config

    return compose_config(BASE, conf_dir=REPO / "conf")


def _first_batch_loss(model: torch.nn.Module) -> float:
    """transformers' loss on the runs' first global batch (8 micro-batches of 1)."""
    cfg = load_config_from_overrides()
    data = SyntheticData(
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.model.max_seq_len,
        seed=cfg.train.seed,
        global_batch=8,
        micro_batch=1,
        dp_rank=0,
        dp_size=1,
    )
    batches = iter(data)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            inputs, labels = next(batches)
            logits = model(inputs).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0], labels[0]))
    return float(torch.stack(losses).mean())


def _random_hf(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**hf_config(_tiny_args()), attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def test_hugging_face_import_export_and_resharding(tmp_path: Path) -> None:
    hf = _random_hf(tmp_path / "hf")
    expected = _first_batch_loss(hf)

    # import into tp2 x pp2: the first step's loss is transformers' loss
    run = tmp_path / "run"
    _run(run, "parallel=tp2pp2", "train.steps=3", f"model.init_from={tmp_path / 'hf'}")
    first = read_metrics(run / "metrics.jsonl")[0]["loss"]
    assert first == pytest.approx(expected, rel=1e-5)

    # export the trained checkpoint; from_pretrained loads it and agrees on the logits
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    args = _tiny_args()
    state = read_checkpoint(checkpoint_dir(run) / "step_00000003", args, tp=2, pp=2)
    ours = Transformer(args)
    ours.load_full_state_dict(state)
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(tokens).logits, ours.gather_logits(ours(tokens)), rtol=1e-4, atol=1e-5
        )
        assert not torch.equal(
            state["layers.0.attention.wq.weight"],
            hf.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        )
    assert (tmp_path / "export" / "tokenizer.model").exists() is False  # synthetic data: none

    # the export starts a run in another layout: weights re-sharded tp2pp2 -> tp1pp2 x dp2
    resharded = tmp_path / "resharded"
    _run(
        resharded,
        "parallel=tp1pp2",
        "parallel.dp=2",
        "train.steps=1",
        f"model.init_from={tmp_path / 'export'}",
    )
    assert read_metrics(resharded / "metrics.jsonl")[0]["loss"] == pytest.approx(
        _first_batch_loss(exported), rel=1e-5
    )


def test_meta_release_import(tmp_path: Path) -> None:
    args = _tiny_args()
    hf = _random_hf(tmp_path / "hf")
    from orchestrator.state.convert import from_hf

    save_meta_checkpoint(tmp_path / "meta", args, from_hf(hf.state_dict(), args), num_shards=2)
    run = tmp_path / "run"
    _run(run, "parallel=tp2pp1", "train.steps=1", f"model.init_from={tmp_path / 'meta'}")
    assert read_metrics(run / "metrics.jsonl")[0]["loss"] == pytest.approx(
        _first_batch_loss(hf), rel=1e-5
    )


GQA = [
    "model.n_kv_heads=1",  # multi-query: at tp2 the one KV head is on both ranks
    "model.rope_theta=500000",
    "model.rope_scaling.factor=4",
    "model.rope_scaling.original_max_seq_len=32",  # below max_seq_len 128: the scaling acts
]


def test_gqa_llama3_import_into_a_pipeline_and_export(tmp_path: Path) -> None:
    """A random LlamaForCausalLM with one KV head and llama3 rope scaling starts a
    tp2 x pp2 run from ``model=pretrained`` (each stage loads its replicated K/V from
    the full tensors): the first loss is transformers'; the checkpoint, merged with one copy per KV head,
    exports to a model from_pretrained loads and that agrees with ours."""
    from orchestrator.config.compose import compose_config

    args = compose_config([*BASE, *GQA], conf_dir=REPO / "conf").model.to_args()
    assert args.num_kv_heads == 1 and args.rope_scaling is not None
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**hf_config(args), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)

    # model=pretrained: the architecture (GQA, theta, llama3 scaling) from its config.json
    run = tmp_path / "run"
    run_launch(
        "model=pretrained",
        f"model.init_from={tmp_path / 'hf'}",
        "model.max_seq_len=128",  # the runs' context (the checkpoint's is 32)
        "data=synthetic",
        "train.log_interval=1",
        "train.global_batch_size=8",
        "train.lr=3e-3",
        "train.precision=fp32",
        "parallel=tp2pp2",
        "train.steps=1",
        f"run.dir={run}",
    )
    assert read_metrics(run / "metrics.jsonl")[0]["loss"] == pytest.approx(
        _first_batch_loss(hf), rel=1e-5
    )
    assert export_main([str(run), str(tmp_path / "export")]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.num_key_value_heads == 1
    assert exported.config.rope_scaling["rope_type"] == "llama3"
    state = read_checkpoint(checkpoint_dir(run) / "step_00000001", args, tp=2, pp=2)
    assert state["layers.0.attention.wk.weight"].shape == (args.head_dim, args.dim)
    ours = Transformer(args)
    ours.load_full_state_dict(state)
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(tokens).logits, ours.gather_logits(ours(tokens)), rtol=1e-4, atol=1e-5
        )
