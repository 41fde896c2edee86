"""SentencePiece BPE tokenizer with the LLaMA paper's settings.

LLaMA (Touvron et al., 2023, section 2.1) tokenizes with SentencePiece BPE,
splits all numbers into single digits and falls back to bytes for unknown
UTF-8 characters. ``train_tokenizer`` reproduces the trainer settings of
Meta's ``tokenizer.model`` (read from its proto): identity normalization (no
NFKC), a dummy prefix space, whitespace kept as it is, ids
``unk=0, bos=1, eos=2`` and no pad id. ``Tokenizer`` loads any SentencePiece
``.model`` file, ours or Meta's unchanged.

``load_tokenizer`` opens either kind by its file name: a ``tokenizer.json``
(or a folder holding one: Llama 3's Hugging Face tokenizer, see
``orchestrator.data.hf_tokenizer``) or a SentencePiece ``.model``. Both offer
the ``TextTokenizer`` interface.

Command line::

    python -m orchestrator.data.tokenizer train --input FILE [FILE ...] \\
        --output PREFIX --vocab-size N [--sample-size N] [--threads N] \\
        [--text-split {file,lines}]

It reads the inputs ``orchestrator.data.preprocess`` accepts and writes
``PREFIX.model`` and ``PREFIX.vocab``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm

log = logging.getLogger("orchestrator.data.tokenizer")

# Meta's tokenizer.model trainer_spec, less the corpus-specific fields.
LLAMA_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.99995,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}
# SentencePiece skips training sentences longer than this (its default, 4192
# bytes, drops many real paragraphs); documents are fed line by line.
MAX_SENTENCE_BYTES = 1 << 16


class TextTokenizer(Protocol):
    """What the preprocessor, the vocabulary check and the Alpaca source use."""

    model_path: Path

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def tokenizer_file(path: str | Path) -> Path:
    """The file ``path`` names: itself, or a folder's ``tokenizer.json``."""
    path = Path(path)
    if path.is_dir():
        inside = path / "tokenizer.json"
        if not inside.is_file():
            raise FileNotFoundError(f"{path}: a folder without tokenizer.json")
        return inside
    return path


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A Hugging Face tokenizer for ``*.json`` (or a folder holding tokenizer.json),
    else a SentencePiece model."""
    file = tokenizer_file(path)
    if file.suffix == ".json":
        from orchestrator.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(file)
    return Tokenizer(file)


class Tokenizer:
    """A loaded SentencePiece model: text to ids and back."""

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return int(self.sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_id(self) -> int:
        """-1 for LLaMA's tokenizers: they have no pad token."""
        return int(self.sp.pad_id())

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.sp.encode(text, out_type=int, add_bos=bos, add_eos=eos)

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """``[encode(t) for t in texts]``, encoded by ``num_threads`` C++ threads.

        One call for the whole batch avoids a Python round trip per text,
        which alone makes it many times faster than a loop even on one thread.
        """
        return self.sp.encode(
            list(texts), out_type=int, add_bos=bos, add_eos=eos, num_threads=num_threads
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


def train_tokenizer(
    inputs: Sequence[Path],
    model_prefix: Path,
    *,
    vocab_size: int,
    sample_size: int = 1_000_000,
    threads: int = 1,
    text_split: str = "file",
) -> Path:
    """Train a BPE model with the LLaMA settings; returns ``model_prefix.model``.

    Documents are read as ``orchestrator.data.preprocess`` reads them
    (malformed records are skipped) and fed one non-empty line at a time;
    SentencePiece keeps a uniform sample of ``sample_size`` lines. The model
    is reproducible when the inputs have at most ``sample_size`` lines; above
    that SentencePiece's sample differs from run to run (0.2.3, even after
    ``set_random_generator_seed``).
    ``vocab_size`` is a maximum: a corpus too small to learn that many pieces
    gives a smaller vocabulary (logged) instead of failing.
    """
    # The preprocessor owns the input formats; imported here because it
    # imports this module.
    from orchestrator.data.documents import check_inputs

    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 1")
    if sample_size <= 100:
        raise ValueError(f"sample_size={sample_size}: must be > 100 (sentencepiece's minimum)")
    if threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1")
    check_inputs(inputs, text_split=text_split)
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(inputs, text_split=text_split),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            input_sentence_size=sample_size,
            shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads,
            minloglevel=2,
            **LLAMA_TRAINER_SETTINGS,
        )
    except RuntimeError as e:
        # "INTERNAL: src/trainer_interface.cc(638) [check] Vocabulary size is ..."
        message = str(e).strip().splitlines()[-1]
        message = message.rpartition("] ")[2] or message
        raise ValueError(f"sentencepiece training failed: {message}") from None
    model_path = Path(f"{model_prefix}.model")
    trained = Tokenizer(model_path).vocab_size
    if trained < vocab_size:
        log.warning(
            "%s: vocabulary of %d pieces, fewer than the %d asked for (the corpus is too small)",
            model_path,
            trained,
            vocab_size,
        )
    return model_path


def _training_lines(inputs: Sequence[Path], *, text_split: str) -> Iterator[str]:
    from orchestrator.data.documents import read_documents

    for text in read_documents(inputs, text_split=text_split):
        for line in text.splitlines():
            if line.strip():
                yield line


class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(prog="python -m orchestrator.data.tokenizer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a LLaMA-style BPE tokenizer")
    train.add_argument("--input", nargs="+", type=Path, required=True, metavar="FILE")
    train.add_argument("--output", type=Path, required=True, metavar="PREFIX")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--sample-size", type=int, default=1_000_000, help="lines sampled")
    train.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    train.add_argument("--text-split", choices=["file", "lines"], default="file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        args = _parse_args(argv)
        model_path = train_tokenizer(
            args.input,
            args.output,
            vocab_size=args.vocab_size,
            sample_size=args.sample_size,
            threads=args.threads,
            text_split=args.text_split,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer(model_path)
    print(f"wrote {model_path} (vocab_size={tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
