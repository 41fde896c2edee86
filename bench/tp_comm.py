"""Tensor parallelism on this CPU: tp2 against tp1 for the same model and batch.

Layouts, each a fresh set of gloo processes (``tests.distributed.run_ranks``)
training our LLaMA (``model_parallel.llama.Transformer``) in fp32 with plain
``torch.optim.AdamW`` on the same batch: forward, vocab-parallel cross entropy,
backward, step.

* ``tp1``: one process, the whole batch, 2 torch threads (the whole machine);
* ``tp1-1t``: the same with 1 thread (what each rank of the 2-process runs has);
* ``tp2``: two processes, 1 thread each, the model split over tp, the whole
  batch on both;
* ``dp2``: two processes, 1 thread each, tp1 model, half the batch each and
  one all-reduce of all gradients (flattened) after backward.

During the timed steps ``torch.distributed.all_reduce`` is wrapped
(``AllReduceCounter``): every call is counted (tensor numel x element size)
and labelled by where it was issued, and compared with the analytic count
(``analytic_tp_all_reduces``): per layer per micro-batch four all-reduces of
b·s·h (forward: attention wo and MLP w2, row-parallel; backward: the input
gradients of wq/wk/wv and of w1/w3, column-parallel), plus the embedding's
forward one (b·s·h), the output layer's backward one (b·s·h) and the
cross entropy's three of b·s (max, target logit, sum of exponentials).

Each round runs every layout once; the table gives medians over all timed
steps, a step's time being its slowest rank's. ``cpu s``: the process's CPU
seconds per step (all its threads); ``tp AR s``/``dp AR s``: seconds inside
``all_reduce`` per step, transfer plus waiting for the peer.

    flock /tmp/cpu.lock python bench/tp_comm.py               # 60m, about 4 minutes
    flock /tmp/cpu.lock python bench/tp_comm.py --size tiny --steps 3 --rounds 1
"""

from __future__ import annotations

import argparse
import linecache
import os
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_parallel.args import ModelArgs  # noqa: E402
from model_parallel.cross_entropy import masked_mean  # noqa: E402
from model_parallel.groups import ProcessGroups  # noqa: E402
from model_parallel.layout import Layout  # noqa: E402
from model_parallel.llama import Transformer  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

# name: (shape, micro-batch, seq)
SIZES = {
    "tiny": (ModelArgs(dim=128, n_layers=4, n_heads=8, vocab_size=2000, multiple_of=64), 8, 128),
    "60m": (ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256), 4, 512),
}
LAYOUTS = ("tp1", "tp1-1t", "tp2", "dp2")

# A column-parallel layer's input comes out of the RMSNorm in front of it: the
# backward all-reduce is named by that norm's weight, found in the graph.
_NORM_FEEDS = {
    "attention_norm": "attention.wq/wk/wv input",
    "ffn_norm": "feed_forward.w1/w3 input",
    "norm": "output input",
}
_FUNCTION_DIR = re.compile(r"^(\w+)\.(forward|backward)$")


# --- counting ---------------------------------------------------------------------------


Site = tuple[str, str, str]  # (forward/backward, autograd function, where in the model)


@dataclass
class Tally:
    calls: int = 0
    elements: int = 0
    bytes: int = 0
    seconds: float = 0.0


