"""The SentencePiece tokenizer: LLaMA's training settings, byte fallback, the CLI.

Tokenizers are trained on small generated corpora in temporary directories.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.data import tokenizer as tokenizer_module
from orchestrator.data.tokenizer import Tokenizer, train_tokenizer

_SYLLABLES = ["ka", "to", "ri", "en", "an", "the", "ing", "ion", "er", "st", "ou", "pre", "con"]


def make_documents(num_docs: int, *, seed: int = 0) -> list[str]:
    """Pseudo-English documents: paragraphs of made-up words, numbers, punctuation."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(num_docs):
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            sentence = " ".join(rng.choices(words, k=rng.randint(3, 25)))
            paragraphs.append(f"{sentence.capitalize()} {rng.randint(0, 99999)}.")
        docs.append("\n\n".join(paragraphs))
    return docs


def write_jsonl(path: Path, texts: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "id": i, "meta": {"source": "test"}}) + "\n")
    return path


def train_small_tokenizer(directory: Path, *, vocab_size: int = 600) -> Path:
    corpus = write_jsonl(directory / "corpus.jsonl", make_documents(400))
    return train_tokenizer(
        [corpus], directory / "tok", vocab_size=vocab_size, sample_size=10_000, threads=2
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_llama_special_ids(tokenizer: Tokenizer) -> None:
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.pad_id == -1
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tokenizer.vocab_size == 600
    # byte fallback: the 256 byte pieces follow the specials
    assert [tokenizer.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]


def test_digits_are_split(tokenizer: Tokenizer) -> None:
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("12345")]
    assert pieces[-5:] == ["1", "2", "3", "4", "5"]
    assert pieces[:-5] in ([], ["▁"])  # the dummy-prefix space, if not merged


@pytest.mark.parametrize("text", ["😀", "漢字 and ünïcödé", "tab\there", "\u200b\x00"])
def test_unseen_characters_round_trip_through_bytes(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert 0 not in ids  # never <unk>: unseen characters become byte pieces
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "Kato rien preing 42.",
        " leading space, two  spaces,   three",
        "lines\nand\n\nparagraphs\r\n",
        "trailing spaces   ",
        "",
    ],
)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bos_and_eos(tokenizer: Tokenizer) -> None:
    plain = tokenizer.encode("katoen")
    assert tokenizer.encode("katoen", bos=True, eos=True) == [1, *plain, 2]
    assert tokenizer.decode([1, *plain, 2]) == "katoen"


def test_encode_batch_equals_encode(tokenizer: Tokenizer) -> None:
    texts = make_documents(50, seed=1) + ["", "😀 12"]
    expected = [tokenizer.encode(text, eos=True) for text in texts]
    assert tokenizer.encode_batch(texts, eos=True, num_threads=2) == expected
    assert tokenizer.encode_batch(texts, eos=True, num_threads=1) == expected


def test_small_corpus_gives_smaller_vocab(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    model = train_tokenizer(
        [corpus], tmp_path / "tok", vocab_size=5000, sample_size=1000, threads=1
    )
    vocab_size = Tokenizer(model).vocab_size
    assert 259 < vocab_size < 5000
    assert f"vocabulary of {vocab_size} pieces, fewer than the 5000" in caplog.text


def test_trains_on_gzipped_plain_text(tmp_path: Path) -> None:
    import gzip

    with gzip.open(tmp_path / "corpus.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(make_documents(100)))
    model = train_tokenizer(
        [tmp_path / "corpus.txt.gz"], tmp_path / "tok", vocab_size=400, sample_size=1000, threads=1
    )
    assert model == tmp_path / "tok.model"
    assert (tmp_path / "tok.vocab").is_file()
    assert Tokenizer(model).vocab_size == 400


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "0"], "error: vocab_size=0: must be >= 1"),
        (["--vocab-size", "x"], "error: argument --vocab-size: invalid int value: 'x'"),
        (["--vocab-size", "100"], "error: sentencepiece training failed: Vocabulary size"),
        (["--vocab-size", "400", "--sample-size", "100"], "error: sample_size=100: must be > 100"),
    ],
)
def test_cli_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(20))
    argv = ["train", "--input", str(corpus), "--output", str(tmp_path / "tok"), *args]
    assert tokenizer_module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message), err
    assert not (tmp_path / "tok.model").exists()


@pytest.mark.timeout(120)
def test_cli(tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(100))
    command = [sys.executable, "-m", "orchestrator.data.tokenizer", "train"]
    output = ["--output", str(tmp_path / "out" / "tok")]
    ok = subprocess.run(
        [*command, "--input", str(corpus), *output, "--vocab-size", "400", "--threads", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"wrote {tmp_path / 'out' / 'tok.model'} (vocab_size=400)"
    missing = subprocess.run(
        [*command, "--input", str(tmp_path / "nope.jsonl"), *output, "--vocab-size", "400"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'nope.jsonl'}: no such file"]
