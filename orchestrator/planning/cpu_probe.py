"""What this CPU host does, measured, for the plan's performance model (``orchestrator.planning.perf``).

A CPU cluster (``cluster.gpus_per_node == 0``) whose config leaves
``cluster.peak_tflops`` null gets its numbers from the host that plans or runs:

- **matmul peaks**: the best of about a second of square ``torch.mm`` per
  precision (fp32, bf16), at the thread count one rank uses (again, up to
  three more seconds, while several threads reach under 0.75x their count
  times one thread's rate: other processes' load); the size grows
  from 256 to 1024 while one product takes under 20 ms, so an emulated bf16
  matmul (hundreds of times slower) still takes a second, not minutes; and,
  at the same threads, an fp32 AdamW step (torch's fused one, as the engine's,
  with a gradient norm) per parameter, the per-step framework time;
- **gloo costs**: ``procs`` worker processes (as many as the run puts on the
  node, paired into groups of two), each alternating a couple of milliseconds
  of matmuls with one collective and timing the collective alone, so a latency
  includes the wait for a peer that was busy or descheduled, as in training: a
  64 KiB all-reduce, a 64 KiB send/recv, and the bandwidth of a 4 MiB
  all-reduce; the median of three rounds.

Both are cached per host in ``cpu_peaks_<hostname>.json`` under
``$LLAMA_ORCHESTRATOR_CACHE_DIR`` (default ``~/.cache/llama-orchestrator``;
``orchestrator.planning.host_cache``), keyed by the probe's version, the CPU model, the torch version and the
thread (and process) count: a cache hit measures nothing, another key
measures again. Ranks that miss at once take a file lock; one measures, the
rest read its answer. A probe that ran while other processes loaded the
cores keeps its low numbers: delete the file (its path is in the plan) to
measure again.

A rank's share of the node (``RankCpus``): the launcher gives each of the
node's ranks ``cores // ranks`` threads (at least one, or ``OMP_NUM_THREADS``
when set); when ranks x threads exceed the cores they time-share them, and a
rank's compute rate is the probe's at its thread count x cores / (ranks x threads).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.planning.host_cache import cache_path, cached

PROBE_VERSION = 2  # part of every cache key: a changed probe measures again
PRECISIONS = ("fp32", "bf16")
PROBE_SECONDS = 1.0  # per precision
MATMUL_SIZES = (256, 512, 1024)
SLOW_PRODUCT_S = 0.02  # a product slower than this stops the size from growing
PEAK_SCALING = 0.75  # n threads under n x this x one thread's rate: measure again
PEAK_RETRIES = 3
ADAMW_PARAMS = 2**22
MAX_COMM_PROCS = 8
WORK_PRODUCTS = 40  # 128 x 128 matmuls: about 2 ms on one core of the AMD EPYC VM
COMM_ELEMENTS = 16_384  # fp32 elements of the latency probes' tensor (64 KiB)
BANDWIDTH_ELEMENTS = 2**20  # 4 MiB
COMM_TIMEOUT_S = 120.0
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class RankCpus:
    """The cores of one node and how its ranks share them."""

    cores: int
    ranks_per_node: int
    threads: int  # torch threads of one rank

    @property
    def share(self) -> float:
        """The fraction of its threads' time a rank runs (1 unless ranks x threads > cores)."""
        return min(1.0, self.cores / (self.ranks_per_node * self.threads))

    def describe(self) -> str:
        ranks = f"{self.ranks_per_node} rank{'s' if self.ranks_per_node > 1 else ''}"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        share = "" if self.share == 1 else f", each {self.share:.2g} of its threads' time"
        return f"{ranks} x {threads} on {self.cores} cores{share}"


