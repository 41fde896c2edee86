"""Checkpoints at LLaMA-65B's real per-rank shapes: re-shard reads, verify cost, save cost.

A synthetic checkpoint in DeepSpeed's real file format (ZeRO-1 ``zero_pp_rank_*``
optimiser files with ``single_partition_of_fp32_groups``, Adam moments and
``param_slice_mappings``; ``mp_rank_*_model_states.pt`` with ``param_shapes``;
``layout.json``) is written for 65B's tp8pp4dp64 layout, with every tensor at
its real 65B size (a tp shard of ``wq`` is 1,024 x 8,192, of ``w1``
2,752 x 8,192) but fewer layers per stage: the count is scaled, not the
tensors. Only the source ranks that the measured target rank reads from are
written in full (stage 0, tp ranks 0 and 1, all 64 dp files each); the reader
opens nothing else.

One rank of the target layout tp4pp8dp64 (the same 2,048 GPUs) then loads its
part exactly as ``orchestrator.state.reshard`` does (``_Local.flat`` into its own
ZeRO-1 slice of fp32 weights and both moments) with the page cache of the
source files dropped first (``posix_fadvise(DONTNEED)``), and we measure:

- wall time and tensor bytes copied (the reader's count) and bytes the kernel
  read from disk (``/proc/self/io`` ``read_bytes``), against the rank's own
  share (its slice of the three fp32 tensors);
- peak anonymous RSS above the start (file-backed pages of the memory maps are
  page cache, reported apart);
- the cost of checksums: ``torch.save`` of one rank's optimiser file with and
  without the CRC-32 taken while writing (save-time cost), and a full re-read
  with CRC-32 from disk (the resume check, each file read once by one rank).

    python bench/checkpoint_scale.py --layers 2 4 8 --out /big/disk/folder
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from model_parallel.args import ModelArgs  # noqa: E402
from orchestrator.state import integrity  # noqa: E402
from orchestrator.state.reshard import _Local  # noqa: E402
from orchestrator.state.reshard_source import SourceCheckpoint  # noqa: E402
from orchestrator.state.weights import tp_dim  # noqa: E402

DIM, FFN, VOCAB, N_HEADS = 8192, 22016, 32000, 64
SRC = {"tp": 8, "pp": 4, "dp": 64}
DST = {"tp": 4, "pp": 8, "dp": 64}
_LAYER = [
    ("attention_norm.weight", (DIM,)),
    ("attention.wq.weight", (DIM, DIM)),
    ("attention.wk.weight", (DIM, DIM)),
    ("attention.wv.weight", (DIM, DIM)),
    ("attention.wo.weight", (DIM, DIM)),
    ("ffn_norm.weight", (DIM,)),
    ("feed_forward.w1.weight", (FFN, DIM)),
    ("feed_forward.w3.weight", (FFN, DIM)),
    ("feed_forward.w2.weight", (DIM, FFN)),
]


def full_params(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Meta's names and full shapes, in model order."""
    out: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (VOCAB, DIM))]
    for layer in range(n_layers):
        out += [(f"layers.{layer}.{n}", s) for n, s in _LAYER]
    return out + [("norm.weight", (DIM,)), ("output.weight", (VOCAB, DIM))]


