"""``model=pretrained``: the architecture of ``model.init_from``'s checkpoint fills the
model config; a field set to another value than the checkpoint's is one clear line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from model_parallel.args import ModelArgs, RopeScaling
from orchestrator.state.convert import hf_config
from tests.test_cli import run
from tests.test_config import load
from tests.tiny import tiny_args

# Llama 3.1's shape in miniature: GQA, an ffn multiplier, theta 500k, llama3 scaling.
ARGS = tiny_args(
    dim=96,
    n_heads=6,
    n_kv_heads=2,
    vocab_size=203,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    max_seq_len=256,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=64),
)
TRAIN = ("train.steps=1", "train.global_batch_size=8", "train.lr=1e-4")


def _hf_dir(path: Path, args: ModelArgs = ARGS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(args)))
    return path


def _shape(args: ModelArgs) -> tuple[object, ...]:
    return (
        args.dim,
        args.n_layers,
        args.n_heads,
        args.num_kv_heads,
        args.vocab_size,
        args.hidden_dim,
        args.norm_eps,
        args.rope_theta,
        args.rope_scaling,
    )


def test_hugging_face_config_fills_the_model(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "hf")
    # transformers 5 writes rope_parameters (theta and the llama3 constants inside)
    transformers = pytest.importorskip("transformers")
    written = tmp_path / "transformers"
    transformers.LlamaConfig(**hf_config(ARGS)).save_pretrained(written)
    assert "rope_parameters" in json.loads((written / "config.json").read_text())
    args = load("model=pretrained", f"model.init_from={written}", *TRAIN).model.to_args()
    assert _shape(args) == _shape(ARGS)
    cfg = load("model=pretrained", f"model.init_from={hf}", *TRAIN)
    args = cfg.model.to_args()
    assert _shape(args) == _shape(ARGS)
    assert cfg.model.max_seq_len == 64  # the pre-training context, not the scaled 256
    # A field set on the command line wins where it is not compared, agrees where it is.
    cfg = load("model=pretrained", f"model.init_from={hf}", "model.max_seq_len=128", *TRAIN)
    assert cfg.model.max_seq_len == 128
    cfg = load("model=pretrained", f"model.init_from={hf}", "model.n_kv_heads=2", *TRAIN)
    assert cfg.model.n_kv_heads == 2


def test_a_multi_head_checkpoint_without_scaling(tmp_path: Path) -> None:
    plain = dataclasses.replace(
        ARGS, n_kv_heads=None, rope_scaling=None, rope_theta=10000.0, ffn_dim_multiplier=None
    )
    cfg = load("model=pretrained", f"model.init_from={_hf_dir(tmp_path, plain)}", *TRAIN)
    args = cfg.model.to_args()
    assert _shape(args) == _shape(plain) and args.rope_scaling is None
    assert cfg.model.max_seq_len == 256  # max_position_embeddings


def test_meta_params_fill_the_model(tmp_path: Path) -> None:
    # Llama-2-70B's params.json: GQA 8 of 64 heads, width 28,672 from the multiplier.
    params = {
        "dim": 8192,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "n_heads": 64,
        "n_kv_heads": 8,
        "n_layers": 80,
        "norm_eps": 1e-05,
        "vocab_size": 32000,
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    cfg = load("model=pretrained", f"model.init_from={tmp_path}", "model.max_seq_len=4096", *TRAIN)
    args = cfg.model.to_args()
    assert (args.dim, args.n_layers, args.num_kv_heads, args.hidden_dim) == (8192, 80, 8, 28672)
    assert args.rope_scaling is None and args.rope_theta == 10000.0
    # The published config agrees with Meta's file field by field.
    assert load("model=llama2_70b", f"model.init_from={tmp_path}").model.n_kv_heads == 8
    # Meta states no context length: the one missing field is named.
    with pytest.raises(ValueError, match=r"^model.max_seq_len: must be set \(.*params.json states"):
        load("model=pretrained", f"model.init_from={tmp_path}", *TRAIN)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("model.n_kv_heads=3",),
            "model.n_kv_heads=3: the checkpoint has 2 (num_key_value_heads in ",
        ),
        (("model.rope_theta=10000",), "model.rope_theta=10000.0: the checkpoint has 500000.0"),
        (("model.multiple_of=64",), "model.multiple_of=64: with model.ffn_dim_multiplier=None"),
        (("model.rope_scaling.factor=4",), "model.rope_scaling.factor=4.0: the checkpoint has 8.0"),
    ],
)
def test_a_conflict_names_the_field_and_both_values(
    tmp_path: Path, overrides: tuple[str, ...], message: str
) -> None:
    hf = _hf_dir(tmp_path / "hf")
    with pytest.raises(ValueError) as err:
        load("model=pretrained", f"model.init_from={hf}", *overrides, *TRAIN)
    assert str(err.value).startswith(message), err.value


def test_a_named_model_against_another_checkpoint_exits_2(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path / "hf")
    result = run("model=llama3_8b", f"model.init_from={hf}", "dry_run=true")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: model.dim=4096: the checkpoint has 96 (hidden_size in {hf / 'config.json'}); "
        "drop model.dim or make them agree"
    ], lines
    assert "Traceback" not in result.stderr


def test_pretrained_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^model.init_from=None: model=pretrained reads"):
        load("model=pretrained", *TRAIN)
    with pytest.raises(ValueError, match=r"^model.init_from=.*nowhere: no such directory"):
        load("model=pretrained", f"model.init_from={tmp_path / 'nowhere'}", *TRAIN)
    with pytest.raises(ValueError, match="neither a Hugging Face"):
        load("model=pretrained", f"model.init_from={tmp_path}", *TRAIN)