def rank_cpus(
    *,
    ranks_per_node: int,
    cpus_per_task: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> RankCpus:
    """How ``ranks_per_node`` ranks share this node (``orchestrator.launch.launcher``'s threads rule).

    ``cpus_per_task``: SLURM gives each rank that many cores of its own.
    """
    env = os.environ if environ is None else environ
    if cpus_per_task is not None:
        return RankCpus(cpus_per_task * ranks_per_node, ranks_per_node, cpus_per_task)
    cores = os.cpu_count() or 1
    threads = _int_env(env, "OMP_NUM_THREADS") or max(1, cores // ranks_per_node)
    return RankCpus(cores, ranks_per_node, threads)


def launched_ranks_per_node() -> int | None:
    """In a worker a launcher started (torchrun-style variables): its node's ranks; else None."""
    from orchestrator.runtime import dist_env

    if dist_env.started_by() != dist_env.TORCHRUN:
        return None
    return dist_env.read_env().local_world_size


def _int_env(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _flags(cpuinfo: str | None = None) -> set[str]:
    """The first ``flags`` line of /proc/cpuinfo (or of ``cpuinfo``), as a set."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split()) if lines else set()


def native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU multiplies bf16 natively (AMX or AVX512-BF16); None: unknown."""
    words = _flags(cpuinfo)
    if not words:
        return None
    return any(flag in words for flag in NATIVE_BF16_FLAGS)


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def peaks_key(threads: int) -> str:
    return f"matmul v{PROBE_VERSION}|{cpu_model()}|torch {_torch_version()}|threads {threads}"


def comm_key(procs: int, threads: int) -> str:
    host = f"{cpu_model()}|torch {_torch_version()}"
    return f"gloo v{PROBE_VERSION}|{host}|procs {procs}|threads {threads}"


def measured_peaks(threads: int, *, path: Path | None = None) -> tuple[dict[str, float], Path]:
    """At ``threads`` threads, from the cache or measured: TFLOP/s of fp32 and bf16
    matmuls, and ``adamw_s_per_param``, seconds of an fp32 AdamW step per parameter."""
    where = path or cache_path()
    entry = cached(where, peaks_key(threads), lambda: _measure_peaks(threads))
    return {k: float(entry[k]) for k in (*PRECISIONS, "adamw_s_per_param")}, where


def _measure_peaks(threads: int) -> dict[str, Any]:
    rates: dict[str, Any] = {p: steady_tflops(p, threads=threads) for p in PRECISIONS}
    return rates | {"adamw_s_per_param": adamw_seconds(threads=threads), "measured": time.time()}


def _generator() -> Any:
    """The probe's own random numbers: a rank's global generator (seeded, checkpointed,
    compared bit for bit across a resume) must not move because a probe ran."""
    import torch

    return torch.Generator().manual_seed(0)


def adamw_seconds(*, threads: int, params: int = ADAMW_PARAMS) -> float:
    """Best seconds per parameter of torch's fused fp32 AdamW step and a gradient norm."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = _generator()
        weight = torch.nn.Parameter(torch.randn(params, generator=rng))
        weight.grad = torch.randn(params, generator=rng)
        optimizer = torch.optim.AdamW([weight], lr=1e-4, fused=True)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_([weight], 1.0)
            optimizer.step()

        step()  # allocates the moments
        return min(_timed(step) for _ in range(5)) / params
    finally:
        torch.set_num_threads(before)


def matmul_tflops(precision: str, *, threads: int, seconds: float = PROBE_SECONDS) -> float:
    """Best TFLOP/s of a square ``torch.mm`` in ``precision`` over about ``seconds``."""
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = _generator()
        for n in MATMUL_SIZES:
            a = torch.randn(n, n, generator=rng).to(dtype)
            b = torch.randn(n, n, generator=rng).to(dtype)
            best = _timed(torch.mm, a, b)
            if best > SLOW_PRODUCT_S:
                break
        deadline, reps = time.perf_counter() + seconds, 1
        while reps < 3 or time.perf_counter() < deadline:
            best = min(best, _timed(torch.mm, a, b))
            reps += 1
        return 2 * n**3 / best / 1e12
    finally:
        torch.set_num_threads(before)


def steady_tflops(precision: str, *, threads: int) -> float:
    """``matmul_tflops`` at ``threads``, tried again while it scales poorly over one thread.

    Another process on one of the cores stalls every multi-threaded product
    (its threads wait for the descheduled one): up to ``PEAK_RETRIES`` more
    seconds look for a quieter one, and the answer is never below one thread's.
    """
    best = matmul_tflops(precision, threads=threads)
    if threads == 1:
        return best
    single = matmul_tflops(precision, threads=1, seconds=PROBE_SECONDS / 2)
    for _ in range(PEAK_RETRIES):
        if best >= PEAK_SCALING * threads * single:
            break
        best = max(best, matmul_tflops(precision, threads=threads))
    return max(best, single)


def _timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


@dataclass(frozen=True)
class CommCosts:
    """Seconds per gloo operation between two ranks of this node, their peer busy in between."""

    allreduce_s: float  # a 64 KiB all-reduce over two ranks
    p2p_s: float  # a 64 KiB send matched by a recv
    bandwidth_gbs: float  # a 4 MiB all-reduce over two ranks: bytes / (time - latency)


def comm_costs(procs: int, threads: int, *, path: Path | None = None) -> tuple[CommCosts, Path]:
    """gloo costs with ``procs`` processes of ``threads`` threads on this node, cached."""
    procs = min(MAX_COMM_PROCS, max(2, procs + procs % 2))
    where = path or cache_path()
    entry = cached(where, comm_key(procs, threads), lambda: _measure_comm(procs, threads))
    return CommCosts(entry["allreduce_s"], entry["p2p_s"], entry["bandwidth_gbs"]), where


def _measure_comm(procs: int, threads: int) -> dict[str, Any]:
    """Run ``procs`` gloo processes (``python -m orchestrator.planning.cpu_probe gloo``); rank 0 answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "orchestrator.planning.cpu_probe", "gloo"]
    ranks = [
        subprocess.Popen(
            [*command, str(rank), str(procs), str(port), str(threads)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(procs)
    ]
    outputs = [p.communicate(timeout=COMM_TIMEOUT_S) for p in ranks]
    failed = [
        (r, p.returncode, err)
        for r, (p, (_, err)) in enumerate(zip(ranks, outputs, strict=True))
        if p.returncode
    ]
    if failed:
        rank, code, err = failed[0]
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the gloo probe's rank {rank} exited {code}: {last}")
    return dict(json.loads(outputs[0][0])) | {"measured": time.time()}


def _gloo_rank(rank: int, world: int, port: int, threads: int) -> dict[str, float]:
    """One probe process: pairs (0, 1), (2, 3), ... time their collectives, work in between."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    groups = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    group, peer = groups[rank // 2], rank ^ 1
    a = torch.randn(128, 128, generator=_generator())
    x, big = torch.ones(COMM_ELEMENTS), torch.ones(BANDWIDTH_ELEMENTS)

    def p2p(i: int) -> None:
        if (rank + i) % 2 == 0:
            dist.send(x, peer)
        else:
            dist.recv(x, peer)

    collectives: dict[str, Callable[[int], object]] = {
        "allreduce_s": lambda i: dist.all_reduce(x, group=group),
        "p2p_s": p2p,
        "big": lambda i: dist.all_reduce(big, group=group),
    }
    rounds: dict[str, list[float]] = {name: [] for name in collectives}
    for _ in range(3):
        for name, collective in collectives.items():
            dist.barrier()
            reps, spent = (10 if name == "big" else 50), 0.0
            for i in range(reps):
                for _ in range(WORK_PRODUCTS):  # a small layer's compute between collectives
                    torch.mm(a, a)
                start = time.perf_counter()
                collective(i)
                spent += time.perf_counter() - start
            rounds[name].append(spent / reps)
    dist.destroy_process_group()
    typical = {name: statistics.median(values) for name, values in rounds.items()}
    latency = max(typical["allreduce_s"], 1e-6)
    bandwidth = BANDWIDTH_ELEMENTS * 4 / max(typical["big"] - latency, 1e-6) / 1e9
    return {
        "allreduce_s": latency,
        "p2p_s": max(typical["p2p_s"], 1e-6),
        "bandwidth_gbs": bandwidth,
    }


def bf16_warning(peaks: dict[str, float], *, cpuinfo: str | None = None) -> str | None:
    """One line when bf16 matmuls run slower than fp32 here (emulated without AMX/AVX512-BF16)."""
    fp32, bf16 = peaks["fp32"], peaks["bf16"]
    if bf16 >= fp32:
        return None
    if native_bf16(cpuinfo) is False:
        what = "emulated"
    else:  # the CPU says it has them, yet torch did not use them (or cpuinfo is unreadable)
        present = [f for f in NATIVE_BF16_FLAGS if f in _flags(cpuinfo)] or ["no flags read"]
        what = (
            f"slow though the CPU reports {', '.join(present)} (torch's kernels may be held "
            "back: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)"
        )
    return (
        f"warning: bf16 on this CPU is {what}: bf16 matmuls measured {bf16:.2g} TFLOP/s, "
        f"{fp32 / bf16:.3g}x slower than fp32 ({fp32:.2g}); use train.precision=fp32"
    )


def main(argv: list[str]) -> int:
    """``python -m orchestrator.planning.cpu_probe gloo RANK WORLD PORT THREADS``: one ``comm_costs`` rank."""
    if len(argv) != 5 or argv[0] != "gloo":
        print(
            "usage: python -m orchestrator.planning.cpu_probe gloo RANK WORLD PORT THREADS",
            file=sys.stderr,
        )
        return 2
    rank, world, port, threads = (int(v) for v in argv[1:])
    result = _gloo_rank(rank, world, port, threads)
    if rank == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