@dataclass
class AllReduceCounter:
    """Counts ``dist.all_reduce`` calls on ``tp_group`` by site; others go to ``other``.

    Labelling walks the Python stack (the autograd function issuing the call,
    the module calling it in forward) and, in backward, the autograd graph
    from the function's node to the RMSNorm weight feeding it. It is only
    active inside ``counting()``; the model code is untouched.
    """

    model: nn.Module
    tp_group: dist.ProcessGroup | None
    sites: dict[Site, Tally] = field(default_factory=lambda: defaultdict(Tally))
    other: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self._modules = {id(m): _generic(n) for n, m in self.model.named_modules()}
        self._params = {id(p): _generic(n) for n, p in self.model.named_parameters()}

    def reset(self) -> None:
        self.sites = defaultdict(Tally)
        self.other = Tally()

    @contextmanager
    def counting(self) -> Iterator[AllReduceCounter]:
        original = dist.all_reduce

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            start = time.perf_counter()
            out = original(tensor, *args, **kwargs)
            elapsed = time.perf_counter() - start
            mine = self.tp_group is not None and group is self.tp_group
            tally = self.sites[self._site(sys._getframe(1))] if mine else self.other
            tally.calls += 1
            tally.elements += tensor.numel()
            tally.bytes += tensor.numel() * tensor.element_size()
            tally.seconds += elapsed
            return out

        dist.all_reduce = all_reduce  # type: ignore[assignment]
        try:
            yield self
        finally:
            dist.all_reduce = original  # type: ignore[assignment]

    def _site(self, frame: Any) -> Site:
        function, direction, where = "?", "?", "?"
        while frame is not None:
            match = _FUNCTION_DIR.match(frame.f_code.co_qualname)
            if function == "?" and match and "ctx" in frame.f_locals:
                function, direction = match.groups()
                if direction == "backward":
                    where = self._fed_by(frame.f_locals["ctx"])
                    break
                # the cross entropy issues three: name each by its tensor
                line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
                tensor = re.search(r"_all_reduce\((\w+),", line)
                if tensor and "ReduceOp" in line:
                    where = f"loss {tensor.group(1)}"
                    break
            elif function != "?" and id(frame.f_locals.get("self")) in self._modules:
                where = self._modules[id(frame.f_locals["self"])]
                break
            frame = frame.f_back
        return direction, function, where

    def _fed_by(self, node: Any, depth: int = 3) -> str:
        """What the layer owning this backward node reads: found via the norm weight."""
        for next_node, _ in getattr(node, "next_functions", ()):
            if next_node is None:
                continue
            name = self._params.get(id(getattr(next_node, "variable", None)))
            if name is not None and name.endswith("norm.weight"):
                prefix, norm = name[: -len(".weight")].rpartition(".")[::2]
                return f"{prefix + '.' if prefix else ''}{_NORM_FEEDS.get(norm, norm)}"
            if depth > 1 and (found := self._fed_by(next_node, depth - 1)) != "?":
                return found
        return "?"


def _generic(name: str) -> str:
    """``layers.3.attention.wo`` -> ``layers.*.attention.wo``: one site for every layer."""
    return re.sub(r"^layers\.\d+", "layers.*", name)


def analytic_tp_all_reduces(
    args: ModelArgs, batch: int, seq: int, *, tp: int, element_size: int = 4
) -> dict[Site, Tally]:
    """Calls, elements and bytes all-reduced over tp in one step of one micro-batch."""
    if tp == 1:
        return {}
    bsh, bs, n = batch * seq * args.dim, batch * seq, args.n_layers
    counts: dict[Site, tuple[int, int]] = {
        ("forward", "_ReduceFromTP", "tok_embeddings"): (1, bsh),
        ("forward", "_ReduceFromTP", "layers.*.attention.wo"): (n, bsh),
        ("forward", "_ReduceFromTP", "layers.*.feed_forward.w2"): (n, bsh),
        ("backward", "_CopyToTP", "layers.*.attention.wq/wk/wv input"): (n, bsh),
        ("backward", "_CopyToTP", "layers.*.feed_forward.w1/w3 input"): (n, bsh),
        ("backward", "_CopyToTP", "output input"): (1, bsh),
        ("forward", "_VocabParallelCrossEntropy", "loss z_max"): (1, bs),
        ("forward", "_VocabParallelCrossEntropy", "loss z_target"): (1, bs),
        ("forward", "_VocabParallelCrossEntropy", "loss sum_exp"): (1, bs),
    }
    return {
        site: Tally(calls=calls, elements=calls * numel, bytes=calls * numel * element_size)
        for site, (calls, numel) in counts.items()
    }


# --- one layout ---------------------------------------------------------------------------


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


