"""A private SLURM cluster on this machine, for tests that submit real jobs.

``SlurmCluster`` starts ``munged``, ``slurmctld`` and one ``slurmd`` per
emulated node (``slurmd -N n1``, ``-N n2``, each on its own port, all at
127.0.0.1), with every file they write -- config, state, spool, sockets, pid
files, logs -- under one temporary directory. Stopping cancels all jobs,
terminates exactly the daemons it started (SIGTERM, then SIGKILL) and then any
process still carrying this cluster's marker in its environment (a
``slurmstepd`` or a job task left behind); it removes only its own directory.

Every client command needs ``SLURM_CONF``: pass ``cluster.env`` to
``subprocess`` or use ``cluster.run``. There is no accounting daemon, so
``sacct`` does not work; ``scontrol show job`` sees finished jobs for
``MinJobAge`` (600 s).

What this SLURM (22.05, Debian's slurm-wlm) does here:

* Cold start takes about a second. Nodes advertise more CPUs than the machine
  has (``SlurmdParameters=config_overrides``) and fake GPUs (``gres`` files
  that are symlinks to /dev/null); a job asking ``--gpus-per-node`` gets
  ``CUDA_VISIBLE_DEVICES`` set as on a real cluster.
* ``srun --mpi=pmi2`` works across the two emulated nodes; ``--mpi=pmix``
  does not.
* ``--signal=USR1@60`` reaches the job *steps*; only ``--signal=B:USR1@60``
  reaches the batch shell (bash runs its trap only after a foreground command
  such as ``sleep`` returns). Time limits and signals are checked about every
  30 s, so with ``--time=2`` the signal arrives 50-60 s into the job (59 s
  measured here).
* ``scontrol requeue`` of a running batch job kills it (COMPLETING, then
  PENDING with ``Reason=BeginTime``) and runs it again about 11 s later:
  ``cred_expire=10`` makes it eligible after 11 s instead of 121 s, and
  ``sched_interval=1`` starts it then instead of at the next 60 s pass.
  ``Restarts=`` counts the requeues; the job sees ``SLURM_RESTART_COUNT``
  (unset on the first run); its ``--output`` file starts empty again unless
  ``--open-mode=append``.
* ``ExitCode=`` in ``scontrol show job`` is ``code:signal`` of the batch
  script (``exit 3`` gives ``FAILED`` and ``3:0``); ``DerivedExitCode=`` the
  worst of its steps.
* ``Shape`` builds a second kind of cluster: a big partition of nodes that
  never run a ``slurmd`` (``State=CLOUD``), for ``sbatch --test-only`` of
  generated scripts. See ``Shape``.

The ``slurm_cluster`` fixture is session-scoped; each test module that imports
it gets its own cluster (about 0.3 s to start), stopped at the end of the
session. ``cluster.env`` carries a marker variable: a process started with it
is killed when the cluster stops.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
# `scontrol show job` states after which a job does not run again by itself.
TERMINAL_STATES = frozenset(
    [
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
    ]
)
MARKER = "SLURM_TEST_CLUSTER_DIR"  # in the environment of everything the cluster starts


@dataclass(frozen=True)
class Shape:
    """A partition of ``num_nodes`` nodes like a big GPU cluster's, for ``sbatch --test-only``.

    The nodes are ``State=CLOUD`` (powered down, never pinged, no ``slurmd``):
    ``sbatch --test-only`` answers "to start at ..." for a job that fits them
    and "Requested node configuration is not available" for one that needs
    more nodes, CPUs or GPUs than they have. Never submit real jobs to it.
    """

    num_nodes: int = 256
    cpus_per_node: int = 128
    gpus_per_node: int = 8
    memory_mb: int = 1_000_000
    partition: str = "gpu"
    prefix: str = "a"


@dataclass(frozen=True)
class JobResult:
    """A job as ``scontrol show job`` sees it once it reached a waited-for state."""

    job_id: int
    state: str
    exit_code: int  # of the batch script (``ExitCode=code:signal``)
    signal: int
    restarts: int
    info: dict[str, str] = field(repr=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binaries() -> None:
    missing = [b for b in (*DAEMONS, *CLIENTS) if shutil.which(b) is None]
    if missing:
        raise RuntimeError(
            f"SLURM binaries not found: {', '.join(missing)}. "
            "Install them with `apt-get install -y slurm-wlm munge` (.ci/run does)."
        )


def parse_record(line: str) -> dict[str, str]:
    """``scontrol show -o`` output (``Key=value`` pairs) as a dict."""
    return dict(re.findall(r"(\S+?)=(\S*)", line))


class SlurmCluster:
    """Two emulated nodes ``n1``, ``n2`` (partition ``gpu``), or a ``Shape`` with no ``slurmd``.

    ``with SlurmCluster() as cluster: cluster.submit(script)``.
    """

    def __init__(
        self,
        *,
        num_nodes: int = 2,
        cpus_per_node: int = 8,
        gpus_per_node: int = 2,
        shape: Shape | None = None,
        keep_dir: bool = False,
    ) -> None:
        require_binaries()
        self.num_nodes = 0 if shape is not None else num_nodes
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.shape = shape
        self.keep_dir = keep_dir
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.dir.chmod(0o755)  # munged's socket directory must be world-executable
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.node_names = [f"n{i + 1}" for i in range(self.num_nodes)]
        self.env: dict[str, str] = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            MARKER: str(self.dir),
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, timeout_s: float = 30.0) -> None:
        for sub in ("etc", "munge", "state", "spool", "run", "log", "dev"):
            (self.dir / sub).mkdir(mode=0o755)
        self._write_munge_key()
        self._write_config()
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.dir / 'munge' / 'munge.key'}",
                f"--pid-file={self.dir / 'run' / 'munged.pid'}",
                f"--log-file={self.dir / 'log' / 'munged.log'}",
                f"--seed-file={self.dir / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: self.munge_socket.exists(), "munged's socket", timeout_s)
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        self._wait_for(
            lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0,
            "slurmctld to answer `scontrol ping`",
            timeout_s,
        )
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, "the nodes to become idle", timeout_s)

    def stop(self) -> None:
        """Cancel every job, stop the daemons this cluster started, remove its directory."""
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self._cancel_all_jobs()
        # Reverse start order: nodes, controller, munged.
        for name in reversed(list(self._procs)):
            terminate(self._procs[name])
        self._procs.clear()
        kill_marked_processes(str(self.dir))
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients -----------------------------------------------------------

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``sbatch``, ``srun``, ...) against this cluster; text output."""
        proc = subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def submit(self, script: str | os.PathLike[str], *extra_args: str, **kw: Any) -> int:
        """``sbatch --parsable``; the job id."""
        out = self.run(["sbatch", "--parsable", *extra_args, str(script)], **kw).stdout
        return int(out.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return parse_record(out)

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def job_result(self, job_id: int) -> JobResult:
        info = self.job_info(job_id)
        code, sig = (int(x) for x in info["ExitCode"].split(":"))
        return JobResult(job_id, info["JobState"], code, sig, int(info["Restarts"]), info)

    def wait_job(
        self,
        job_id: int,
        *,
        states: frozenset[str] | set[str] = TERMINAL_STATES,
        timeout_s: float = 120,
        poll_s: float = 0.5,
    ) -> JobResult:
        """Poll ``scontrol show job`` until the job is in one of ``states`` (default: terminal).

        Raises ``TimeoutError`` after ``timeout_s``, ``RuntimeError`` if the job ends in
        another state.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.job_result(job_id)
            if result.state in states:
                return result
            if result.state in TERMINAL_STATES:
                raise RuntimeError(
                    f"job {job_id} ended {result.state} (ExitCode={result.info['ExitCode']}, "
                    f"Reason={result.info.get('Reason')}) while waiting for {sorted(states)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {result.state} after {timeout_s}s "
                    f"(waiting for {sorted(states)}; Reason={result.info.get('Reason')})"
                )
            time.sleep(poll_s)

    def node_info(self, name: str) -> dict[str, str]:
        return parse_record(self.run(["scontrol", "show", "node", "-o", name]).stdout)

    def node_addr(self, name: str) -> str:
        return self.node_info(name)["NodeAddr"]

    def log(self, name: str) -> str:
        """A daemon's log (``slurmctld``, ``slurmd.n1``, ``munged``)."""
        path = self.dir / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- internals ---------------------------------------------------------

    def _write_munge_key(self) -> None:
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def _write_config(self) -> None:
        d = self.dir
        self.conf.write_text(slurm_conf(self, ctld_port=free_port()))
        (d / "etc" / "gres.conf").write_text(gres_conf(self))
        (d / "etc" / "plugstack.conf").write_text("")
        for name in self.node_names:
            (d / "spool" / name).mkdir()
        for i in range(self.gpus_per_node):
            (d / "dev" / f"nvidia{i}").symlink_to(os.devnull)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "wb")  # noqa: SIM115 (the child owns it)
        with out:
            self._procs[name] = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_for(self, ready: Any, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"SLURM test cluster: timed out waiting for {what}; exited daemons: {dead}\n"
                    + self._log_tails()
                )
            time.sleep(0.1)

    def _log_tails(self) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*")):
            tail = path.read_text(errors="replace")[-2000:]
            parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    def _nodes_idle(self) -> bool:
        if not self.node_names:
            return True
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n) == "idle" for n in self.node_names)

    def _cancel_all_jobs(self, timeout_s: float = 20) -> None:
        """``scancel`` every job, then wait until none is left running."""
        squeue = ["squeue", "-h", "-o", "%i", "-t", "PD,R,CG,CF,RS,RQ,S,ST,SO"]
        jobs = self.run(squeue, check=False).stdout.split()
        if not jobs:
            return
        self.run(["scancel", "--full", *jobs], check=False)
        deadline = time.monotonic() + timeout_s
        while self.run(squeue, check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.2)


