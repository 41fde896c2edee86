"""Run a function on N CPU processes joined by a gloo process group.

Each rank's return value comes back in rank order; an exception on any rank
fails the caller with that rank's traceback, and a rank that does not finish
within ``timeout`` seconds fails it too. Every process is reaped before this
returns, and rendezvous goes through a file, so nothing is left behind.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # report every failure, including assertion errors
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, init_file, args, results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, Any] = {}
        errors: list[str] = []
        try:
            while len(outputs) + len(errors) < world_size:
                try:
                    rank, ok, value = results.get(timeout=timeout)
                except queue.Empty:
                    errors.append(f"timed out after {timeout}s waiting for a rank")
                    break
                if ok:
                    outputs[rank] = value
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break  # peers may now block in a collective: stop them below
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [outputs[r] for r in range(world_size)]
