"""CPU workers' memory allocator: tcmalloc, preloaded (``cluster.cpu_allocator``).

glibc's malloc returns every block over its mmap threshold (32 MiB at most)
to the kernel when it is freed, so a CPU training step that allocates the same
large activations and gradients each step page-faults them in afresh each
time. tcmalloc keeps them. On this project's 2-core CPU machine it made the
60M bf16 trainer 21% faster (``bench/RESULTS.md``), and the loss curve is
unchanged. ``torch.backends.xeon.run_cpu`` preloads it for the same reason.

A worker that should run under tcmalloc and does not yet re-executes itself
with ``LD_PRELOAD`` set (``orchestrator.runtime.worker``). Its pid, its signal mask
and its parent-death signal survive ``execve``, so the launchers see the same
process. The library is looked up on the node that runs the worker (ldconfig's
cache, then the Python prefix's ``lib``), by its soname where possible. GPU
ranks are left alone: their large buffers live on the device.
"""

from __future__ import annotations

import ctypes.util
import sys
from collections.abc import Mapping
from pathlib import Path

from orchestrator.config.schema import ClusterConfig

_NAMES = ("tcmalloc_minimal", "tcmalloc")
# Set (to the library) in the environment of a worker re-executed with tcmalloc,
# so that it, and any process it starts, does not decide again.
MARK = "ORCHESTRATOR_CPU_ALLOCATOR"
# tcmalloc reports each allocation over 1 GiB on stderr by default.
_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc() -> str | None:
    """tcmalloc's library on this machine (a soname ``LD_PRELOAD`` accepts), or None."""
    for name in _NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    for name in _NAMES:  # a conda or venv prefix, which ldconfig does not index
        hits = sorted(Path(sys.prefix, "lib").glob(f"lib{name}.so*"))
        if hits:
            return str(hits[0])
    return None


def check(cluster: ClusterConfig) -> None:
    """``cluster.cpu_allocator=tcmalloc`` on CPU ranks needs the library here: else ValueError."""
    if cluster.gpus_per_node == 0 and cluster.cpu_allocator == "tcmalloc":
        _required(cluster, find_tcmalloc())


def _required(cluster: ClusterConfig, library: str | None) -> None:
    if library is None and cluster.cpu_allocator == "tcmalloc":
        raise ValueError(
            "cluster.cpu_allocator=tcmalloc: no libtcmalloc on this machine; install it "
            "(Debian/Ubuntu: apt install libtcmalloc-minimal4) or use cluster.cpu_allocator=auto"
        )


def worker_env(cluster: ClusterConfig, env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment a worker should re-execute itself with, or None to run as it is.

    None for GPU ranks, for ``system``, when a worker already decided (``MARK``)
    and when tcmalloc is already preloaded. ``auto`` without the library also
    runs as it is; ``tcmalloc`` without it raises ValueError (``check``).
    """
    if cluster.gpus_per_node > 0 or env.get(MARK) or cluster.cpu_allocator == "system":
        return None
    library = find_tcmalloc()
    _required(cluster, library)
    if library is None or "tcmalloc" in env.get("LD_PRELOAD", ""):
        return None
    preload = " ".join(filter(None, [library, env.get("LD_PRELOAD")]))
    return {**_QUIET, **env, MARK: library, "LD_PRELOAD": preload}


def loaded() -> str:
    """What this process runs on: 'tcmalloc (PATH)' if the library is mapped, else 'system malloc'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown (no /proc/self/maps)"
    for line in maps.splitlines():
        fields = line.split()  # address perms offset dev inode [path]
        if len(fields) >= 6 and Path(fields[5]).name.startswith("libtcmalloc"):
            return f"tcmalloc ({fields[5]})"
    return "system malloc"
