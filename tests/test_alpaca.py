"""Alpaca instruction data: the prompt template and a loss mask on exactly the response."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data import IGNORE_INDEX
from orchestrator.data.alpaca import (
    PROMPT_NO_INPUT,
    AlpacaSource,
    encode_example,
    load_records,
    prompt_for,
)
from orchestrator.data.tokenizer import Tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "demo" / "tokenizer.model"
RECORDS = [
    {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "Eat well, sleep, move.",
    },
    {
        "instruction": "Translate to French.",
        "input": "Good morning",
        "output": "Bonjour",
    },
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "12 + 30 = 42"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(TOKENIZER)


def test_prompt_template() -> None:
    assert prompt_for(RECORDS[0]) == PROMPT_NO_INPUT.format(instruction=RECORDS[0]["instruction"])
    with_input = prompt_for(RECORDS[1])
    assert "### Input:\nGood morning\n\n### Response:\n" in with_input
    assert with_input.startswith(
        "Below is an instruction that describes a task, paired with an input"
    )


@pytest.mark.parametrize("record", RECORDS, ids=["no-input", "input", "digits"])
def test_mask_covers_exactly_the_response(record: dict[str, str], tokenizer: Tokenizer) -> None:
    tokens, mask = encode_example(record, tokenizer)
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
    # the unmasked tokens decode to the response, followed by </s>
    response = [int(t) for t in tokens[mask]]
    assert response[-1] == tokenizer.eos_id
    assert tokenizer.decode(response[:-1]).strip() == record["output"]
    # and the masked ones to <s> + the prompt
    prompt = [int(t) for t in tokens[~mask]]
    assert prompt[0] == tokenizer.bos_id
    assert tokenizer.decode(prompt[1:]) == prompt_for(record)
    assert mask[: len(prompt)].sum() == 0 and mask[len(prompt) :].all()


@pytest.mark.parametrize("packing", [False, True])
def test_labels_carry_loss_only_on_responses(packing: bool, tokenizer: Tokenizer) -> None:
    encoded = [encode_example(r, tokenizer) for r in RECORDS]
    seq_len = 256 if not packing else 32  # padded: whole examples; packed: across samples
    source = AlpacaSource(
        RECORDS,
        tokenizer,
        seq_len=seq_len,
        packing=packing,
        seed=0,
        global_batch=3,
        micro_batch=3,
        dp_rank=0,
        dp_size=1,
    )
    inputs, labels = next(iter(source))
    assert inputs.shape == labels.shape == (3, seq_len)
    keep = labels != IGNORE_INDEX
    # a labelled position predicts the next input token
    assert np.array_equal(labels[:, :-1][keep[:, :-1]], inputs[:, 1:][keep[:, :-1]])
    if not packing:
        # one epoch of padded examples: exactly the response tokens of each, once
        assert int(keep.sum()) == sum(int(m[1:].sum()) for _, m in encoded)
        assert sorted(labels[keep].tolist()) == sorted(
            int(t) for tokens, m in encoded for t in tokens[1:][m[1:]]
        )
    else:
        packed_tokens, packed_mask = source._pack_epoch(0)
        for row in range(3):
            start = row * seq_len
            expected = packed_mask[start + 1 : start + seq_len + 1]
            assert np.array_equal(keep[row].numpy(), expected)


def test_padded_examples_are_whole_and_masked(tokenizer: Tokenizer) -> None:
    source = AlpacaSource(
        RECORDS,
        tokenizer,
        seq_len=256,
        packing=False,
        seed=0,
        global_batch=3,
        micro_batch=3,
        dp_rank=0,
        dp_size=1,
    )
    for k in range(3):
        tokens, mask = source.sample(k)
        example = next(
            e
            for e in (encode_example(r, tokenizer) for r in RECORDS)
            if np.array_equal(e[0], tokens[: len(e[0])])
        )
        n = len(example[0])
        assert np.array_equal(mask[:n], example[1]) and not mask[n:].any()
        assert (tokens[n:] == tokenizer.eos_id).all()


def test_load_records_json_array_and_lines(tmp_path: Path) -> None:
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(RECORDS))
    lines = tmp_path / "alpaca.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert load_records(array) == load_records(lines) == RECORDS
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(ValueError, match="record 0: 'output' must be a string"):
        load_records(bad)