def _step(
    model: Transformer,
    opt: torch.optim.Optimizer,
    tokens: torch.Tensor,
    dp_group: dist.ProcessGroup | None,
) -> float:
    opt.zero_grad(set_to_none=True)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss = masked_mean(model.loss(model(inputs), targets), targets)
    loss.backward()
    if dp_group is not None:
        grads = [p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp_group)
        flat /= dist.get_world_size(dp_group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    opt.step()
    return loss.item()


def run_layout(
    rank: int,
    world: int,
    layout: str,
    shape: tuple[ModelArgs, int, int],
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """Train ``steps`` timed steps of ``shape`` (model, micro-batch, seq) under ``layout``.

    Returns this rank's step times, losses (warm-up first) and, per timed
    step, the all-reduces counted on the tp group and on other groups.
    """
    torch.set_num_threads(2 if layout == "tp1" else 1)
    args, batch, seq = shape
    args = ModelArgs(**{**args.__dict__, "max_seq_len": seq})
    tokens = torch.randint(
        0, args.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)
    )
    dp_group = None
    if layout == "tp2":
        groups = ProcessGroups.build(Layout(tp=world))
    elif layout == "dp2":
        groups = ProcessGroups.build(Layout(dp=world))
        dp_group = groups.dp_group
        tokens = tokens.chunk(world)[rank]
    else:
        groups = ProcessGroups.single()
    model = Transformer(args, groups=groups, seed=0)
    opt = _optimizer(model)
    losses = [_step(model, opt, tokens, dp_group) for _ in range(warmup)]
    counter = AllReduceCounter(model, groups.tp_group)
    times, cpu, counts = [], [], []
    with counter.counting():
        for _ in range(steps):
            counter.reset()
            start, start_cpu = time.perf_counter(), time.process_time()
            losses.append(_step(model, opt, tokens, dp_group))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)  # all threads of this process
            counts.append((dict(counter.sites), counter.other))
    return {"times": times, "cpu": cpu, "losses": losses, "counts": counts}


# --- report -----------------------------------------------------------------------------


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def compare_bytes(measured: dict[Site, Tally], analytic: dict[Site, Tally]) -> list[str]:
    """One line per site (calls, bytes measured and analytic, difference) and a total."""
    lines = [
        f"{'direction':9} {'function':27} {'where':36} {'calls':>5} {'bytes':>12}"
        f" {'analytic':>12} {'diff':>6}"
    ]
    for site in sorted(set(measured) | set(analytic)):
        got, want = measured.get(site, Tally()), analytic.get(site, Tally())
        lines.append(
            f"{site[0]:9} {site[1]:27} {site[2]:36} {got.calls:5d} {got.bytes:12,d}"
            f" {want.bytes:12,d} {got.bytes - want.bytes:6d}"
        )
    got_total = sum(t.bytes for t in measured.values())
    want_total = sum(t.bytes for t in analytic.values())
    calls = sum(t.calls for t in measured.values())
    lines.append(
        f"{'total':74} {calls:5d} {got_total:12,d} {want_total:12,d} {got_total - want_total:6d}"
    )
    return lines


