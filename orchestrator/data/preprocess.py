"""Raw documents to one indexed token shard (see ``orchestrator.data.indexed``).

The input formats (JSONL with a ``text`` field, plain text; ``.gz`` and ``.zst`` too) and
what makes a record malformed are in ``orchestrator.data.documents``.

Every input record (a JSONL line, a text file, a text line) ends up in exactly
one count: ``records = documents + empty + malformed``. Empty records (blank
lines, ``"text": ""``) are skipped. Malformed ones (bad JSON, no ``text``, a
``text`` that is not a string, invalid UTF-8) are skipped and reported with
``file:line``, or stop the run with ``strict=True``. Each document is written
as its tokens followed by ``</s>``.

Worker processes parse and tokenize batches of raw records; the parent reads
the files, keeps a bounded window of batches in flight and writes the results
in input order, so the shard is byte-identical for any number of workers.
A run that fails or is interrupted aborts the writer: no shard, no temporaries.

Command line::

    python -m orchestrator.data.preprocess --input FILE [FILE ...] \\
        --output-prefix PREFIX --tokenizer MODEL [--workers N] \\
        [--batch-size N] [--strict] [--text-split {file,lines}] [--no-progress]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path

import numpy as np

from orchestrator.data.documents import (
    MAX_REPORTED_MALFORMED,
    TEXT_SPLITS,
    Malformed,
    MalformedRecord,
    Reader,
    Record,
    Source,
    check_inputs,
    parse_record,
)
from orchestrator.data.indexed import IndexedDatasetWriter, token_dtype
from orchestrator.data.preprocess_report import ProgressBar, RaisingArgumentParser, Summary
from orchestrator.data.tokenizer import load_tokenizer

log = logging.getLogger("orchestrator.data.preprocess")

BATCH_BYTES = 1 << 20  # a batch also ends after this much input
# Fork: workers start in milliseconds and inherit the imports; spawn would
# re-import torch (through ``orchestrator.data``) in every worker.
_START_METHOD = "fork" if sys.platform == "linux" else "spawn"


class MalformedInputError(ValueError):
    """A malformed record under ``strict=True``."""


@dataclass
class _BatchResult:
    num_records: int
    tokens: np.ndarray  # the documents' tokens, concatenated, each ending in </s>
    lengths: np.ndarray  # tokens per document
    num_text_bytes: int
    num_empty: int
    malformed: list[Malformed]


class _BatchEncoder:
    """Parses and tokenizes a batch of records; one per worker process."""

    def __init__(self, tokenizer_path: str, sources: Sequence[Source], text_split: str) -> None:
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.sources = sources
        self.text_split = text_split

    def __call__(self, batch: Sequence[Record]) -> _BatchResult:
        texts, malformed, num_empty, num_text_bytes = [], [], 0, 0
        for source, line, data in batch:
            try:
                text, size = parse_record(
                    self.sources[source].format, data, text_split=self.text_split
                )
            except MalformedRecord as e:
                path = str(self.sources[source].path)
                malformed.append(Malformed(path, line + e.line_offset, e.reason))
                continue
            if not text:
                num_empty += 1
                continue
            texts.append(text)
            num_text_bytes += size
        ids = self.tokenizer.encode_batch(texts, eos=True)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=total)
        return _BatchResult(len(batch), tokens, lengths, num_text_bytes, num_empty, malformed)


# Per-process state of a pool worker, set once by its initializer.
_worker_encoder: _BatchEncoder | None = None


def _init_worker(tokenizer_path: str, sources: Sequence[Source], text_split: str) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker_encoder = _BatchEncoder(tokenizer_path, sources, text_split)


def _encode_in_worker(batch: list[Record]) -> _BatchResult:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(batch)


def _batched(records: Iterable[Record], batch_size: int) -> Iterator[list[Record]]:
    """Batches of ``batch_size`` records, cut earlier at ``BATCH_BYTES`` of input.

    The byte limit keeps batches of long documents small enough to spread
    evenly over the workers and to bound the memory in flight.
    """
    batch: list[Record] = []
    num_bytes = 0
    for record in records:
        batch.append(record)
        num_bytes += len(record[2])
        if len(batch) == batch_size or num_bytes >= BATCH_BYTES:
            yield batch
            batch, num_bytes = [], 0
    if batch:
        yield batch


def _encode_all(
    reader: Reader, encoder_args: tuple, *, workers: int, batch_size: int
) -> Generator[tuple[_BatchResult, int], None, None]:
    """Each batch's result, in input order, with the input position after it."""
    batches = _batched(reader, batch_size)
    if workers == 1:
        encode = _BatchEncoder(*encoder_args)
        for batch in batches:
            yield encode(batch), reader.bytes_read
        return
    context = multiprocessing.get_context(_START_METHOD)
    pool = context.Pool(workers, initializer=_init_worker, initargs=encoder_args)
    # A bounded window rather than imap: imap's feeder thread would read
    # ahead without limit, and errors from reading would surface late.
    pending: deque[tuple[AsyncResult[_BatchResult], int]] = deque()
    try:
        for batch in batches:
            pending.append((pool.apply_async(_encode_in_worker, (batch,)), reader.bytes_read))
            if len(pending) >= 2 * workers:
                result, position = pending.popleft()
                yield result.get(), position
        while pending:
            result, position = pending.popleft()
            yield result.get(), position
    finally:
        # Stopped early (an error, Ctrl-C, the consumer gone): let the batches
        # in flight finish and close the pool. Pool.terminate() here could kill
        # a worker holding the result queue's lock and deadlock the pool.
        for result, _ in pending:
            result.wait(timeout=60)
        pool.close()
        pool.join()


