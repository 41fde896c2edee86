"""The CPU probe: cached peaks per host and thread count, config overrides, the bf16 warning,
and the plan's CPU step time against a short real run."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.schema import Config
from orchestrator.planning import cpu_probe, host_cache, perf
from orchestrator.planning.plan import format_plan, resolve_plan
from orchestrator.runtime.monitor import banner
from tests.launch import run_launch
from tests.test_config import load

FAKE_RATES = {"fp32": 0.14, "bf16": 0.0012, "adamw_s_per_param": 2e-9}
FAKE_COMM = {"allreduce_s": 0.002, "p2p_s": 0.003, "bandwidth_gbs": 1.0}
NO_BF16_CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"
AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty probe cache, and a probe that must not run unless a test allows it."""
    monkeypatch.setenv(host_cache.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def refuse(*args: Any) -> dict[str, Any]:
        raise AssertionError("measured although the cache or the config answers")

    monkeypatch.setattr(cpu_probe, "_measure_peaks", refuse)
    monkeypatch.setattr(cpu_probe, "_measure_comm", refuse)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle host
    yield tmp_path


def seed_cache(
    *, threads: int, procs: int | None = None, rates: dict[str, float] = FAKE_RATES
) -> None:
    """This host's cache file with ``rates`` at ``threads`` (and gloo costs for ``procs``)."""
    entries = {cpu_probe.peaks_key(threads): rates}
    if procs is not None:
        entries[cpu_probe.comm_key(procs, threads)] = FAKE_COMM
    path = host_cache.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))


