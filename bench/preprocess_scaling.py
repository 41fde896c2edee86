"""Scaling and restarts of ``orchestrator.data.preprocess_many`` over many ``.jsonl.zst`` files.

    python bench/preprocess_scaling.py [--files 8] [--size-mb 40] [--vocab-size 32000]
        [--repeat 2] [--workdir DIR]

Writes a deterministic pseudo-English corpus of ``--files`` ``.jsonl.zst``
files (``generate_corpus`` of ``bench/preprocess_throughput.py``), trains a
LLaMA-style tokenizer on the first file, then measures

  (a) tokens/s of ``preprocess_many`` with 1 and 2 workers (one shard per
      file, whole files per worker; the best of ``--repeat`` runs, each from
      scratch) and the speedup, checking that both give the same bytes;
  (b) a restart: a run with 2 workers in a subprocess, killed (SIGKILL) once
      a third of its shards are finished, then run again: how many shards the
      rerun made and skipped, and whether the result is byte-identical to a
      clean run.

Not a test: it takes a minute or two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess_throughput import generate_corpus  # noqa: E402

from orchestrator.data.preprocess_many import preprocess_many  # noqa: E402
from orchestrator.data.tokenizer import train_tokenizer  # noqa: E402


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0] if models else '?'}, {len(os.sched_getaffinity(0))} cores usable"


def write_corpus(directory: Path, *, num_files: int, size_mb: float) -> list[Path]:
    """``part-0000i.jsonl.zst``; the first file also kept uncompressed, to train on."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(num_files):
        plain = directory / f"part-{i:05d}.jsonl"
        generate_corpus(plain, size_mb=size_mb / num_files, seed=i)
        packed = plain.with_name(plain.name + ".zst")
        packed.write_bytes(zstandard.ZstdCompressor(level=3).compress(plain.read_bytes()))
        if i:
            plain.unlink()
        else:
            plain.rename(directory.parent / "train.jsonl")
        files.append(packed)
    return files


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def killed_run(command: list[str], output_dir: Path, *, num_done: int) -> tuple[int, int]:
    """Runs ``command``, SIGKILLs it once ``num_done`` shards are finished; (finished, .tmp)."""
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    while process.poll() is None and len(list(output_dir.glob("*.idx"))) < num_done:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(0.2)  # the workers die with it (PR_SET_PDEATHSIG)
    return len(list(output_dir.glob("*.idx"))), len(list(output_dir.glob("*.tmp")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--size-mb", type=float, default=40.0, help="all files together")
    parser.add_argument("--vocab-size", type=int, default=32_000)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    args = parser.parse_args()
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.perf_counter()
        files = write_corpus(workdir / "corpus", num_files=args.files, size_mb=args.size_mb)
        packed = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"corpus: {len(files)} .jsonl.zst files, {args.size_mb:.0f} MB of JSONL,"
            f" {packed:.1f} MB compressed, written in {time.perf_counter() - start:.1f} s"
        )
        model = train_tokenizer(
            [workdir / "train.jsonl"],
            workdir / "tok",
            vocab_size=args.vocab_size,
            sample_size=200_000,
            threads=len(os.sched_getaffinity(0)),
        )

        rates = {}
        for workers in (1, 2):
            runs = []
            for _ in range(args.repeat):  # from scratch each time
                shutil.rmtree(workdir / f"w{workers}", ignore_errors=True)
                runs.append(preprocess_many(files, workdir / f"w{workers}", model, workers=workers))
            run = min(runs, key=lambda run: run.elapsed_s)
            rates[workers] = run.totals.num_tokens / run.elapsed_s
            print(
                f"(a) {workers} worker{'s' * (workers > 1)}: {len(run.made)} shards,"
                f" {run.totals.num_tokens:,} tokens in {run.elapsed_s:.2f} s:"
                f" {rates[workers] / 1e6:.2f} M tokens/s"
            )
        same = contents(workdir / "w1") == contents(workdir / "w2")
        print(f"    speedup 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x; same bytes: {same}")

        out = workdir / "restart"
        command = [sys.executable, "-m", "orchestrator.data.preprocess_many", "--input"]
        command += [*map(str, files), "--output-dir", str(out), "--tokenizer", str(model)]
        finished, tmps = killed_run([*command, "--workers", "2"], out, num_done=len(files) // 3)
        print(
            f"(b) killed with SIGKILL after {finished} of {len(files)} shards were finished"
            f" ({tmps} .tmp files left by the shards in progress)"
        )
        run = preprocess_many(files, out, model, workers=2)
        same = contents(out) == contents(workdir / "w1")
        print(
            f"    rerun: {len(run.made)} shards made, {len(run.skipped)} skipped as finished,"
            f" in {run.elapsed_s:.2f} s; byte-identical to a clean run: {same}"
        )


if __name__ == "__main__":
    main()
