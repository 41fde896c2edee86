"""``launcher=local``: the world size of worker processes on this machine.

Each worker is ``python -m orchestrator.runtime.worker RUN_DIR`` with torchrun-style
variables. Its output goes to ``RUN_DIR/logs/rank_N.log``; rank 0's own log
lines (the banner, progress, warnings) also come through a console pipe to our
stdout, without DeepSpeed's and torch's messages, which stay in the rank log.
As soon as any worker fails (an exception, a watchdog timeout, or killed by a
signal) the others are stopped and we exit non-zero naming the rank and its
last error line: a dead peer never leaves the job hanging. After a stop signal
(SIGUSR1/SIGTERM, passed on to every worker) we exit ``EXIT_REQUEUE``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import torch

from orchestrator.protocol import (
    CONSOLE_FD_VAR,
    EXIT_REQUEUE,
    EXIT_SAVE_FAILED,
    STOP_SIGNALS,
    describe_laggards,
    ignore_stop_signals,
    laggards,
    torchrun_vars,
)

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_POLL_S = 0.2
_GRACE_S = 5.0


def child_env(base: Mapping[str, str], *, rank: int, world_size: int, port: int) -> dict[str, str]:
    """Environment of local worker ``rank``: ``base`` and torchrun's variables for one node."""
    local = torchrun_vars(
        rank=rank,
        world_size=world_size,
        local_rank=rank,
        local_world_size=world_size,
        node_rank=0,
        num_nodes=1,
        master_addr="127.0.0.1",
        master_port=port,
    )
    return {**base, **local}


def local_capacity(max_local_procs: int) -> tuple[int, str]:
    """How many workers this machine can start, and what limits it."""
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs on this machine"
    return max_local_procs, "cluster.max_local_procs (CPU worker processes)"


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGKILL if the launcher dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump(stream: IO[bytes], log_path: Path) -> None:
    with log_path.open("wb") as log:
        for line in iter(stream.readline, b""):
            log.write(line)
            log.flush()


def _echo(fd: int, out: IO[str]) -> None:
    with os.fdopen(fd, "rb") as stream:
        for line in iter(stream.readline, b""):
            out.write(line.decode(errors="replace"))
            out.flush()


def _last_error(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if ln]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or " ERROR " in line or "StopIn" in line:
            return line
    return lines[-1] if lines else "(empty log)"


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_local(run_dir: Path, world_size: int) -> int:
    """Start ``world_size`` workers on ``run_dir``.

    Returns 0 when all succeed, ``EXIT_REQUEUE`` when they stopped on a signal
    after checkpointing (SIGUSR1/SIGTERM sent to this process are passed on
    to every worker), else 1.
    """
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    pumps: list[threading.Thread] = []
    stopping: list[int] = []  # the stop signals passed on
    try:
        for rank in range(world_size):
            env = child_env(os.environ, rank=rank, world_size=world_size, port=port)
            # Workers import the same checkout as this process, wherever they start.
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")])
            )
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
            console: tuple[int, int] | None = os.pipe() if rank == 0 else None
            if console is not None:
                env[CONSOLE_FD_VAR] = str(console[1])
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.runtime.worker", str(run_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=() if console is None else (console[1],),
                start_new_session=True,  # its own process group: we can stop all it started
                preexec_fn=_die_with_parent,
            )
            procs.append(proc)
            assert proc.stdout is not None
            threads = [
                threading.Thread(target=_pump, args=(proc.stdout, log_dir / f"rank_{rank}.log"))
            ]
            if console is not None:
                os.close(console[1])  # the worker holds the write end
                threads.append(threading.Thread(target=_echo, args=(console[0], sys.stdout)))
            for thread in threads:
                thread.daemon = True
                thread.start()
            pumps += threads
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: _forward(procs, signum, stopping))
        try:
            return _watch(procs, pumps, log_dir, stopping)
        finally:
            ignore_stop_signals()  # the workers are gone; we exit with their code
    except BaseException:
        _stop(procs)
        raise


def _forward(procs: Sequence[subprocess.Popen[bytes]], signum: int, stopping: list[int]) -> None:
    stopping.append(signum)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signum)


def _watch(
    procs: Sequence[subprocess.Popen[bytes]],
    pumps: Sequence[threading.Thread],
    log_dir: Path,
    stopping: Sequence[int],
) -> int:
    started = time.time()
    while True:
        codes = [p.poll() for p in procs]
        failed = [
            (rank, code) for rank, code in enumerate(codes) if code not in (None, 0, EXIT_REQUEUE)
        ]
        requeue = EXIT_REQUEUE in codes
        if failed:
            _stop(procs)
            for pump in pumps:
                pump.join(timeout=2)
            rank, code = failed[0]
            log_path = log_dir / f"rank_{rank}.log"
            if stopping and requeue and code != EXIT_SAVE_FAILED:
                # A rank that stopped in start-up left its peers' collectives without it.
                print(
                    f"stopped on a signal (exit {EXIT_REQUEUE}: requeue); rank {rank} ended "
                    f"with {_describe_exit(code)} once its peers had gone -- see {log_path}"
                )
                return EXIT_REQUEUE
            print(
                f"error: rank {rank} failed ({_describe_exit(code)}): {_last_error(log_path)}"
                f" -- see {log_path}",
                file=sys.stderr,
            )
            found = laggards(
                log_dir.parent / "heartbeats", world_size=len(procs), since=started - 60
            )
            print(f"heartbeats at the end: {describe_laggards(found)}", file=sys.stderr)
            return 1
        if all(code is not None for code in codes):
            for pump in pumps:
                pump.join(timeout=2)
            if requeue:
                print(f"stopped on a signal (exit {EXIT_REQUEUE}: requeue)")
                return EXIT_REQUEUE
            return 0
        time.sleep(_POLL_S)
