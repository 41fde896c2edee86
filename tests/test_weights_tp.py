"""``orchestrator.state.weights``' split axes come from what the layers record."""

from __future__ import annotations

import pytest

from model_parallel.args import ModelArgs
from model_parallel.layers import is_sharded
from model_parallel.llama import Transformer
from orchestrator.state.weights import tp_dim
from tests.tiny import tiny_args


@pytest.mark.parametrize(
    "args",
    [
        tiny_args(n_layers=3, max_seq_len=2048),
        # 8 query heads on 2 KV heads: wk/wv narrower than wq
        tiny_args(n_heads=8, n_kv_heads=2, vocab_size=1000, multiple_of=48, max_seq_len=2048),
    ],
    ids=["mha", "gqa"],
)
def test_tp_dim_is_the_axis_every_layer_records(args: ModelArgs) -> None:
    model = Transformer(args)
    for name, param in model.named_parameters():
        expected = param.partition_dim if is_sharded(param) else None
        assert tp_dim(name) == expected, name
    # the row-parallel layers split their input axis, the rest their output axis
    assert tp_dim("layers.1.attention.wo.weight") == 1
    assert tp_dim("layers.1.feed_forward.w2.weight") == 1
    assert tp_dim("output.weight") == 0
    assert tp_dim("layers.0.attention_norm.weight") is None
