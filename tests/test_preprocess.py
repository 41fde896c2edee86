"""Preprocessing: raw documents to an indexed shard, with its failure modes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data import preprocess as preprocess_module
from orchestrator.data.indexed import IndexedDataset, IndexedDatasetWriter, shard_paths
from orchestrator.data.preprocess import MalformedInputError, Summary, preprocess
from orchestrator.data.tokenizer import Tokenizer
from tests.test_tokenizer import make_documents, train_small_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def decoded_documents(prefix: Path, model: Path) -> list[str]:
    """Each document of the shard decoded, after checking it ends in exactly one </s>."""
    tokenizer = Tokenizer(model)
    texts = []
    for tokens in IndexedDataset(prefix):
        assert tokens[-1] == tokenizer.eos_id
        assert tokenizer.eos_id not in tokens[:-1]
        texts.append(tokenizer.decode(tokens[:-1].tolist()))
    return texts


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".idx", ".tmp"))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.timeout(60)
def test_round_trip(tmp_path: Path, model: Path, workers: int) -> None:
    texts = [*make_documents(300), "😀 unseen 漢字", " leading space\r\nand\ttabs  "]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    summary = preprocess([corpus], tmp_path / "out", model, workers=workers, batch_size=16)
    assert decoded_documents(tmp_path / "out", model) == texts
    assert (summary.num_records, summary.num_documents) == (len(texts), len(texts))
    assert (summary.num_empty, summary.num_malformed) == (0, 0)
    assert summary.num_text_bytes == sum(len(t.encode()) for t in texts)
    assert summary.num_tokens == IndexedDataset(tmp_path / "out").num_tokens
    assert leftovers(tmp_path) == ["out.bin", "out.idx"]


def test_index_agrees_with_bin(tmp_path: Path, model: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(100))
    preprocess([corpus], tmp_path / "out", model, batch_size=7)
    dataset = IndexedDataset(tmp_path / "out")
    bin_path, _ = shard_paths(tmp_path / "out")
    assert dataset.dtype == np.uint16  # a vocabulary of 600
    assert len(dataset) == 100
    assert dataset.pointers[0] == 0 and np.all(dataset.doc_lengths >= 2)
    assert dataset.doc_lengths.sum() == bin_path.stat().st_size // dataset.dtype.itemsize
    tokens = np.fromfile(bin_path, dtype=dataset.dtype)
    ends = (dataset.pointers // dataset.dtype.itemsize) + dataset.lengths
    assert np.array_equal(np.flatnonzero(tokens == 2) + 1, ends)  # </s> ends each


@pytest.mark.timeout(60)
def test_shard_does_not_depend_on_workers_or_batch_size(tmp_path: Path, model: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(500, seed=3))
    runs = [(1, 256), (2, 256), (2, 1), (2, 33)]
    for workers, batch_size in runs:
        prefix = tmp_path / f"w{workers}b{batch_size}"
        preprocess([corpus], prefix, model, workers=workers, batch_size=batch_size)
    reference = [p.read_bytes() for p in shard_paths(tmp_path / "w1b256")]
    for workers, batch_size in runs[1:]:
        assert [p.read_bytes() for p in shard_paths(tmp_path / f"w{workers}b{batch_size}")] == (
            reference
        )


def test_gzip_and_several_inputs_keep_order(tmp_path: Path, model: Path) -> None:
    first, second = make_documents(30, seed=1), make_documents(20, seed=2)
    write_jsonl(tmp_path / "a.jsonl", first)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in second)
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]
    summary = preprocess(inputs, tmp_path / "out", model, batch_size=8)
    assert decoded_documents(tmp_path / "out", model) == first + second
    assert summary.bytes_read == summary.input_bytes


def test_plain_text(tmp_path: Path, model: Path) -> None:
    texts = make_documents(3, seed=4)
    (tmp_path / "a.txt").write_text(texts[0] + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(texts[1])
    (tmp_path / "empty.txt").write_bytes(b"")
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "empty.txt"]
    summary = preprocess(inputs, tmp_path / "files", model)
    assert decoded_documents(tmp_path / "files", model) == [texts[0] + "\n", texts[1]]
    assert (summary.num_records, summary.num_documents, summary.num_empty) == (3, 2, 1)

    (tmp_path / "lines.txt").write_bytes(b"one line\r\n\ntwo lines\nlast, no newline")
    summary = preprocess([tmp_path / "lines.txt"], tmp_path / "lines", model, text_split="lines")
    assert decoded_documents(tmp_path / "lines", model) == [
        "one line",
        "two lines",
        "last, no newline",
    ]
    assert (summary.num_records, summary.num_documents, summary.num_empty) == (4, 3, 1)


MALFORMED_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "broken', "invalid JSON"),
    (b'{"id": 3}', "no 'text' field"),
    (b'{"text": 42}', "'text' is a number, not a string"),
    (b'{"text": null}', "'text' is null, not a string"),
    (b'["text"]', "not a JSON object but an array"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid UTF-8 (byte 0xff at column 15)"),
    (b'{"text": "lone \\ud800"}', "'text' has a lone surrogate"),
    (b"", None),  # blank: counted as empty
    (b'{"text": ""}', None),  # empty text
    (b'{"text": "good two", "other": [1, 2]}', None),
]


def write_malformed(path: Path) -> Path:
    path.write_bytes(b"\n".join(line for line, _ in MALFORMED_LINES) + b"\n")
    return path


def test_malformed_lines_are_reported_and_skipped(tmp_path: Path, model: Path) -> None:
    corpus = write_malformed(tmp_path / "bad.jsonl")
    summary = preprocess([corpus], tmp_path / "out", model, batch_size=4)
    assert decoded_documents(tmp_path / "out", model) == ["good one", "good two"]
    expected = [(n, r) for n, (_, r) in enumerate(MALFORMED_LINES, 1) if r is not None]
    assert [(m.path, m.line) for m in summary.malformed] == [(str(corpus), n) for n, _ in expected]
    for malformed, (_, reason) in zip(summary.malformed, expected, strict=True):
        assert malformed.reason.startswith(reason), malformed
    assert (summary.num_documents, summary.num_empty, summary.num_malformed) == (2, 2, 7)
    assert summary.num_records == len(MALFORMED_LINES)


def test_invalid_utf8_in_a_text_file_names_its_line(tmp_path: Path, model: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"fine\nstill fine\nnot \xc3 fine\n")
    summary = preprocess([tmp_path / "a.txt"], tmp_path / "out", model)
    assert [str(m) for m in summary.malformed] == [
        f"{tmp_path / 'a.txt'}:3: invalid UTF-8 (byte 0xc3 at column 5)"
    ]
    assert summary.num_documents == 0


def test_reports_only_the_first_malformed_then_counts(tmp_path: Path, model: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{oops\n" * 25 + '{"text": "ok"}\n')
    summary = preprocess([tmp_path / "bad.jsonl"], tmp_path / "out", model, batch_size=4)
    assert summary.num_malformed == 25
    assert [m.line for m in summary.malformed] == list(range(1, 11))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.timeout(60)
def test_strict_fails_and_leaves_nothing(tmp_path: Path, model: Path, workers: int) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(50))
    with corpus.open("ab") as f:
        f.write(b'{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(MalformedInputError, match=r"c\.jsonl:52: 'text' is a number"):
        preprocess([corpus], tmp_path / "out", model, workers=workers, batch_size=8, strict=True)
    assert leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_interrupted_run_leaves_no_shard(tmp_path: Path, model: Path) -> None:
    corpus = write_jsonl(tmp_path / "c.jsonl", make_documents(200))

    def interrupt(summary: Summary) -> None:
        if summary.num_documents >= 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        preprocess(
            [corpus], tmp_path / "out", model, workers=2, batch_size=10, on_progress=interrupt
        )
    assert leftovers(tmp_path) == []


def test_aborted_writer_leaves_no_idx(tmp_path: Path) -> None:
    writer = IndexedDatasetWriter(tmp_path / "out", vocab_size=100)
    writer.add_document([1, 2, 3])
    assert leftovers(tmp_path) == ["out.bin.tmp"]  # nothing that looks finished
    writer.abort()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "error: workers=0: must be >= 1"),
        (["--batch-size", "0"], "error: batch_size=0: must be >= 1"),
        (["--input", "missing.jsonl"], "error: missing.jsonl: no such file"),
        (["--tokenizer", "missing.model"], "error: missing.model: tokenizer model not found"),
        (["--workers", "two"], "error: argument --workers: invalid int value: 'two'"),
    ],
)
def test_cli_bad_arguments(
    tmp_path: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "c.jsonl", ["text"])
    base = ["--input", "c.jsonl", "--output-prefix", "out", "--tokenizer", str(model)]
    assert preprocess_module.main([*base, *args, "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert leftovers(tmp_path) == []


def test_unknown_input_format(tmp_path: Path, model: Path) -> None:
    (tmp_path / "data.csv").write_text("text\n")
    with pytest.raises(ValueError, match=r"data\.csv: unknown input format"):
        preprocess([tmp_path / "data.csv"], tmp_path / "out", model)


def test_cli_prints_malformed_and_a_summary(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = write_malformed(tmp_path / "bad.jsonl")
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "out")]
    argv += ["--tokenizer", str(model), "--workers", "1", "--no-progress"]
    assert preprocess_module.main(argv) == 0
    out, err = capsys.readouterr()
    warnings = [line.split(": ", 2)[1] for line in err.splitlines()]
    assert warnings == [f"{corpus}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)], err
    assert f"warning: {corpus}:8: 'text' has a lone surrogate" in err
    assert "records    11 = 2 documents + 2 empty + 7 malformed" in out
    assert "tokens/s" in out and "bytes/tok" in out


@pytest.mark.timeout(120)
def test_cli_strict(tmp_path: Path, model: Path) -> None:
    corpus = write_malformed(tmp_path / "bad.jsonl")
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator.data.preprocess", "--input", str(corpus)]
        + ["--output-prefix", str(tmp_path / "out"), "--tokenizer", str(model)]
        + ["--workers", "2", "--strict"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"error: {corpus}:2: invalid JSON (Unterminated string starting at column 10) (strict)"
    ]
    assert leftovers(tmp_path) == []
