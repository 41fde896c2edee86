"""Training tokens/s on this CPU: our LLaMA against transformers' LlamaForCausalLM.

One process, the same shapes, batch and optimiser for both: the trainer's own
``orchestrator.runtime.engine.build_optimizer`` (torch's fused AdamW, lr 3e-4, betas
0.9 and 0.95, weight decay 0.1 on matrices only), in fp32 and in bf16
(weights, gradients and optimiser state all bf16: both models are cast, no
autocast). The runners alternate: each round times ``--steps`` steps of each,
so a change in machine load hits all of them. Model FLOPs utilisation is
measured against this machine's own peak: a square ``torch.mm`` timed here in
each precision. Model FLOPs per token: ``orchestrator.planning.flops.model_flops_per_token``
(6·N_matmul + 12·l·s·d). transformers is given ``labels`` and shifts them
itself; we give next-token targets; both compute logits for all s positions.

Runners: ``ours`` (eager), ``hf`` (eager, the reference of every ratio) and,
with ``--compile``, ``ours+compile`` (``model.compile=true``: the trainer's
``compile_model``, blocks and tp = 1 loss) and ``hf+compile`` (the whole
``LlamaForCausalLM`` compiled, loss included). Warm-up steps, where the
compile happens, are not timed.

    python bench/train_throughput.py                 # tiny and 60M, fp32 and bf16
    python bench/train_throughput.py --models 60m --precisions bf16 --compile
    python bench/train_throughput.py --models 60m --precisions bf16 --profile

On a GPU (``bench/gpu_check.sh``): ``--device cuda`` times with a
synchronize around each step, measures the matmul peak with 8192-sized
products, and ``--peak-tflops`` makes MFU relative to the device's nominal
peak instead (the measured one is still printed). ``--runners`` picks a
subset (eager and compiled in separate processes keep a 1B model's four
copies out of one GPU's memory); ``--json`` also writes the rows to a file.

    python bench/train_throughput.py --device cuda --models 1b --precisions bf16 \
        --runners ours hf --peak-tflops 989 --json eager.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_parallel.args import ModelArgs  # noqa: E402
from model_parallel.llama import Transformer, compile_model  # noqa: E402
from orchestrator.config.schema import TrainConfig  # noqa: E402
from orchestrator.planning.flops import model_flops_per_token  # noqa: E402
from orchestrator.runtime.engine import build_optimizer  # noqa: E402

# name: (shape, micro-batch, seq)
MODELS = {
    "tiny": (ModelArgs(dim=128, n_layers=4, n_heads=8, vocab_size=2000, multiple_of=64), 8, 128),
    "60m": (ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256), 4, 512),
    # conf/model/1b.yaml's shape, for a GPU (8,192 tokens per step).
    "1b": (
        ModelArgs(dim=2048, n_layers=22, n_heads=16, vocab_size=32000, multiple_of=256),
        4,
        2048,
    ),
}
CPU_MODELS = ["tiny", "60m"]  # the default: what this CPU runs in minutes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")
GPU_MATMUL_N = 8192  # a 2048-sized product is too small to reach a GPU's peak


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype, *, n: int = 2048, reps: int = 10, device: torch.device = CPU
) -> float:
    """Best FLOP/s of a square n x n matmul in ``dtype`` (2·n³ FLOPs)."""
    a = torch.randn(n, n).to(device, dtype)
    b = torch.randn(n, n).to(device, dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


Runner = tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def ours(
    args: ModelArgs, dtype: torch.dtype, *, compile: bool, device: torch.device = CPU
) -> Runner:
    model = Transformer(args, seed=0).to(device, dtype)
    if compile:
        compile_model(model)

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        return model.loss(model(inputs), targets).float().mean()

    return model, loss


def hugging_face(
    args: ModelArgs, dtype: torch.dtype, *, compile: bool, device: torch.device = CPU
) -> Runner:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_heads,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with device:  # initialised where it runs: a 1B model's init on a GPU takes no time
        model = LlamaForCausalLM(config).to(dtype)
    if compile:
        model.compile()  # the whole model, loss included: what a transformers user would do

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        inputs = tokens[:, :-1]
        return model(input_ids=inputs, labels=inputs).loss

    return model, loss


RUNNERS: dict[str, Callable[..., Runner]] = {
    "ours": functools.partial(ours, compile=False),
    "hf": functools.partial(hugging_face, compile=False),
    "ours+compile": functools.partial(ours, compile=True),
    "hf+compile": functools.partial(hugging_face, compile=True),
}
WARMUP_STEPS = 3  # allocator, optimiser state, and the compile (twice for dynamic shapes)


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimiser for this model (``orchestrator.runtime.engine.build_optimizer``)."""
    train = TrainConfig(steps=1, global_batch_size=1, lr=3e-4, weight_decay=0.1)
    return build_optimizer(model, train)


