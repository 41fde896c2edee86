"""The data path at LLaMA's real shape, on a metadata-only corpus.

    python bench/data_index_scale.py [--workdir DIR] [--docs 62.5e6,125e6,250e6]
        [--samples-at-largest 717e6] [--no-megatron]

For each corpus size it writes a RedPajama-shaped corpus of Megatron-format
shards whose ``.idx`` files are real (document counts and lognormal lengths
with each source's mean) and whose ``.bin`` files are sparse files of the
right size (no tokens are stored: reading one yields zeros), in two layouts:

* ``many``: RedPajama's file counts (CommonCrawl 2,000 shards, C4 1,024,
  GitHub and ArXiv 100, Wikipedia 4, Books and StackExchange 2);
* ``one``: the same documents, one shard per source.

The sample count scales with the corpus (the largest gets the full
717M-sample blend of LLaMA-65B: 350k steps x 2,048). It then measures, each
in a fresh process:

1. the whole-run index build on one core (``orchestrator.data.run_index``),
   on both layouts, and megatron-core 0.16's own builder
   (``BlendedMegatronDatasetBuilder`` + ``GPTDataset``, its C++ helpers, the
   same seed-free work: document, sample and shuffle indexes and the blend)
   on the ``one`` layout, with peak RSS;
2. on the ``many`` layout, two ranks in a gloo group standing in for 2,048
   (dp rank 5 of 64, 32 sequences of 2,049 tokens per step): time from the
   process group's start to the first batch, fresh and resumed at 85% of
   the run (step 300,000 at the largest size); the data rank's private
   (anonymous) memory at the end; the data time per step (a) building the
   step's 32 micro-batches when asked, at 20 random steps, and (b) as the
   loop waits for them, over 30 consecutive steps with 0.5 s of compute
   between steps (the prefetch thread builds a step ahead).

Prints what it measured, with the machine. Not a test: tens of minutes and
tens of GB of disk at the default sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.data.indexed import write_index  # noqa: E402

# RedPajama-1T: documents (millions), mean tokens per document, files
SOURCES = {
    "common_crawl": (477.0, 1840, 2000, 67.0),
    "c4": (364.9, 480, 1024, 15.0),
    "github": (28.8, 2050, 100, 4.5),
    "wikipedia": (29.8, 805, 4, 4.5),
    "books": (0.205, 127_000, 2, 4.5),
    "arxiv": (1.56, 18_000, 100, 2.5),
    "stackexchange": (29.8, 670, 2, 2.0),
}
TOTAL_DOCS = sum(v[0] for v in SOURCES.values()) * 1e6
SEQ_LEN, GLOBAL_BATCH, DP = 2048, 2048, 64
STEP_S = 0.5  # compute between steps (65B on 2,048 A100s: ~5.4 s)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((x.split(":", 1)[1].strip() for x in lines if "model name" in x), "?")
    return f"{model}, {os.cpu_count()} cores"


def write_corpus(root: Path, num_docs: float, *, layout: str, seed: int = 0) -> None:
    """Metadata-only shards: real .idx, sparse .bin."""
    if (root / "done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for name, (millions, mean, files, _) in SOURCES.items():
        n = max(files, int(millions * 1e6 * num_docs / TOTAL_DOCS))
        sigma = 1.0
        lengths = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
        lengths = np.clip(lengths, 1, 2**31 - 1).astype(np.int32)
        shards = files if layout == "many" else 1
        folder = root / name
        folder.mkdir(parents=True)
        for i, part in enumerate(np.array_split(lengths, shards)):
            prefix = folder / f"part-{i:05d}"
            with open(f"{prefix}.idx", "wb") as idx:
                write_index(idx, part, np.dtype(np.uint16))
            with open(f"{prefix}.bin", "wb") as data:
                data.truncate(int(part.sum(dtype=np.int64)) * 2)
    (root / "done").write_text("")


def build_ours(root: Path, samples: int, cache: Path) -> dict:
    from orchestrator.data.run_index import IndexSpec, SourceSpec, ensure_index
    from orchestrator.data.shards import expand_source

    start = time.perf_counter()
    sources = tuple(
        SourceSpec(name, w, tuple(expand_source(name, root, field=name)))
        for name, (_, _, _, w) in SOURCES.items()
    )
    spec = IndexSpec(
        sources=sources,
        seq_len=SEQ_LEN,
        seed=1234,
        split_seed=1234,
        valid_fraction=0.001,
        num_train_samples=samples,
        num_valid_samples=GLOBAL_BATCH,
    )
    folder = ensure_index(spec, cache)
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.iterdir())
    return {"seconds": elapsed, "cache_bytes": size, "folder": str(folder)}


class _Tokenizer:  # what GPTDataset asks of a tokenizer
    eod, pad, bos, eos, unique_identifiers = 2, -1, 1, 2, {"bench": "bench"}
    vocab_size = 32000


def build_megatron(root: Path, samples: int, cache: Path) -> dict:
    import torch.distributed as dist
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)  # BlendedDataset asks for a rank
    prefixes, weights = [], []
    for name, (_, _, _, w) in SOURCES.items():
        for idx in sorted((root / name).glob("*.idx")):
            prefixes.append(str(idx.with_suffix("")))
            weights.append(w)
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=SEQ_LEN,
        blend=(prefixes, weights),
        split="99,1,0",  # 999,1,0 leaves some sources no validation document: Megatron loops forever
        path_to_cache=str(cache),
        tokenizer=_Tokenizer(),  # type: ignore[arg-type]
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        mmap_bin_files=True,
    )
    start = time.perf_counter()
    BlendedMegatronDatasetBuilder(
        GPTDataset, [samples, GLOBAL_BATCH, 0], lambda: True, config
    ).build()
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return {"seconds": elapsed, "cache_bytes": size}


def _rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return -1


def data_rank(folder: Path, root: Path, samples: int, rank: int, port: int) -> dict:
    """One of two gloo ranks: rank 0 finds the index (key from every shard) and broadcasts."""
    import torch.distributed as dist

    from orchestrator.data.sources import BlendedSource

    baseline = _rss_anon_kb()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    started = time.perf_counter()
    found = [None]
    if rank == 0:
        result = build_ours(root, samples, folder.parent)  # finds it: key over every shard
        found[0] = result["folder"]  # type: ignore[assignment]
    dist.broadcast_object_list(found, src=0)
    per_step = GLOBAL_BATCH // DP

    def source() -> BlendedSource:
        return BlendedSource(
            Path(str(found[0])),
            "train",
            global_batch=GLOBAL_BATCH,
            micro_batch=1,
            dp_rank=5,
            dp_size=DP,
        )

    fresh = iter(source())
    next(fresh)
    first_fresh = time.perf_counter() - started
    late_step = int(samples / GLOBAL_BATCH * 0.85)
    resumed_source = source()
    resumed_source.load_state_dict({"position": late_step * per_step})
    resumed = iter(resumed_source)
    t0 = time.perf_counter()
    next(resumed)
    first_resumed = time.perf_counter() - started
    resumed_only = time.perf_counter() - t0
    rng = np.random.default_rng(rank)
    total_steps = samples // GLOBAL_BATCH
    running = source()  # one source for the run, as in training

    # (a) no prefetch: each step's 32 micro-batches built when asked, at random steps
    direct = []
    for step in rng.integers(0, total_steps - 1, 20):
        t = time.perf_counter()
        for m in range(per_step):
            running.micro_batch_at(int(step) * per_step + m)
        direct.append(time.perf_counter() - t)
    # (b) the loop: consecutive steps from a random one, a step of compute between them
    running.load_state_dict({"position": int(rng.integers(0, total_steps - 40)) * per_step})
    batches = iter(running)
    waited = []
    for _ in range(30):
        t = time.perf_counter()
        for _ in range(per_step):
            next(batches)
        waited.append(time.perf_counter() - t)
        time.sleep(STEP_S)
    result = {
        "first_batch_fresh_s": first_fresh,
        "first_batch_resumed_s": first_resumed,
        "resumed_step": late_step,
        "resumed_first_batch_only_s": resumed_only,
        "direct_ms_per_step_median": 1000 * float(np.median(direct)),
        "direct_ms_per_step_max": 1000 * float(np.max(direct)),
        "loop_ms_per_step_median": 1000 * float(np.median(waited[1:])),
        "loop_ms_per_step_max": 1000 * float(np.max(waited[1:])),
        "loop_ms_first_step": 1000 * waited[0],
        "rss_anon_mb": _rss_anon_kb() / 1024,
        "rss_anon_mb_before_torch_dist": baseline / 1024,
    }
    dist.destroy_process_group()
    return result


def _child(argv: list[str]) -> int:
    kind, root, samples, cache = argv[0], Path(argv[1]), int(argv[2]), Path(argv[3])
    if kind == "ours":
        out = build_ours(root, samples, cache)
    elif kind == "megatron":
        out = build_megatron(root, samples, cache)
    else:
        out = data_rank(cache, root, samples, int(argv[4]), int(argv[5]))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _run(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["taskset", "-c", "0", sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _ranks(root: Path, samples: int, folder: Path) -> dict:
    port = 29500 + os.getpid() % 1000
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "rank",
                str(root),
                str(samples),
                str(folder),
                str(rank),
                str(port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"rank failed:\n{err[-3000:]}")
        results.append(json.loads(lines[0][7:]))
    return {"rank0": results[0], "rank1": results[1]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/data_index_bench")
    parser.add_argument("--docs", default="62.5e6,125e6,250e6")
    parser.add_argument("--samples-at-largest", type=float, default=717e6)
    parser.add_argument("--no-megatron", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    sizes = [float(x) for x in args.docs.split(",")]
    print(f"machine: {machine()}; one core per build (taskset -c 0)")
    report = []
    for num_docs in sizes:
        samples = int(args.samples_at_largest * num_docs / max(sizes))
        row: dict = {"docs": num_docs, "samples": samples}
        for layout in ("many", "one"):
            write_corpus(work / f"corpus-{layout}-{num_docs:.0f}", num_docs, layout=layout)
        many, one = (work / f"corpus-{x}-{num_docs:.0f}" for x in ("many", "one"))
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        row["ours_many"] = _run("ours", str(many), str(samples), str(cache / "many"))
        row["ranks"] = _ranks(many, samples, Path(row["ours_many"]["folder"]))
        shutil.rmtree(cache, ignore_errors=True)
        row["ours_one"] = _run("ours", str(one), str(samples), str(cache / "one"))
        shutil.rmtree(cache, ignore_errors=True)
        if not args.no_megatron:
            try:
                row["megatron_one"] = _run("megatron", str(one), str(samples), str(cache / "meg"))
            except RuntimeError as e:  # at the largest size it may run out of memory
                row["megatron_one_failed"] = str(e)[-600:]
            shutil.rmtree(cache, ignore_errors=True)
        report.append(row)
        print(json.dumps(row, indent=1), flush=True)
    _summary(report)
    return 0


def _summary(report: list[dict]) -> None:
    print(
        "\n| documents | samples | ours, 3,232 shards | ours, 7 shards | megatron-core, 7 shards "
        "| ratio | peak RSS ours / megatron | first batch fresh / resumed | private MB | data ms/step: built when asked / loop waits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in report:
        meg = row.get("megatron_one", {})
        r1 = row["ranks"]["rank1"]
        ratio = row["ours_one"]["seconds"] / meg["seconds"] if meg else float("nan")
        print(
            f"| {row['docs'] / 1e6:.1f}M | {row['samples'] / 1e6:.0f}M "
            f"| {row['ours_many']['seconds']:.1f} s | {row['ours_one']['seconds']:.1f} s "
            f"| {meg.get('seconds', float('nan')):.1f} s | {ratio:.2f} "
            f"| {row['ours_one']['peak_rss_gb']:.1f} / {meg.get('peak_rss_gb', float('nan')):.1f} GB "
            f"| {r1['first_batch_fresh_s']:.2f} / {r1['first_batch_resumed_s']:.2f} s "
            f"(step {r1['resumed_step']:,}) | {r1['rss_anon_mb']:.0f} "
            f"| {r1['direct_ms_per_step_median']:.0f} / {r1['loop_ms_per_step_median']:.2f} "
            f"(max {r1['loop_ms_per_step_max']:.2f}) |"
        )
    if len(report) >= 2:
        a, b = report[0], report[-1]
        scale = b["samples"] / a["samples"]
        for key in ("ours_many", "ours_one", "megatron_one"):
            if key in a and key in b:
                grow = b[key]["seconds"] / a[key]["seconds"]
                print(
                    f"{key}: x{grow:.2f} for x{scale:.1f} the size "
                    f"(exponent {np.log(grow) / np.log(scale):.2f})"
                )


if __name__ == "__main__":
    sys.exit(main())