def preprocess(
    inputs: Sequence[Path],
    output_prefix: Path,
    tokenizer_path: Path,
    *,
    workers: int = 1,
    batch_size: int = 256,
    strict: bool = False,
    text_split: str = "file",
    on_progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Tokenize ``inputs`` into the shard ``output_prefix.{bin,idx}``.

    ``workers=1`` tokenizes in this process. ``on_progress`` is called with
    the running summary after every batch. Raises ``MalformedInputError`` for
    the first malformed record under ``strict``; on any error no shard is left.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    sources = check_inputs(inputs, text_split=text_split)
    tokenizer = load_tokenizer(tokenizer_path)
    summary = Summary(input_bytes=sum(source.size for source in sources))
    reader = Reader(sources, text_split=text_split)
    encoder_args = (str(tokenizer_path), sources, text_split)
    start = time.perf_counter()
    writer = IndexedDatasetWriter(output_prefix, vocab_size=tokenizer.vocab_size)
    try:
        results = _encode_all(reader, encoder_args, workers=workers, batch_size=batch_size)
        with contextlib.closing(results):  # stops the pool now, even on an error
            for result, position in results:
                if strict and result.malformed:
                    raise MalformedInputError(f"{result.malformed[0]} (strict)")
                for end, length in zip(np.cumsum(result.lengths), result.lengths, strict=True):
                    writer.add_document(result.tokens[end - length : end])
                _accumulate(summary, result)
                summary.bytes_read = position
                summary.elapsed_s = time.perf_counter() - start
                if on_progress is not None:
                    on_progress(summary)
    except BaseException:
        writer.abort()
        raise
    writer.finish()
    summary.elapsed_s = time.perf_counter() - start
    assert summary.num_records == (
        summary.num_documents + summary.num_empty + summary.num_malformed
    ), summary
    return summary


def _accumulate(summary: Summary, result: _BatchResult) -> None:
    summary.num_records += result.num_records
    summary.num_documents += len(result.lengths)
    summary.num_tokens += len(result.tokens)
    summary.num_text_bytes += result.num_text_bytes
    summary.num_empty += result.num_empty
    summary.num_malformed += len(result.malformed)
    room = MAX_REPORTED_MALFORMED - len(summary.malformed)
    summary.malformed.extend(result.malformed[: max(0, room)])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = RaisingArgumentParser(
        prog="python -m orchestrator.data.preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", nargs="+", type=Path, required=True, metavar="FILE")
    parser.add_argument("--output-prefix", type=Path, required=True, metavar="PREFIX")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        metavar="MODEL",
        help="a SentencePiece .model, or a tokenizer.json (or a folder holding one)",
    )
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch-size", type=int, default=256, help="records per batch")
    parser.add_argument("--strict", action="store_true", help="stop at a malformed record")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    progress = None
    try:
        args = _parse_args(argv)
        progress = ProgressBar(sys.stderr, draw=not args.no_progress)
        summary = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            workers=args.workers,
            batch_size=args.batch_size,
            strict=args.strict,
            text_split=args.text_split,
            on_progress=progress,
        )
    except (ValueError, OSError) as e:
        if progress is not None:
            progress.end_line()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if progress is not None:
            progress.end_line()
        print("interrupted: no shard written", file=sys.stderr)
        return 130
    progress.close(summary)
    print(f"wrote {args.output_prefix}.bin and .idx")
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
