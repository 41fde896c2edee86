"""Instruction tuning on Alpaca-format records (``instruction``, ``input``, ``output``).

Each record becomes ``<s> prompt response </s>`` with the Stanford Alpaca
prompt template; loss is taken on the response and ``</s>`` only (the prompt
tokens are masked). Examples are either padded to ``seq_len + 1`` one per
sample (truncated when longer), or packed back to back across sample
boundaries. The order is a seeded permutation per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from orchestrator.data import SampleSource

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class TextEncoder(Protocol):
    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...


def prompt_for(record: dict[str, Any]) -> str:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def load_records(path: Path) -> list[dict[str, Any]]:
    """A JSON array (alpaca_data.json) or JSON lines; each record needs instruction and output."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, record in enumerate(records):
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{path}: record {i}: '{key}' must be a string")
    return records


def encode_example(record: dict[str, Any], tokenizer: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask (True on the response and ``</s>``) of one record.

    As Stanford's Alpaca code does, the prompt is encoded alone and as the
    start of the full text, and the prompt's length decides the mask.
    """
    prompt = prompt_for(record)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    full_ids = tokenizer.encode(prompt + record["output"], bos=True, eos=True)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # The tokeniser merged across the boundary: encode the parts separately.
        full_ids = prompt_ids + tokenizer.encode(record["output"], eos=True)
    mask = np.zeros(len(full_ids), dtype=bool)
    mask[len(prompt_ids) :] = True
    return np.asarray(full_ids, dtype=np.int64), mask


class AlpacaSource(SampleSource):
    """Micro-batches of Alpaca examples, padded (one per sample) or packed."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        tokenizer: TextEncoder,
        *,
        seq_len: int,
        packing: bool,
        seed: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        super().__init__(
            global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
        )
        if not records:
            raise ValueError("no Alpaca records")
        self.examples = [encode_example(r, tokenizer) for r in records]
        self.seq_len = seq_len
        self.packing = packing
        self.seed = seed
        self.pad_id = tokenizer.eos_id  # LLaMA has no pad token; padded positions carry no loss
        self._packed_epoch = -1
        self._packed: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, bool))

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def _pack_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch != self._packed_epoch:
            order = self._order(epoch)
            tokens = np.concatenate([self.examples[i][0] for i in order])
            mask = np.concatenate([self.examples[i][1] for i in order])
            self._packed, self._packed_epoch = (tokens, mask), epoch
        return self._packed

    def _packed_per_epoch(self) -> int:
        return (sum(len(t) for t, _ in self.examples) - 1) // self.seq_len

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        width = self.seq_len + 1
        if self.packing:
            epoch, j = divmod(index, self._packed_per_epoch())
            tokens, mask = self._pack_epoch(epoch)
            start = j * self.seq_len
            return tokens[start : start + width], mask[start : start + width]
        epoch, j = divmod(index, len(self.examples))
        tokens, mask = self.examples[int(self._order(epoch)[j])]
        tokens, mask = tokens[:width], mask[:width]
        pad = width - len(tokens)
        return (
            np.concatenate([tokens, np.full(pad, self.pad_id, dtype=np.int64)]),
            np.concatenate([mask, np.zeros(pad, dtype=bool)]),
        )