def summarise(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over every timed step of every run (``run_layout``'s results, one per rank).

    A step ends when its slowest rank does: its time is the largest over the
    ranks, and so are its CPU seconds and its seconds inside all-reduce.
    """

    def median(value: Any) -> float:
        return statistics.median(
            max(value(r, i) for r in ranks) for ranks in runs for i in range(len(ranks[0]["times"]))
        )

    return {
        "procs": len(runs[0]),
        "step_s": median(lambda r, i: r["times"][i]),
        "cpu_s": median(lambda r, i: r["cpu"][i]),
        "tp_s": median(lambda r, i: sum(t.seconds for t in r["counts"][i][0].values())),
        "dp_s": median(lambda r, i: r["counts"][i][1].seconds),
        "counts": [c for ranks in runs for r in ranks for c in r["counts"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="60m", choices=list(SIZES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout per round")
    parser.add_argument("--rounds", type=int, default=2, help="each round runs every layout")
    opts = parser.parse_args()
    args, batch, seq = SIZES[opts.size]
    print(
        f"machine: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()},"
        f" torch {torch.__version__}, load average {_load()} at the start"
    )
    print(
        f"model {opts.size}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads,"
        f" vocab {args.vocab_size}, seq {seq}, micro-batch {batch}, fp32, AdamW;"
        f" {opts.rounds} rounds of every layout, each {opts.warmup} warm-up + {opts.steps}"
        " timed steps",
        flush=True,
    )
    runs: dict[str, list[list[dict[str, Any]]]] = {layout: [] for layout in opts.layouts}
    for round_ in range(opts.rounds):
        for layout in opts.layouts:
            world = 2 if layout in ("tp2", "dp2") else 1
            ranks = run_ranks(
                run_layout, world, layout, SIZES[opts.size], opts.warmup, opts.steps, timeout=1800
            )
            runs[layout].append(ranks)
            times = " ".join(
                f"{max(t):.3f}" for t in zip(*(r["times"] for r in ranks), strict=True)
            )
            losses = " ".join(
                f"{statistics.mean(x):.6f}" for x in zip(*(r["losses"] for r in ranks), strict=True)
            )
            print(
                f"  round {round_} {layout}: step s {times}; loss (mean over ranks, warm-up"
                f" first) {losses}; load average {_load()}",
                flush=True,
            )
    results = {layout: summarise(r) for layout, r in runs.items()}
    print(
        f"\n{'layout':7} {'procs':>5} {'threads':>7} {'step s':>7} {'vs tp1':>6} {'vs tp1-1t':>9}"
        f" {'cpu s':>6} {'tp AR s':>7} {'dp AR s':>7} {'tokens/s':>8}"
    )
    for layout, r in results.items():
        ratios = [
            f"{r['step_s'] / results[b]['step_s']:.2f}" if b in results else "-"
            for b in ("tp1", "tp1-1t")
        ]
        print(
            f"{layout:7} {r['procs']:5d} {2 if layout == 'tp1' else 1:7d} {r['step_s']:7.3f}"
            f" {ratios[0]:>6} {ratios[1]:>9} {r['cpu_s']:6.3f} {r['tp_s']:7.3f} {r['dp_s']:7.3f}"
            f" {batch * seq / r['step_s']:8.1f}"
        )
    if "tp2" in results:
        analytic = analytic_tp_all_reduces(args, batch, seq, tp=2)
        print("\ntp2: all-reduce bytes per step on the tp group, rank 0, measured vs analytic")
        print("\n".join(compare_bytes(results["tp2"]["counts"][0][0], analytic)))
        bsh, bs, n = batch * seq * args.dim, batch * seq, args.n_layers
        print(
            f"analytic: (4·{n} layers + 2)·b·s·h + 3·b·s = {(4 * n + 2) * bsh + 3 * bs:,d}"
            f" fp32 elements = {4 * ((4 * n + 2) * bsh + 3 * bs):,d} bytes per step"
        )
        same = all(bytes_equal(sites, analytic) for sites, _ in results["tp2"]["counts"])
        print(f"every timed step on every rank equal to the analytic count: {same}")
    if "dp2" in results:
        other = results["dp2"]["counts"][0][1]
        print(f"dp2: gradient all-reduce {other.calls} call(s), {other.bytes:,d} bytes per step")
    print(f"load average {_load()} at the end")


def bytes_equal(measured: dict[Site, Tally], analytic: dict[Site, Tally]) -> bool:
    """The same sites with the same calls and bytes (seconds ignored)."""
    keys = set(measured) | set(analytic)
    return all(
        (measured.get(k, Tally()).calls, measured.get(k, Tally()).bytes)
        == (analytic.get(k, Tally()).calls, analytic.get(k, Tally()).bytes)
        for k in keys
    )


if __name__ == "__main__":
    main()
