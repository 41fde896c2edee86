"""Throughput of ``orchestrator.data.preprocess`` against plain SentencePiece.

    python bench/preprocess_throughput.py [--input FILE.jsonl] [--size-mb 40]
        [--vocab-size 32000] [--workdir DIR] [--repeat 2]

Without ``--input`` it writes a deterministic pseudo-English JSONL corpus
(Zipf-distributed made-up words, sentences, numbers, paragraphs). It trains a
LLaMA-style tokenizer on a sample, then measures tokens/s of

  (a) plain SentencePiece: ``encode_batch`` in one process, one thread, on
      documents already in memory (no reading, parsing or writing);
  (b) ``preprocess`` with 1 worker, end to end (read, parse, tokenize, write);
  (c) ``preprocess`` with 2 workers;

and the ratios (c)/(a) and (c)/(b). Each figure is the best of ``--repeat``
runs. Not a test: it takes a minute or two.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

from orchestrator.data.documents import read_documents
from orchestrator.data.preprocess import preprocess
from orchestrator.data.tokenizer import Tokenizer, train_tokenizer

_SYLLABLES = [
    "a",
    "an",
    "ar",
    "as",
    "at",
    "ba",
    "be",
    "bi",
    "bo",
    "ca",
    "ce",
    "che",
    "co",
    "da",
    "de",
    "di",
    "do",
    "e",
    "ed",
    "el",
    "en",
    "er",
    "es",
    "fa",
    "fe",
    "fi",
    "fo",
    "ga",
    "ge",
    "go",
    "ha",
    "he",
    "hi",
    "ho",
    "i",
    "in",
    "is",
    "it",
    "ka",
    "la",
    "le",
    "li",
    "lo",
    "ma",
    "me",
    "mi",
    "mo",
    "na",
    "ne",
    "ni",
    "no",
    "o",
    "on",
    "or",
    "ou",
    "pa",
    "pe",
    "pi",
    "po",
    "qua",
    "ra",
    "re",
    "ri",
    "ro",
    "sa",
    "se",
    "si",
    "so",
    "st",
    "sta",
    "ta",
    "te",
    "th",
    "the",
    "ti",
    "to",
    "tr",
    "u",
    "un",
    "ur",
    "va",
    "ve",
    "vi",
    "wa",
    "we",
    "wi",
    "ya",
]


def generate_corpus(path: Path, *, size_mb: float, seed: int = 0) -> None:
    """Documents of 50 to 2,000 words drawn from a Zipf law over 30,000 made-up words."""
    rng = random.Random(seed)
    words = sorted(
        {"".join(rng.choices(_SYLLABLES, k=rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(40_000)}
    )
    rng.shuffle(words)
    words = words[:30_000]
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    target = int(size_mb * 1e6)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        for doc_id in itertools.count():
            paragraphs = []
            for _ in range(rng.randint(1, 8)):
                sentences = []
                for _ in range(rng.randint(1, 6)):
                    sentence = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 30))
                    if rng.random() < 0.2:
                        sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 99_999)))
                    sentences.append(" ".join(sentence).capitalize() + rng.choice(".....?!;"))
                paragraphs.append(" ".join(sentences))
            line = json.dumps({"text": "\n\n".join(paragraphs), "id": doc_id}) + "\n"
            f.write(line)
            written += len(line)
            if written >= target:
                return


def plain_sentencepiece(tokenizer: Tokenizer, texts: list[str], *, num_threads: int) -> float:
    """Tokens/s of ``encode_batch`` (with </s>, as preprocess writes) over in-memory texts."""
    start = time.perf_counter()
    num_tokens = 0
    for i in range(0, len(texts), 256):
        ids = tokenizer.encode_batch(texts[i : i + 256], eos=True, num_threads=num_threads)
        num_tokens += sum(map(len, ids))
    return num_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="a JSONL corpus (default: generate one)")
    parser.add_argument("--size-mb", type=float, default=40.0)
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--sample-size", type=int, default=200_000, help="lines to train on")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        corpus = args.input or workdir / "corpus.jsonl"
        if args.input is None and not corpus.exists():
            start = time.perf_counter()
            generate_corpus(corpus, size_mb=args.size_mb)
            print(f"generated {corpus} in {time.perf_counter() - start:.1f} s")
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB")

        start = time.perf_counter()
        model = train_tokenizer(
            [corpus],
            workdir / "tok",
            vocab_size=args.vocab_size,
            sample_size=args.sample_size,
            threads=len(os.sched_getaffinity(0)),
        )
        tokenizer = Tokenizer(model)
        print(
            f"tokenizer: vocab_size={tokenizer.vocab_size}, trained in "
            f"{time.perf_counter() - start:.1f} s"
        )

        texts = list(read_documents([corpus]))
        print(f"documents: {len(texts):,}")
        results = {}
        results["(a) plain sentencepiece, 1 process 1 thread"] = max(
            plain_sentencepiece(tokenizer, texts, num_threads=1) for _ in range(args.repeat)
        )
        results["    plain sentencepiece, 1 process 2 threads (reference)"] = max(
            plain_sentencepiece(tokenizer, texts, num_threads=2) for _ in range(args.repeat)
        )
        del texts
        parent_cpu = {}
        for workers in (1, 2):
            runs = []
            for _ in range(args.repeat):
                cpu = time.process_time()
                summary = preprocess(
                    [corpus],
                    workdir / f"shard_w{workers}",
                    model,
                    workers=workers,
                    batch_size=args.batch_size,
                )
                runs.append((summary, time.process_time() - cpu))
            best, cpu_s = max(runs, key=lambda run: run[0].tokens_per_s)
            name = f"({'bc'[workers - 1]}) preprocess, {workers} worker{'s' * (workers > 1)}"
            results[name] = best.tokens_per_s
            parent_cpu[workers] = (cpu_s, best.elapsed_s)
        print(f"tokens: {best.num_tokens:,} ({best.bytes_per_token:.2f} bytes/token)")

        for name, rate in results.items():
            print(f"{name:<58} {rate / 1e6:6.2f} M tokens/s")
        plain, one, two = (results[k] for k in results if k.startswith(("(a)", "(b)", "(c)")))
        print(f"2 workers / plain sentencepiece: {two / plain:.2f}x")
        print(f"2 workers / 1 worker:            {two / one:.2f}x")
        cpu_s, wall_s = parent_cpu[2]
        print(f"2 workers: the parent process used {cpu_s:.2f} s of CPU in {wall_s:.2f} s")


if __name__ == "__main__":
    main()
