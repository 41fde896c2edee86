"""The private SLURM cluster of ``tests/slurm_cluster.py`` behaves like a real one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    SlurmCluster,
    is_zombie,
    marked_pids,
    slurm_a100_cluster,  # noqa: F401 (fixture)
    slurm_cluster,  # noqa: F401 (fixture)
)


def write_script(path: Path, body: str, *sbatch: str) -> Path:
    lines = ["#!/bin/bash", *(f"#SBATCH {opt}" for opt in sbatch), body]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_file(path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.2)
    return path.read_text()


@pytest.mark.timeout(60)
def test_srun_places_tasks_on_both_nodes(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    out = slurm_cluster.run(
        ["srun", "-N2", "-n4", "--ntasks-per-node=2", "-c2", "bash", "-c",
         "echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS"]
    ).stdout  # fmt: skip
    tasks = sorted(tuple(line.split()) for line in out.splitlines())
    assert {t[0] for t in tasks} == {"n1", "n2"}, out
    assert sorted(int(t[1]) for t in tasks) == [0, 1, 2, 3], out
    for node in ("n1", "n2"):
        assert sorted(int(t[2]) for t in tasks if t[0] == node) == [0, 1], out
    assert {t[3] for t in tasks} == {"4"}, out


@pytest.mark.timeout(60)
def test_srun_pmi2_across_nodes(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    slurm_cluster.run(["srun", "--mpi=pmi2", "-N2", "-n2", "true"])
    out = slurm_cluster.run(
        ["srun", "--mpi=pmi2", "-N2", "-n2", "bash", "-c", "echo $PMI_RANK $PMI_SIZE"]
    ).stdout
    assert sorted(out.splitlines()) == ["0 2", "1 2"]


@pytest.mark.timeout(60)
def test_fake_gpus_are_allocated(slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    out = slurm_cluster.run(
        ["srun", "-N2", "--ntasks-per-node=1", "--gpus-per-node=2", "bash", "-c",
         "echo $SLURMD_NODENAME $CUDA_VISIBLE_DEVICES"]
    ).stdout  # fmt: skip
    assert sorted(out.splitlines()) == ["n1 0,1", "n2 0,1"]
    assert slurm_cluster.node_addr("n1") == "127.0.0.1"


@pytest.mark.timeout(90)
def test_sbatch_exit_codes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    ok = write_script(
        tmp_path / "ok.sh",
        f"srun -N2 -n2 hostname > {tmp_path / 'hosts'}",
        "--nodes=2",
        f"--output={tmp_path / 'ok.out'}",
    )
    bad = write_script(tmp_path / "bad.sh", "exit 3", f"--output={tmp_path / 'bad.out'}")
    ok_id, bad_id = slurm_cluster.submit(ok), slurm_cluster.submit(bad)

    done = slurm_cluster.wait_job(ok_id, timeout_s=60)
    assert (done.state, done.exit_code, done.signal, done.restarts) == ("COMPLETED", 0, 0, 0)
    assert len((tmp_path / "hosts").read_text().splitlines()) == 2
    failed = slurm_cluster.wait_job(bad_id, timeout_s=60)
    assert (failed.state, failed.exit_code) == ("FAILED", 3)


@pytest.mark.timeout(120)
def test_requeue_runs_the_job_again(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:  # noqa: F811
    runs = tmp_path / "runs"
    body = (
        f"echo ${{SLURM_RESTART_COUNT:-0}} >> {runs}\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then sleep 300; fi'
    )
    script = write_script(tmp_path / "requeue.sh", body, f"--output={tmp_path / 'out'}")
    job_id = slurm_cluster.submit(script)
    wait_for_file(runs, timeout_s=30)
    slurm_cluster.run(["scontrol", "requeue", str(job_id)])
    start = time.monotonic()
    result = slurm_cluster.wait_job(job_id, timeout_s=90)
    assert (result.state, result.exit_code, result.restarts) == ("COMPLETED", 0, 1)
    assert runs.read_text().split() == ["0", "1"]  # SLURM_RESTART_COUNT is unset on the first run
    # Eligible again cred_expire (10 s) + 1 s after the requeue; sched_interval=1.
    assert time.monotonic() - start < 30


@pytest.mark.timeout(60)
def test_sbatch_test_only_on_a_big_gpu_cluster(
    slurm_a100_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    script = write_script(
        tmp_path / "train.sh",
        "srun true",
        "--nodes=256",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=10",
        "--exclusive",
        "--partition=gpu",
        "--time=2-00:00:00",
    )
    assert slurm_a100_cluster.node_info("a256")["Gres"] == "gpu:8"
    fits = slurm_a100_cluster.run(["sbatch", "--test-only", str(script)])
    assert "to start at" in fits.stderr and "a[001-256]" in fits.stderr, fits.stderr
    for too_big in ("--nodes=257", "--gpus-per-node=9", "--cpus-per-task=17"):
        proc = slurm_a100_cluster.run(["sbatch", "--test-only", too_big, str(script)], check=False)
        assert proc.returncode != 0, (too_big, proc.stderr)
        assert "Requested node configuration is not available" in proc.stderr


@pytest.mark.timeout(60)
def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    with SlurmCluster() as cluster:
        script = write_script(tmp_path / "sleep.sh", "srun -N2 -n2 sleep 300", "--nodes=2")
        job_id = cluster.submit(script)
        cluster.wait_job(job_id, states={"RUNNING"}, timeout_s=30)
        daemons = [int(p.read_text()) for p in (cluster.dir / "run").glob("*.pid")]
        assert len(daemons) == 4, daemons  # munged, slurmctld, two slurmd
        marker = str(cluster.dir)
        assert len(marked_pids(marker)) > len(daemons)  # and steps and tasks
    assert marked_pids(marker) == []
    for pid in daemons:
        assert is_zombie(pid), f"daemon {pid} still running"
    assert not cluster.dir.exists()
