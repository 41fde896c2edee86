"""``cluster.cpu_allocator``: CPU workers re-executed with tcmalloc preloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.config.schema import ClusterConfig
from orchestrator.planning import cpu_allocator
from tests.launch import run_launch
from tests.test_cli import _assert_one_line_error, run

LIB = "libtcmalloc_minimal.so.4"


def _cluster(allocator: str = "auto", gpus: int = 0) -> ClusterConfig:
    return ClusterConfig(
        name="t",
        gpus_per_node=gpus,
        device="cpu",
        device_memory_gb=1.0,
        peak_tflops=1.0,
        cpu_allocator=allocator,
    )


@pytest.fixture
def found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_allocator, "find_tcmalloc", lambda: LIB)


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_allocator, "find_tcmalloc", lambda: None)


@pytest.mark.usefixtures("found")
def test_auto_and_tcmalloc_preload_it_once() -> None:
    for allocator in ("auto", "tcmalloc"):
        env = cpu_allocator.worker_env(_cluster(allocator), {"PATH": "/bin", "LD_PRELOAD": "x.so"})
        assert env is not None
        assert env["LD_PRELOAD"] == f"{LIB} x.so"
        assert env[cpu_allocator.MARK] == LIB
        assert env["PATH"] == "/bin"
        assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40
        # The re-executed worker (and what it starts) does not decide again.
        assert cpu_allocator.worker_env(_cluster(allocator), env) is None
    # Already preloaded by the user: left as it is.
    assert cpu_allocator.worker_env(_cluster(), {"LD_PRELOAD": f"/opt/{LIB}"}) is None


@pytest.mark.usefixtures("found")
def test_system_and_gpu_ranks_are_left_alone() -> None:
    assert cpu_allocator.worker_env(_cluster("system"), {}) is None
    assert cpu_allocator.worker_env(_cluster("tcmalloc", gpus=8), {}) is None


@pytest.mark.usefixtures("missing")
def test_missing_library_auto_runs_as_is_tcmalloc_refuses() -> None:
    assert cpu_allocator.worker_env(_cluster("auto"), {}) is None
    cpu_allocator.check(_cluster("auto"))
    cpu_allocator.check(_cluster("tcmalloc", gpus=8))
    with pytest.raises(ValueError, match=r"^cluster.cpu_allocator=tcmalloc: no libtcmalloc"):
        cpu_allocator.worker_env(_cluster("tcmalloc"), {})


def test_bad_value_is_one_line_and_exit_2() -> None:
    result = run("cluster.cpu_allocator=jemalloc", "dry_run=true")
    _assert_one_line_error(
        result,
        "error: cluster.cpu_allocator=jemalloc: must be one of auto, tcmalloc, system",
    )


def test_this_process_runs_on_system_malloc() -> None:
    # pytest is not preloaded (CI and this machine): what the banner reports for it.
    if "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        assert cpu_allocator.loaded() == "system malloc"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_workers_run_on_the_chosen_allocator(tmp_path: Path) -> None:
    """Real local runs: rank 0 reports what its /proc/self/maps shows it runs
    on, and the loss does not depend on the allocator."""
    if cpu_allocator.find_tcmalloc() is None:
        pytest.fail("no libtcmalloc here: apt install libtcmalloc-minimal4 (.ci/run does)")
    losses = {}
    for allocator in ("tcmalloc", "system"):
        run_dir = tmp_path / allocator
        proc = run_launch(
            "model=tiny",
            "parallel=tp1pp1",
            "parallel.dp=2",
            "data=synthetic",
            "train.steps=2",
            "train.log_interval=1",
            "train.eval_interval=0",
            "monitor.tensorboard=false",
            f"cluster.cpu_allocator={allocator}",
            f"run.dir={run_dir}",
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith("cpu allocator:"))
        if allocator == "tcmalloc":
            assert line.startswith("cpu allocator: tcmalloc (") and "libtcmalloc" in line, line
        else:
            assert line == "cpu allocator: system malloc (cluster.cpu_allocator=system)", line
        metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
        losses[allocator] = [json.loads(x)["loss"] for x in metrics]
    assert len(losses["tcmalloc"]) == 2
    assert losses["tcmalloc"] == losses["system"]