def time_steps(
    loss_fn: Callable[..., torch.Tensor], opt: torch.optim.Optimizer, tokens: torch.Tensor, n: int
) -> list[float]:
    times = []
    for _ in range(n):
        _sync(tokens.device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(tokens).backward()
        opt.step()
        _sync(tokens.device)
        times.append(time.perf_counter() - start)
    return times


def _shape(name: str) -> tuple[ModelArgs, int, int]:
    args, batch, seq = MODELS[name]
    return ModelArgs(**{**args.__dict__, "max_seq_len": seq}), batch, seq


def bench(
    name: str,
    precision: str,
    runners: list[str],
    *,
    rounds: int,
    steps: int,
    device: torch.device = CPU,
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """Tokens/s (median step) and MFU of each runner.

    ``peak_gflops``: what MFU is relative to, the matmul peak measured here in
    this precision (``measured_gflops``) unless ``peak_tflops`` names one.
    """
    args, batch, seq = _shape(name)
    dtype = DTYPES[precision]
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1)).to(device)
    built = {}
    for label in runners:
        model, loss_fn = RUNNERS[label](args, dtype, device=device)
        opt = optimizer(model)
        time_steps(loss_fn, opt, tokens, WARMUP_STEPS)
        built[label] = (loss_fn, opt)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, (loss_fn, opt) in built.items():
            times[label] += time_steps(loss_fn, opt, tokens, steps)
    n = GPU_MATMUL_N if device.type == "cuda" else 2048
    measured = matmul_peak(dtype, n=n, device=device)
    peak = measured if peak_tflops is None else peak_tflops * 1e12
    flops = model_flops_per_token(args, seq)
    out = {"peak_gflops": peak / 1e9, "measured_gflops": measured / 1e9}
    for label, samples in times.items():
        tps = batch * seq / statistics.median(samples)
        out[f"{label}_tokens_per_s"] = tps
        out[f"{label}_mfu"] = tps * flops / peak
    return out


def profile(
    name: str,
    precision: str,
    runners: list[str],
    *,
    steps: int = 3,
    rows: int = 15,
    device: torch.device = CPU,
) -> None:
    """Print each runner's busiest ops (on a GPU: kernels) over ``steps`` steps, in ms per step.

    Inductor's CPU kernels are recorded under their own names
    (``cpp.enable_kernel_profile``), so a compiled runner's time is split by
    kernel, not lumped into one ``CompiledFxGraph`` call; on a GPU the table
    is the kernels' self device time (triton kernels named as inductor names them).
    """
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inductor_config.cpp.enable_kernel_profile = True
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    what = "device" if cuda else "cpu"

    def self_us(e: Any) -> float:
        if cuda:  # self_cuda_time_total in torch releases before the rename
            return float(getattr(e, "self_device_time_total", None) or e.self_cuda_time_total)
        return float(e.self_cpu_time_total)

    args, batch, seq = _shape(name)
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1)).to(device)
    for label in runners:
        model, loss_fn = RUNNERS[label](args, DTYPES[precision], device=device)
        opt = optimizer(model)
        time_steps(loss_fn, opt, tokens, WARMUP_STEPS)
        with torch_profile(activities=activities) as prof:
            time_steps(loss_fn, opt, tokens, steps)
        events = sorted(prof.key_averages(), key=self_us, reverse=True)
        total = sum(self_us(e) for e in events) / steps / 1e3
        print(f"== {label}: {name} {precision}, self {what} time {total:.1f} ms per step")
        for e in events[:rows]:
            print(f"{self_us(e) / steps / 1e3:8.1f} ms {e.count // steps:4d}x  {e.key[:110]}")
        del model, loss_fn, opt
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=CPU_MODELS, choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per runner per round")
    parser.add_argument(
        "--compile", action="store_true", help="add ours+compile and hf+compile runners"
    )
    parser.add_argument("--profile", action="store_true", help="print each runner's busiest ops")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--runners", nargs="+", choices=list(RUNNERS), help="these runners only (else as --compile)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="MFU against this nominal peak (default: measured here)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    opts = parser.parse_args()
    runners = opts.runners or ["ours", "hf"] + (
        ["ours+compile", "hf+compile"] if opts.compile else []
    )
    device = torch.device(opts.device)
    if opts.profile:
        for name in opts.models:
            for precision in opts.precisions:
                profile(name, precision, runners, device=device)
        return
    import transformers

    machine = (
        f"machine: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    if device.type == "cuda":
        machine += f", device {torch.cuda.get_device_name(device)}"
    print(machine)
    # Ratios are to eager transformers; without that runner, to the first hf one chosen.
    reference = next((r for r in ("hf", "hf+compile") if r in runners), runners[0])
    print(f"model  precision  peak GFLOP/s  runner        tok/s  vs {reference}    MFU")
    rows = []
    for name in opts.models:
        for precision in opts.precisions:
            r = bench(
                name,
                precision,
                runners,
                rounds=opts.rounds,
                steps=opts.steps,
                device=device,
                peak_tflops=opts.peak_tflops,
            )
            for label in runners:
                tps = r[f"{label}_tokens_per_s"]
                ratio = tps / r[f"{reference}_tokens_per_s"]
                print(
                    f"{name:5}  {precision:9}  {r['peak_gflops']:12.1f}  {label:12}  {tps:7.1f}"
                    f"  {ratio:5.2f}  {100 * r[f'{label}_mfu']:5.1f}%",
                    flush=True,
                )
                rows.append(
                    {
                        "model": name,
                        "precision": precision,
                        "runner": label,
                        "tokens_per_s": tps,
                        "mfu": r[f"{label}_mfu"],
                        f"vs_{reference}": ratio,
                        "peak_gflops": r["peak_gflops"],
                        "measured_gflops": r["measured_gflops"],
                    }
                )
            if opts.peak_tflops is not None:
                print(
                    f"  (MFU against the nominal {opts.peak_tflops:g} TFLOP/s; a square "
                    f"{precision} matmul reached {r['measured_gflops'] / 1e3:.1f} TFLOP/s here)"
                )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if opts.json is not None:
        opts.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
