"""A Hugging Face ``tokenizer.json`` (Llama 3's byte-level BPE) behind ``Tokenizer``'s interface.

Llama 3 ships no SentencePiece model: its tokenizer is a ``tokenizer.json``
(128,000 BPE tokens over bytes plus 256 special tokens). ``HFTokenizer``
loads one with the ``tokenizers`` library and offers what the preprocessor,
the vocabulary check and the Alpaca source use: ``vocab_size``,
``encode``/``encode_batch``, ``decode`` and ``bos_id``/``eos_id``.

bos and eos come from ``tokenizer_config.json`` next to the file
(``bos_token``/``eos_token``) when it names them, else from the first
special token known to the tokenizer among ``<|begin_of_text|>``/``<s>``
(bos) and ``<|end_of_text|>``/``</s>`` (eos).

Special tokens written in a document's text are encoded as plain text, as
Meta's Llama 3 tokenizer does for pretraining data (``allowed_special=()``):
a document cannot end itself by containing ``<|end_of_text|>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

# Special tokens that mean bos / eos, in order of preference.
KNOWN_BOS = ("<|begin_of_text|>", "<s>")
KNOWN_EOS = ("<|end_of_text|>", "</s>")


class HFTokenizer:
    """A loaded ``tokenizer.json``: text to ids and back."""

    def __init__(self, path: str | Path) -> None:
        self.model_path = Path(path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: tokenizer file not found")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(self.model_path))
        except Exception as e:  # tokenizers raises plain Exception
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.model_path}: not a tokenizer.json ({message})") from None
        self.tok.encode_special_tokens = True  # "<|end_of_text|>" in a text is text
        self._vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        named = _config_tokens(self.model_path.with_name("tokenizer_config.json"))
        self._bos_id = self._special_id("bos_token", named.get("bos_token"), KNOWN_BOS)
        self._eos_id = self._special_id("eos_token", named.get("eos_token"), KNOWN_EOS)

    def _special_id(self, field: str, named: str | None, known: Sequence[str]) -> int:
        candidates = [named] if named is not None else list(known)
        for token in candidates:
            token_id = self.tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        where = f"tokenizer_config.json's {field}={named!r}" if named else f"none of {list(known)}"
        raise ValueError(
            f"{field}: {self.model_path} has no {field.split('_')[0]} token "
            f"({where} is in its vocabulary); name it in tokenizer_config.json next to it"
        )

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: the largest id + 1, special tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """-1: Llama 3 has no pad token."""
        return -1

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos=bos, eos=eos)

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """``[encode(t) for t in texts]``; on the library's thread pool when ``num_threads > 1``.

        ``tokenizers`` sizes its pool itself (``RAYON_NUM_THREADS``, all cores
        by default), so ``num_threads=1`` (what each preprocessing worker
        asks) encodes in this thread: a pool per worker would oversubscribe.
        """
        if num_threads == 1:
            return [self.encode(text, bos=bos, eos=eos) for text in texts]
        encodings = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos=bos, eos=eos) for e in encodings]

    def _wrap(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        return ([self._bos_id] if bos else []) + ids + ([self._eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tok.id_to_token(int(token_id))
        if piece is None:
            raise IndexError(f"token id {token_id}: outside the vocabulary of {self.vocab_size}")
        return piece


def _config_tokens(path: Path) -> dict[str, str]:
    """``bos_token``/``eos_token`` named in ``tokenizer_config.json`` (absent: none)."""
    if not path.is_file():
        return {}
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    found: dict[str, str] = {}
    for field in ("bos_token", "eos_token"):
        value = config.get(field) if isinstance(config, dict) else None
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            found[field] = value
    return found
