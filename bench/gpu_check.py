"""Issue 8's GPU checks in one run of a few minutes on one H100 or H200.

Each part runs in its own process under a timeout (and all under one budget,
``--budget-s``); a part that fails or runs out of time is reported and the
next one runs. Everything printed also goes to ``OUT/gpu_check.log``, and each
part's numbers to ``OUT/<part>.json``.

1. ``env``: versions, the device, an NCCL all-reduce at world size 1, which
   SDPA kernel our attention dispatches to in bf16 (and that the flash backend
   alone runs it, forward and backward), and which AdamW the trainer builds
   (apex FusedAdam if installed, else torch's fused=True).
2. ``memory``: the real trainer (``launch/run.py launcher=local``, synthetic
   data, ZeRO-1, bf16, eager) for a few steps of ``model=1b`` at seq 2048;
   the peak ``torch.cuda.max_memory_allocated`` its monitor records
   (``metrics.jsonl``'s ``peak_mem_gb``) against ``perf.estimate``'s peak for
   the same config, with and without the plan's framework allowance (which
   covers the CUDA context and NCCL, outside the caching allocator); and the
   trainer's own tokens/s and MFU.
3. ``throughput_eager`` / ``throughput_compile``: ``bench/train_throughput.py``
   for the 1B shape, ours against transformers' ``LlamaForCausalLM`` in bf16,
   eager and compiled (two processes: four 1B models would crowd one GPU), MFU
   against the cluster config's nominal peak.
4. ``compiled_trainer``: the trainer again with ``model.compile=true`` (compiled
   blocks under DeepSpeed), on a 4-layer cut of the 1B shape to keep its
   checkpoint small; peak memory against the plan printed too.
5. ``fp16_skips``: the tiny model in fp16 (DeepSpeed's dynamic loss scaler)
   with six finite-loss Inf gradients in a row, then a NaN loss: the scaler's
   skips are counted apart (``scaler_skips``) and never roll the run back
   (``faults.max_consecutive_skips`` is 5); the NaN loss is one bad step.
   fp16 is refused on a CPU, so the smoke run skips it.
6. ``profile``: where a step's device time goes, kernel by kernel, for ours
   and transformers eager and ours compiled (``train_throughput.py --profile``):
   what the next round of GPU tuning starts from. Last, so the budget cuts it first.
7. ``summary``: the issue's targets (memory within 10%, MFU >= 50%, >= 1.3x
   transformers' tokens/s) against what the parts measured.

``--cpu-smoke`` runs the same parts with the tiny model on this CPU (cluster
``local``): it proves the plumbing, not the numbers (its "peak memory" is the
process's peak RSS, not comparable with the plan).

    bash bench/gpu_check.sh                # on the GPU machine (installs .whl/ first)
    python bench/gpu_check.py --cpu-smoke  # here
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARTS = (
    "env",
    "memory",
    "throughput_eager",
    "throughput_compile",
    "compiled_trainer",
    "fp16_skips",
    "profile",
)
# Seconds each part may take on an H100 (the budget may cut the later ones short).
TIMEOUT_S = {
    "env": 90,
    "memory": 210,
    "throughput_eager": 150,
    "throughput_compile": 240,
    "compiled_trainer": 150,
    "fp16_skips": 90,
    "profile": 150,
}
MIN_PART_S = 30  # a part is skipped when less than this is left of the budget
MEMORY_TOLERANCE = 0.10  # the "within 10%"
MFU_TARGET, SPEEDUP_TARGET = 0.50, 1.3

# The trainer's runs: a small global batch of the 1B model (16,384 tokens a step).
GPU_TRAIN = [
    "model=1b",
    "parallel=tp1pp1",
    "train.precision=bf16",
    "parallel.zero_stage=1",
    "parallel.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.steps=6",
]
CPU_TRAIN = [
    "model=tiny",
    "parallel=tp1pp1",
    "cluster=local",
    "train.precision=bf16",
    "parallel.zero_stage=1",
    "parallel.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.steps=3",
]
COMMON_TRAIN = [
    "data=synthetic",
    "launcher=local",
    "train.log_interval=1",
    "train.warmup_steps=1",
    "train.eval_interval=0",
    "monitor.tensorboard=false",
    "run.resume=never",
]
STEADY_FROM_STEP = 3  # steps before this one hold the warm-up (allocator, compile)


class Tee:
    """Lines to stdout and to the log file."""

    def __init__(self, path: Path) -> None:
        self.file: TextIO = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()


# ---------------------------------------------------------------- the driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on this CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--budget-s", type=float, default=450.0, help="all parts together")
    parser.add_argument("--cluster", help="cluster config (default: from nvidia-smi's GPU name)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in-process
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.cluster = opts.cluster or ("local" if opts.cpu_smoke else gpu_cluster())
    if opts.part is not None:
        result = PART_FUNCTIONS[opts.part](opts)
        (opts.out / f"{opts.part}.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    tee = Tee(opts.out / "gpu_check.log")
    mode = "CPU smoke (tiny model; numbers not comparable)" if opts.cpu_smoke else "GPU"
    tee.line(f"== gpu_check: {mode}; cluster={opts.cluster}; parts {' '.join(opts.parts)}")
    deadline = time.monotonic() + opts.budget_s
    status = {}
    for part in opts.parts:
        (opts.out / f"{part}.json").unlink(missing_ok=True)
        left = deadline - time.monotonic()
        if left < MIN_PART_S:
            tee.line(f"== {part}: skipped, {left:.0f} s left of --budget-s {opts.budget_s:g}")
            status[part] = "skipped (budget)"
            continue
        status[part] = run_part(part, opts, tee, timeout_s=min(TIMEOUT_S[part], left))
    summary = summarize(opts, status)
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for line in summary_lines(summary):
        tee.line(line)
    return 0 if all(s == "ok" for s in status.values()) else 1


def gpu_cluster() -> str:
    """``h200`` on an H200, else ``h100_80g`` (by nvidia-smi's name: no CUDA context here)."""
    try:
        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        name = ""
    return "h200" if "H200" in name else "h100_80g"


def run_part(part: str, opts: argparse.Namespace, tee: Tee, *, timeout_s: float) -> str:
    """Run ``--part PART`` in a child process group, its output teed; 'ok' or why not."""
    tee.line(f"== {part} (timeout {timeout_s:.0f} s)")
    cmd = [sys.executable, __file__, "--part", part, "--out", str(opts.out)]
    cmd += ["--cluster", opts.cluster] + (["--cpu-smoke"] if opts.cpu_smoke else [])
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: a timeout stops all it started
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    pump = threading.Thread(target=_copy_lines, args=(proc.stdout, tee))
    pump.start()
    try:
        code = proc.wait(timeout=timeout_s)
        outcome = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        outcome = f"timed out after {timeout_s:.0f} s"
    pump.join(timeout=10)
    tee.line(f"== {part}: {outcome} in {time.monotonic() - start:.0f} s")
    return outcome


def _copy_lines(stream: TextIO, tee: Tee) -> None:
    for line in stream:
        tee.line(line.rstrip())


def _stop_group(proc: subprocess.Popen[str]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- the parts


def part_env(opts: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "deepspeed", "hydra-core", "omegaconf", "apex"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    device = torch.device("cpu" if opts.cpu_smoke else "cuda")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["device"] = props.name
        out["device_memory_gib"] = round(props.total_memory / 2**30, 2)
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    for key, value in out.items():
        print(f"{key}: {value}")
    out["collective"] = _all_reduce_world_1(device)
    out["sdpa"] = _sdpa_check(device, tiny=opts.cpu_smoke)
    out["optimizer"] = _optimizer_check(device)
    return out


def _all_reduce_world_1(device: Any) -> str:
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    x = torch.ones(4, device=device)
    dist.all_reduce(x)
    dist.destroy_process_group()
    result = f"{backend} all_reduce at world size 1: {'ok' if float(x.sum()) == 4.0 else 'WRONG'}"
    print(result)
    return result


def _sdpa_check(device: Any, *, tiny: bool) -> dict[str, Any]:
    """Which attention kernel our Attention runs in bf16, and whether flash alone runs it."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import profile

    from model_parallel.args import ModelArgs
    from model_parallel.llama import Attention

    dim, heads, seq = (128, 8, 128) if tiny else (2048, 16, 2048)
    args = ModelArgs(dim=dim, n_layers=1, n_heads=heads, vocab_size=32000, max_seq_len=seq)
    attention = Attention(args, tp_group=None, sequence_parallel=False).to(device, torch.bfloat16)
    x = torch.randn(1, seq, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    attention(x).sum().backward()  # warm-up
    with profile() as prof:
        attention(x).sum().backward()
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})
    out: dict[str, Any] = {"dispatched": ops}
    print(f"sdpa ops in one forward+backward (bf16, head_dim {dim // heads}): {', '.join(ops)}")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            attention(x).sum().backward()
        out["flash_only"] = "ok"
    except RuntimeError as exc:
        out["flash_only"] = f"failed: {str(exc).splitlines()[0]}"
    print(f"flash backend alone, forward+backward: {out['flash_only']}")
    return out


def _optimizer_check(device: Any) -> str:
    import torch

    from orchestrator.config.schema import TrainConfig
    from orchestrator.runtime.engine import build_optimizer

    model = torch.nn.Linear(64, 64).to(device)
    opt = build_optimizer(model, TrainConfig(steps=1, global_batch_size=1, lr=1e-3))
    fused = opt.defaults.get("fused")
    result = f"{type(opt).__module__}.{type(opt).__name__} (fused={fused})"
    print(f"trainer's optimizer on {device.type}: {result}")
    return result


def part_memory(opts: argparse.Namespace) -> dict[str, Any]:
    return _trainer_run(opts, name="memory", extra=[])


def part_compiled_trainer(opts: argparse.Namespace) -> dict[str, Any]:
    extra = ["model.compile=true"] + ([] if opts.cpu_smoke else ["model.n_layers=4"])
    return _trainer_run(opts, name="compiled_trainer", extra=extra)


def _trainer_run(opts: argparse.Namespace, *, name: str, extra: list[str]) -> dict[str, Any]:
    """The real trainer for a few steps; its recorded peak memory against the plan's."""
    from orchestrator.config.compose import compose_config
    from orchestrator.planning import perf
    from orchestrator.planning.plan import validate_config

    base = CPU_TRAIN if opts.cpu_smoke else GPU_TRAIN + [f"cluster={opts.cluster}"]
    overrides = base + COMMON_TRAIN + extra
    cfg = compose_config(overrides, conf_dir=REPO / "conf")
    plan = validate_config(cfg)
    est = perf.estimate(plan, cfg.model, cfg.cluster)
    code, records = _train_in_scratch(name, overrides)
    if code != 0 or not records:
        raise SystemExit(f"{name}: the trainer exited {code} with {len(records)} metrics records")
    return _memory_report(cfg, est, records, cpu=opts.cpu_smoke)


def _train_in_scratch(name: str, overrides: list[str]) -> tuple[int, list[dict[str, Any]]]:
    """``launch/run.py`` with its run directory in scratch space: the exit code and the
    metrics records; the directory is removed (its checkpoint: GBs for the 1B model)."""
    from orchestrator.status.metrics import read_metrics

    run_dir = _scratch_dir() / f"gpu_check_{name}_{os.getpid()}"
    cmd = [sys.executable, "launch/run.py", *overrides, f"run.dir={run_dir}"]
    print("$ " + " ".join(cmd), flush=True)
    try:
        code = subprocess.run(cmd, cwd=REPO).returncode
        records = read_metrics(run_dir / "metrics.jsonl") if run_dir.exists() else []
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return code, records


FP16_SCALER_SKIPS, FP16_NAN_STEP, FP16_STEPS = 6, 9, 10


def fp16_overrides(cluster: str) -> list[str]:
    """The fp16 part's run: Inf gradients (finite losses) at batches 2-7, a NaN loss at 9."""
    inf_steps = ",".join(str(n) for n in range(2, 2 + FP16_SCALER_SKIPS))
    return [
        "model=tiny",
        "parallel=tp1pp1",
        "parallel.zero_stage=1",
        "train.precision=fp16",
        f"train.steps={FP16_STEPS}",
        f"cluster={cluster}",
        *COMMON_TRAIN,
        f"faults.inject_inf_grad_at_steps=[{inf_steps}]",
        f"faults.inject_nan_at_steps=[{FP16_NAN_STEP}]",
    ]


def part_fp16_skips(opts: argparse.Namespace) -> dict[str, Any]:
    """fp16's loss-scaler skips are not bad steps; a NaN loss is (orchestrator.runtime.numerics)."""
    if opts.cpu_smoke:
        print("fp16_skips: fp16 needs a GPU (train.precision=fp16 is refused on a CPU)")
        return {"skipped": "fp16 needs a GPU"}
    code, records = _train_in_scratch("fp16", fp16_overrides(opts.cluster))
    last = records[-1] if records else {}
    steps = [int(m["step"]) for m in records]
    out = {
        "exit_code": code,
        "steps": steps,
        "scaler_skips": last.get("scaler_skips"),
        "skipped_steps": last.get("skipped_steps"),
        "loss_scale": last.get("loss_scale"),
        "rolled_back": len(steps) != len(set(steps)),  # a rollback trains its steps again
    }
    out["ok"] = (
        code == 0
        and steps == list(range(1, FP16_STEPS + 1))
        and (out["scaler_skips"] or 0) >= FP16_SCALER_SKIPS  # the scale may settle once more
        and out["skipped_steps"] == 1
    )
    print(f"fp16_skips: {out}")
    if not out["ok"]:
        raise SystemExit(f"fp16_skips: not as expected: {out}")
    return out


def _scratch_dir() -> Path:
    """RAM-backed /dev/shm when it can take the 1B checkpoint (~18 GB), else /tmp."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * 2**30:
        return shm
    return Path("/tmp")


def _memory_report(cfg: Any, est: Any, records: list[dict[str, Any]], *, cpu: bool) -> dict:
    gib = 2.0**30
    peak = est.peak
    planned = peak.total / gib
    allowance = peak.overhead / gib
    measured = max(r["peak_mem_gb"] for r in records)  # GiB: max_memory_allocated / 2**30
    steady = [r for r in records if r["step"] >= STEADY_FROM_STEP] or records[-1:]
    tokens = statistics.median(r["tokens_per_s_per_device"] for r in steady)
    mfu = statistics.median(r["mfu"] for r in steady)
    ratio = measured / (planned - allowance)
    out = {
        "plan_items_gib": {k: round(v / gib, 3) for k, v in peak.items()},
        "plan_peak_gib": round(planned, 3),
        "plan_peak_without_allowance_gib": round(planned - allowance, 3),
        "measured_peak_gib": round(measured, 3),
        "ratio_measured_to_plan_without_allowance": round(ratio, 4),
        "ratio_measured_to_plan": round(measured / planned, 4),
        "within_tolerance": None if cpu else abs(ratio - 1) <= MEMORY_TOLERANCE,
        "tokens_per_s_per_device": round(tokens, 1),
        "mfu": round(mfu, 4),
        "peak_tflops": est.peak_tflops,  # a CPU cluster's is measured (cluster.peak_tflops null)
        "steps": len(records),
    }
    items = ", ".join(f"{k} {v:.2f}" for k, v in out["plan_items_gib"].items())
    what = "peak RSS (CPU: not comparable)" if cpu else "torch.cuda.max_memory_allocated"
    print(f"plan peak: {planned:.2f} GiB = {items}")
    print(f"plan peak without the framework allowance: {planned - allowance:.2f} GiB")
    print(f"measured ({what}): {measured:.2f} GiB")
    print(
        f"measured / plan without allowance: {ratio:.3f}; measured / plan: "
        f"{measured / planned:.3f}; within {MEMORY_TOLERANCE:.0%}: {out['within_tolerance']}"
    )
    print(
        f"trainer: {tokens:,.1f} tokens/s per device, MFU {100 * mfu:.1f}% of "
        f"{est.peak_tflops:g} TFLOP/s (median of steps >= {STEADY_FROM_STEP})"
    )
    return out


def part_throughput_eager(opts: argparse.Namespace) -> dict[str, Any]:
    return _throughput(opts, ["ours", "hf"])


def part_throughput_compile(opts: argparse.Namespace) -> dict[str, Any]:
    return _throughput(opts, ["ours+compile", "hf+compile"])


def _throughput(opts: argparse.Namespace, runners: list[str]) -> dict[str, Any]:
    from orchestrator.config.compose import compose_config

    peak = compose_config([f"cluster={opts.cluster}"], conf_dir=REPO / "conf").cluster.peak_tflops
    rows_path = opts.out / f"rows_{os.getpid()}.json"
    cmd = [sys.executable, "bench/train_throughput.py", "--precisions", "bf16"]
    cmd += ["--runners", *runners, "--json", str(rows_path)]
    if opts.cpu_smoke:
        cmd += ["--models", "tiny", "--rounds", "1", "--steps", "1"]
    else:
        cmd += ["--device", "cuda", "--models", "1b", "--rounds", "3", "--steps", "3"]
        cmd += ["--peak-tflops", f"{peak:g}"]
    print("$ " + " ".join(cmd), flush=True)
    try:
        code = subprocess.run(cmd, cwd=REPO).returncode
        result = json.loads(rows_path.read_text()) if rows_path.exists() else None
    finally:
        rows_path.unlink(missing_ok=True)
    if code != 0 or result is None:
        raise SystemExit(f"train_throughput.py exited {code}")
    return result


def part_profile(opts: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "bench/train_throughput.py", "--profile", "--precisions", "bf16"]
    cmd += ["--runners", "ours", "hf", "ours+compile"]
    if opts.cpu_smoke:
        cmd += ["--models", "tiny"]
    else:
        cmd += ["--device", "cuda", "--models", "1b"]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], end="")
        raise SystemExit(f"train_throughput.py --profile exited {proc.returncode}")
    return {"table": proc.stdout.splitlines()}


PART_FUNCTIONS = {
    "env": part_env,
    "memory": part_memory,
    "throughput_eager": part_throughput_eager,
    "throughput_compile": part_throughput_compile,
    "compiled_trainer": part_compiled_trainer,
    "fp16_skips": part_fp16_skips,
    "profile": part_profile,
}


# ---------------------------------------------------------------- the summary


def summarize(opts: argparse.Namespace, status: dict[str, str]) -> dict[str, Any]:
    """The parts' JSON files against the issue's targets."""
    results = {}
    for part in PARTS:
        path = opts.out / f"{part}.json"
        results[part] = json.loads(path.read_text()) if path.exists() else None
    tokens = {}
    mfu = {}
    for part in ("throughput_eager", "throughput_compile"):
        for row in (results[part] or {}).get("rows", []):
            tokens[row["runner"]] = row["tokens_per_s"]
            mfu[row["runner"]] = row["mfu"]
    speedups = {
        f"{a} / {b}": tokens[a] / tokens[b]
        for a, b in (("ours", "hf"), ("ours+compile", "hf"), ("ours+compile", "hf+compile"))
        if a in tokens and b in tokens
    }
    memory = results["memory"] or {}
    return {
        "mode": "cpu-smoke" if opts.cpu_smoke else "gpu",
        "cluster": opts.cluster,
        "status": status,
        "env": results["env"],
        "memory": memory,
        "compiled_trainer": results["compiled_trainer"],
        "bench_tokens_per_s": tokens,
        "bench_mfu": mfu,
        "speedups": speedups,
        "targets": {
            f"memory within {MEMORY_TOLERANCE:.0%}": memory.get("within_tolerance"),
            f"best MFU of ours >= {MFU_TARGET:.0%}": _best_ours_mfu(mfu, memory),
            f"ours+compile >= {SPEEDUP_TARGET}x hf": speedups.get("ours+compile / hf"),
        },
    }


def _best_ours_mfu(mfu: dict[str, float], memory: dict[str, Any]) -> float | None:
    values = [v for k, v in mfu.items() if k.startswith("ours")]
    if "mfu" in memory:
        values.append(memory["mfu"])
    return max(values) if values else None


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"== summary ({s['mode']}, cluster={s['cluster']})"]
    lines += [f"part {part}: {outcome}" for part, outcome in s["status"].items()]
    mem = s["memory"]
    if mem:
        lines.append(
            f"memory: plan {mem['plan_peak_gib']:.2f} GiB ({mem['plan_peak_without_allowance_gib']:.2f}"
            f" without allowance), measured {mem['measured_peak_gib']:.2f} GiB, ratio "
            f"{mem['ratio_measured_to_plan_without_allowance']:.3f}"
        )
        lines.append(
            f"trainer (memory run, eager): {mem['tokens_per_s_per_device']:,.1f} tokens/s, "
            f"MFU {100 * mem['mfu']:.1f}%"
        )
    for runner, tps in s["bench_tokens_per_s"].items():
        lines.append(
            f"bench {runner}: {tps:,.1f} tokens/s, MFU {100 * s['bench_mfu'][runner]:.1f}%"
        )
    lines += [f"speedup {name}: {value:.2f}x" for name, value in s["speedups"].items()]
    for target, value in s["targets"].items():
        shown = "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else value
        lines.append(f"target {target}: {shown}")
    if s["mode"] == "cpu-smoke":
        lines.append("(CPU smoke: plumbing only; these numbers say nothing about a GPU)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