def counting_probe(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def measure(threads: int) -> dict[str, Any]:
        calls.append(threads)
        return dict(FAKE_RATES, fp32=0.1 * threads)

    monkeypatch.setattr(cpu_probe, "_measure_peaks", measure)
    return calls


def test_a_cache_hit_does_not_measure_again(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_probe(monkeypatch)
    first, path = cpu_probe.measured_peaks(1)
    again, same = cpu_probe.measured_peaks(1)
    assert calls == [1] and first == again and path == same
    assert path == cache_dir / f"cpu_peaks_{socket.gethostname()}.json"
    assert json.loads(path.read_text())[cpu_probe.peaks_key(1)]["fp32"] == pytest.approx(0.1)


def test_another_thread_count_host_or_cpu_measures_again(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_probe(monkeypatch)
    cpu_probe.measured_peaks(1)
    assert cpu_probe.measured_peaks(2)[0]["fp32"] == pytest.approx(0.2)
    assert calls == [1, 2]
    other_host = host_cache.cache_path(host="other-node")
    cpu_probe.measured_peaks(1, path=other_host)
    assert calls == [1, 2, 1] and other_host.exists()
    monkeypatch.setattr(cpu_probe, "cpu_model", lambda: "Intel Xeon Platinum 8488C")
    cpu_probe.measured_peaks(1)
    assert calls == [1, 2, 1, 1]
    assert len(json.loads(host_cache.cache_path().read_text())) == 3


def test_a_configured_peak_wins(cache_dir: Path) -> None:
    cluster = load("cluster.peak_tflops=0.5").cluster  # the probe would raise (fixture)
    assert cluster.peak_source("bf16", ranks_per_node=4) == (0.5, "from cluster.peak_tflops")
    assert cluster.peak_for("fp32", ranks_per_node=4) == 0.5  # fp32 falls back to peak_tflops
    seed_cache(threads=1)
    mixed = load("cluster.peak_tflops_fp32=0.3").cluster
    assert mixed.peak_source("fp32", ranks_per_node=2) == (0.3, "from cluster.peak_tflops_fp32")
    bf16, source = mixed.peak_source("bf16", ranks_per_node=2)
    assert bf16 == pytest.approx(FAKE_RATES["bf16"]) and source.startswith("measured on this host")


def test_ranks_share_the_cores(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 ranks on 2 cores: 1 thread each (the launcher's rule), each half the time."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cpus = cpu_probe.rank_cpus(ranks_per_node=4, environ={})
    assert (cpus.threads, cpus.share) == (1, 0.5)
    assert cpu_probe.rank_cpus(ranks_per_node=1, environ={}).threads == 2
    assert cpu_probe.rank_cpus(ranks_per_node=1, environ={"OMP_NUM_THREADS": "1"}).share == 1
    assert cpu_probe.rank_cpus(ranks_per_node=2, cpus_per_task=3).threads == 3  # SLURM
    seed_cache(threads=1)
    cluster = load().cluster
    assert cluster.peak_for("fp32", ranks_per_node=4) == pytest.approx(0.14 * 0.5)
    source = cluster.peak_source("fp32", ranks_per_node=4)[1]
    assert "4 ranks x 1 thread on 2 cores, each 0.5 of its threads' time" in source
    assert str(host_cache.cache_path()) in source


def test_a_gpu_cluster_states_its_peak() -> None:
    cfg = load("cluster=a100_80g", "cluster.peak_tflops=null")
    with pytest.raises(ValueError, match=r"^cluster.peak_tflops=None: a GPU cluster states"):
        cfg.cluster.validate()
    assert load("cluster=h100_80g").cluster.peak_source("fp32") == (
        67,
        "from cluster.peak_tflops_fp32",
    )


def test_bf16_warning_names_the_measured_ratio() -> None:
    line = cpu_probe.bf16_warning(FAKE_RATES, cpuinfo=NO_BF16_CPUINFO)
    assert line == (
        "warning: bf16 on this CPU is emulated: bf16 matmuls measured 0.0012 TFLOP/s, "
        "117x slower than fp32 (0.14); use train.precision=fp32"
    )
    # flags present, kernels held back (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)
    held_back = cpu_probe.bf16_warning(FAKE_RATES, cpuinfo=AMX_CPUINFO)
    assert held_back is not None
    assert held_back.startswith("warning: bf16 on this CPU is slow though the CPU reports amx_bf16")
    fast = {"fp32": 0.35, "bf16": 2.0}
    assert cpu_probe.bf16_warning(fast, cpuinfo=AMX_CPUINFO) is None
    assert cpu_probe.bf16_warning(fast, cpuinfo=NO_BF16_CPUINFO) is None  # measured: not slow
    assert cpu_probe.native_bf16(AMX_CPUINFO) is True
    assert cpu_probe.native_bf16(NO_BF16_CPUINFO) is False
    assert cpu_probe.native_bf16("") is None


def _bf16_tiny(*extra: str) -> Config:
    return load("parallel=tp1pp1", "train.precision=bf16", *extra)


def test_banner_warns_when_bf16_is_emulated(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu_probe, "_cpuinfo", lambda: NO_BF16_CPUINFO)
    seed_cache(threads=2)
    cfg = _bf16_tiny()
    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.monitor"):
        text = banner(cfg, resolve_plan(cfg), cache_dir / "run", resume="fresh start")
    warning = "warning: bf16 on this CPU is emulated: bf16 matmuls measured 0.0012 TFLOP/s"
    assert warning in text
    assert "device peak 0.0012 TFLOP/s (bf16), measured on this host" in text
    assert (
        "peak: 0.0012 TFLOP/s per device, measured on this host (1 rank x 2 threads on 2 cores)"
        in text
    )
    assert any("bf16 on this CPU is emulated" in r.getMessage() for r in caplog.records)
    assert "collective latencies: none (one rank)" in text
    fp32 = load("parallel=tp1pp1")
    assert "warning" not in format_plan(resolve_plan(fp32), fp32)
    configured = _bf16_tiny("cluster.peak_tflops=2.0", "cluster.peak_tflops_fp32=0.35")
    text = banner(configured, resolve_plan(configured), cache_dir / "run", resume="fresh start")
    assert "device peak 2 TFLOP/s (bf16), from cluster.peak_tflops" in text


def test_a_loaded_host_is_named(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.0))
    seed_cache(threads=2)
    cfg = load("parallel=tp1pp1")
    text = format_plan(resolve_plan(cfg), cfg)
    assert "warning: this host's load average is 3.5 on 2 cores before the run starts" in text


def test_cpu_step_time_counts_every_latency(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiny tp2pp2 (4 ranks on 2 cores), 8 micro-batches, by hand."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    seed_cache(threads=1, procs=4)
    cfg = load()
    plan = resolve_plan(cfg)
    t = perf.estimate(plan, cfg.model, cfg.cluster).time
    m, layers, e = 8, 2, 4  # micro-batches, layers per stage, fp32
    micro_bytes = 1 * 128 * 128 * e
    all_reduces = 4 * layers * m
    bandwidth = FAKE_COMM["bandwidth_gbs"] * 1e9
    tp = all_reduces * micro_bytes / bandwidth + (all_reduces + 4 * m) * FAKE_COMM["allreduce_s"]
    assert t.tp_comm == pytest.approx(tp)
    transfers = 2 * (m + 1)
    send = micro_bytes / 2 / bandwidth + FAKE_COMM["p2p_s"]
    gather = micro_bytes / 2 / bandwidth + FAKE_COMM["allreduce_s"]  # pipe_partitioned
    assert t.pp_comm == pytest.approx(transfers * (send + gather))
    assert t.dp_comm == 0
    stage_params = max(plan.stage_params_per_rank)
    assert t.framework == pytest.approx(FAKE_RATES["adamw_s_per_param"] * stage_params / 0.5)
    text = format_plan(plan, cfg)
    assert "all-reduce 2.00 ms, send/recv 3.00 ms, 1 GB/s" in text
    assert "+ framework 0.001 " in text


def test_gpu_plans_say_what_is_not_modelled() -> None:
    cfg = load("model=7b", "parallel=tp8pp1", "cluster=a100_80g")
    est = perf.estimate(resolve_plan(cfg), cfg.model, cfg.cluster)
    assert est.time.framework is None and est.host is None
    text = "\n".join(perf.format_estimate(est, cfg.cluster))
    assert "+ framework not modelled" in text
    assert (
        "collective latencies: not modelled (bandwidth only); framework time: not modelled" in text
    )
    assert "peak: 312 TFLOP/s per device, from cluster.peak_tflops" in text


PLAN_FACTOR = 2.0  # the plan's stated accuracy on CPU (bench/plan_accuracy.py)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_plan_within_factor_of_a_short_default_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's default run (tiny, tp2pp2, 4 ranks), 12 steps; the probe measures afresh."""
    monkeypatch.setenv(host_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    overrides = ("train.steps=12", "train.log_interval=4", "train.eval_interval=0")
    run_launch(*overrides, f"run.dir={run_dir}", timeout=200)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = sorted(r["step_time_s"] for r in records if r.get("step", 0) > 4 and "loss" in r)
    cfg = load(*overrides)
    planned = perf.estimate(
        resolve_plan(cfg), cfg.model, cfg.cluster
    ).time.total  # the run's cache: no new probe
    median = measured[len(measured) // 2]
    assert 1 / PLAN_FACTOR < planned / median < PLAN_FACTOR, (planned, measured, os.getloadavg())


def test_a_loaded_multi_thread_probe_measures_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """2 threads first at a loaded moment (below one thread's rate), then at a quiet one."""
    answers = {1: [0.09], 2: [0.05, 0.06, 0.18]}
    calls: list[int] = []

    def fake(precision: str, *, threads: int, seconds: float = 1.0) -> float:
        calls.append(threads)
        return answers[threads].pop(0)

    monkeypatch.setattr(cpu_probe, "matmul_tflops", fake)
    assert cpu_probe.steady_tflops("fp32", threads=2) == 0.18
    assert calls == [2, 1, 2, 2]
    answers = {1: [0.09], 2: [0.05, 0.05, 0.05, 0.05]}
    assert cpu_probe.steady_tflops("fp32", threads=2) == 0.09  # never below one thread's


def test_the_probe_leaves_the_global_random_state_alone() -> None:
    """A worker probes after seeding: its RNG state is checkpointed and must match a resume's."""
    import torch

    from orchestrator.planning.cpu_probe import adamw_seconds, matmul_tflops

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    matmul_tflops("fp32", threads=1, seconds=0.01)
    adamw_seconds(threads=1, params=1024)
    assert torch.equal(torch.get_rng_state(), before)