def local_shape(name: str, full: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = tp_dim(name)
    if dim is None:
        return full
    shape = list(full)
    shape[dim] = -(-full[dim] // tp)
    return tuple(shape)


def stage_params(n_layers: int, pp: int, stage: int) -> list[tuple[str, tuple[int, ...]]]:
    """A pipeline stage's parameters (Meta's names), embedding first, output last."""
    per = n_layers // pp
    layers = range(stage * per, (stage + 1) * per)

    def here(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        return stage == (0 if name == "tok_embeddings.weight" else pp - 1)

    return [(name, shape) for name, shape in full_params(n_layers) if here(name)]


def _pipeline_name(name: str, n_layers: int, pp: int) -> str:
    """DeepSpeed's PipelineModule name (``3.block.x`` is ``layers.2.x``)."""
    if name == "tok_embeddings.weight":
        return "0.tok_embeddings.weight"
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return f"{int(layer) + 1}.block.{rest}"
    return f"{n_layers + 1}.{name}"


def groups_of(
    params: list[tuple[str, tuple[int, ...]]], tp: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """ZeRO's two parameter groups: matrices (decay), vectors (no decay), local shapes."""
    mats = [(n, local_shape(n, s, tp)) for n, s in params if len(s) == 2]
    vecs = [(n, local_shape(n, s, tp)) for n, s in params if len(s) == 1]
    return [mats, vecs]


def write_source(folder: Path, n_layers: int, *, mp_ranks: list[int]) -> int:
    """The source checkpoint's files for ``mp_ranks`` of stage 0 (all dp ranks); bytes written."""
    tp, pp, dp = SRC["tp"], SRC["pp"], SRC["dp"]
    folder.mkdir(parents=True, exist_ok=True)
    per = n_layers // pp
    layout = {
        "tp": tp,
        "pp": pp,
        "dp": dp,
        "zero_stage": 1,
        "micro_batch_size": 1,
        "stage_layers": [[s * per, (s + 1) * per - 1] for s in range(pp)],
    }
    (folder / "layout.json").write_text(json.dumps(layout))
    written = 0
    for mp in mp_ranks:
        stage, tp_rank = divmod(mp, tp)
        groups = groups_of(stage_params(n_layers, pp, stage), tp)
        shapes = [
            OrderedDict((_pipeline_name(n, n_layers, pp), torch.Size(s)) for n, s in g)
            for g in groups
        ]
        torch.save(
            {
                "module": None,
                "param_shapes": shapes,
                "step": 1000,
                "consumed_tokens": 1000 * 2**22,
                "data": {"position": 1000 * 32},
                "skipped_steps": 0,
                "global_steps": 1000,
                "lr_scheduler": {"last_epoch": 1000},
            },
            folder / f"mp_rank_{mp:02d}_model_states.pt",
        )
        totals = [sum(math.prod(s) for _, s in g) for g in groups]
        slices = [-(-t // dp) for t in totals]
        for dp_rank in range(dp):
            flats, states, mappings = [], {}, []
            for g, (group, size) in enumerate(zip(groups, slices, strict=True)):
                lo = dp_rank * size
                # values: the element's global index + a per-key offset (cheap, checkable)
                base = torch.arange(lo, lo + size, dtype=torch.float64).float() + tp_rank * 1e-3
                flats.append(base)
                states[g] = {
                    "step": torch.tensor(1000.0),
                    "exp_avg": base + 0.25,
                    "exp_avg_sq": base + 0.5,
                }
                offset, mapping = 0, {}
                for name, shape in group:
                    numel = math.prod(shape)
                    a, b = max(offset, lo), min(offset + numel, lo + size)
                    if a < b:
                        mapping[_pipeline_name(name, n_layers, pp)] = fragment_address(
                            numel=b - a, start=a - lo
                        )
                    offset += numel
                mappings.append(mapping)
            state = {
                "optimizer_state_dict": {
                    "single_partition_of_fp32_groups": flats,
                    "base_optimizer_state": {
                        "state": states,
                        "param_groups": [{"params": [0]}, {"params": [1]}],
                    },
                    "param_slice_mappings": mappings,
                    "partition_count": [dp, dp],
                }
            }
            path = folder / f"zero_pp_rank_{dp_rank}_mp_rank_{mp:02d}_optim_states.pt"
            torch.save(state, path)
            written += path.stat().st_size
    return written


def _drop_cache(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _io_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


def _rss() -> tuple[int, int]:
    anon = file = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
        elif line.startswith("RssFile:"):
            file = int(line.split()[1]) * 1024
    return anon, file


class _Peak:
    def __init__(self) -> None:
        self.base = _rss()
        self.anon, self.file = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file = _rss()
            self.anon, self.file = (
                max(self.anon, anon - self.base[0]),
                max(self.file, file - self.base[1]),
            )
            time.sleep(0.005)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def load_target_rank(folder: Path, n_layers: int, *, dp_rank: int) -> dict[str, float]:
    """Target rank (tp 0, stage 0, ``dp_rank``) of tp4pp8dp64 fills its ZeRO-1 slice."""
    tp, pp, dp = DST["tp"], DST["pp"], DST["dp"]
    args = ModelArgs(dim=DIM, n_layers=n_layers, n_heads=N_HEADS, vocab_size=VOCAB)
    _drop_cache(folder)
    read_before, start = _io_read_bytes(), time.perf_counter()
    with _Peak() as peak:
        source = SourceCheckpoint(folder, args)
        own = 0
        for group in groups_of(stage_params(n_layers, pp, 0), tp):
            total = sum(math.prod(s) for _, s in group)
            size = -(-total // dp)
            lo, hi = dp_rank * size, (dp_rank + 1) * size
            buffers = {k: torch.empty(size) for k in ("fp32", "exp_avg", "exp_avg_sq")}
            own += 3 * size * 4
            offset = 0
            for name, shape in group:
                numel = math.prod(shape)
                a, b = max(offset, lo), min(offset + numel, hi)
                if a < b:
                    local = _Local(source, name, shape, tp_dim(name), 0)
                    for key, buf in buffers.items():
                        buf[a - lo : b - lo] = local.flat(key, a - offset, b - a)
                offset += numel
            del buffers
        bytes_copied = source.bytes_read
        files_opened = len(source._open)
        source.close()
    return {
        "seconds": time.perf_counter() - start,
        "own_bytes": own,
        "copied_bytes": bytes_copied,
        "disk_read_bytes": _io_read_bytes() - read_before,
        "peak_anon_rss": peak.anon,
        "peak_file_rss": peak.file,
        "files_opened": files_opened,
    }


def checksum_costs(folder: Path) -> dict[str, float]:
    """Save one rank's optimiser file plain and with the CRC-32; re-read it with the CRC-32."""
    source = next(folder.glob("zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    from orchestrator.state.safe_load import safe_load

    state = safe_load(source)
    out: dict[str, float] = {"file_bytes": source.stat().st_size}
    probe = folder.parent / "probe"
    probe.mkdir(exist_ok=True)
    tmp = probe / "save_probe.pt"
    for label in ("plain", "crc") * 4:  # interleaved; the fastest of four counts
        tmp.unlink(missing_ok=True)
        start = time.perf_counter()
        if label == "plain":
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        else:
            integrity.write_checksummed(state, tmp)
        elapsed = time.perf_counter() - start
        out[f"save_{label}_s"] = min(out.get(f"save_{label}_s", elapsed), elapsed)
    for _ in range(3):
        _drop_cache(probe)
        start = time.perf_counter()
        integrity.checksum_file(tmp)
        elapsed = time.perf_counter() - start
        out["verify_from_disk_s"] = min(out.get("verify_from_disk_s", elapsed), elapsed)
        start = time.perf_counter()
        integrity.checksum_file(tmp)
        elapsed = time.perf_counter() - start
        out["verify_cached_s"] = min(out.get("verify_cached_s", elapsed), elapsed)
    shutil.rmtree(probe)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[8, 16, 32],
        help="layers in the model (4 source stages, 8 target stages)",
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    print(f"cpu: {_cpu()}; torch {torch.__version__}; one process, one thread")
    for n_layers in ns.layers:
        folder = ns.out / f"src_{n_layers}"
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        written = write_source(folder, n_layers, mp_ranks=[0, 1])
        print(
            f"\n{n_layers} layers ({n_layers // 4} per source stage): wrote {written / 2**30:.2f} GiB "
            f"in {time.perf_counter() - start:.0f} s"
        )
        for dp_rank in (0, 37):
            r = load_target_rank(folder, n_layers, dp_rank=dp_rank)
            print(
                f"  target tp0 pp0 dp{dp_rank}: {r['seconds']:.2f} s, own share {r['own_bytes'] / 2**20:.1f} MiB, "
                f"copied {r['copied_bytes'] / r['own_bytes']:.2f}x, disk read {r['disk_read_bytes'] / r['own_bytes']:.2f}x, "
                f"{r['own_bytes'] / r['seconds'] / 2**20:.0f} MiB/s of own share, {r['files_opened']} files; peak anon RSS "
                f"+{r['peak_anon_rss'] / 2**20:.0f} MiB (mapped file pages +{r['peak_file_rss'] / 2**20:.0f} MiB)"
            )
        c = checksum_costs(folder)
        mib = c["file_bytes"] / 2**20
        print(
            f"  one optimiser file ({mib:.0f} MiB): save {c['save_plain_s']:.2f} s, with CRC-32 {c['save_crc_s']:.2f} s "
            f"(+{100 * (c['save_crc_s'] / c['save_plain_s'] - 1):.1f}%); verify from disk {c['verify_from_disk_s']:.2f} s "
            f"({mib / c['verify_from_disk_s']:.0f} MiB/s), cached {c['verify_cached_s']:.2f} s "
            f"({mib / c['verify_cached_s']:.0f} MiB/s)"
        )
        if not ns.keep:
            shutil.rmtree(folder)
    print(
        f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