def slurm_conf(cluster: SlurmCluster, *, ctld_port: int) -> str:
    d = cluster.dir
    lines = [
        f"ClusterName=test{ctld_port}",
        f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire=10: a requeued job may start again after 10 s, not 120 s.
        f"AuthInfo=socket={cluster.munge_socket},cred_expire=10",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={d / 'state'}",
        f"SlurmdSpoolDir={d / 'spool' / '%n'}",
        f"SlurmctldPidFile={d / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={d / 'run' / 'slurmd.%n.pid'}",
        f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={d / 'log' / 'slurmd.%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1,sched_interval=1",  # a requeued job starts once eligible
        "SlurmdParameters=config_overrides",  # nodes may claim more CPUs than the machine has
        "DependencyParameters=kill_invalid_depend",
        "GresTypes=gpu",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "MinJobAge=600",  # `scontrol show job` still sees finished jobs (no sacct here)
        "ReturnToService=2",
        "KillWait=5",
        "JobRequeue=1",
        "InactiveLimit=0",
        "SlurmdTimeout=300",
        f"PlugStackConfig={d / 'etc' / 'plugstack.conf'}",
    ]
    if cluster.node_names:
        gres = f" Gres=gpu:{cluster.gpus_per_node}" if cluster.gpus_per_node else ""
        for name in cluster.node_names:
            lines.append(
                f"NodeName={name} NodeAddr=127.0.0.1 Port={free_port()} "
                f"CPUs={cluster.cpus_per_node} RealMemory=16000{gres} State=UNKNOWN"
            )
        nodes = ",".join(cluster.node_names)
        lines.append(f"PartitionName=gpu Nodes={nodes} Default=YES MaxTime=INFINITE State=UP")
    if cluster.shape is not None:
        s = cluster.shape
        width = max(3, len(str(s.num_nodes)))
        names = f"{s.prefix}[{1:0{width}d}-{s.num_nodes:0{width}d}]"
        lines += [
            # CLOUD nodes are powered down and never pinged; they need a resume program.
            "ResumeProgram=/bin/true",
            "SuspendProgram=/bin/true",
            "SuspendTime=INFINITE",
            "PrivateData=cloud",  # show the powered-down CLOUD nodes in sinfo and scontrol
            f"NodeName={names} NodeAddr=127.0.0.1 CPUs={s.cpus_per_node} "
            f"RealMemory={s.memory_mb} Gres=gpu:{s.gpus_per_node} State=CLOUD",
            f"PartitionName={s.partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP",
        ]
    return "\n".join(lines) + "\n"


def gres_conf(cluster: SlurmCluster) -> str:
    if not cluster.node_names or not cluster.gpus_per_node:
        return ""
    dev = cluster.dir / "dev"
    files = f"{dev}/nvidia[0-{cluster.gpus_per_node - 1}]"
    return "\n".join(f"NodeName={n} Name=gpu File={files}" for n in cluster.node_names) + "\n"


def terminate(proc: subprocess.Popen[bytes], *, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; only this process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def marked_pids(marker_value: str) -> list[int]:
    """Processes whose environment has ``MARKER=marker_value`` (this cluster's leftovers)."""
    needle = f"{MARKER}={marker_value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def kill_marked_processes(marker_value: str, *, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process left behind by the cluster with this marker."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(marker_value)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)]
            time.sleep(0.1)
        if not pids:
            return


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Two emulated nodes ``n1``, ``n2`` (8 CPUs, 2 fake GPUs each), partition ``gpu``."""
    with SlurmCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_a100_cluster() -> Iterator[SlurmCluster]:
    """256 nodes x 8 GPUs x 128 CPUs in partition ``gpu``, for ``sbatch --test-only`` only."""
    with SlurmCluster(shape=Shape()) as cluster:
        yield cluster
