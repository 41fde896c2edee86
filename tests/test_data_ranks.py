"""Which ranks touch the data in a real pipeline run: the run finds the index that
``orchestrator.data.prepare`` built, and only the first and last pipeline stages read samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO, run_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_middle_pipeline_stages_open_no_data(tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    overrides = [
        "model=tiny",
        "parallel=tp1pp2",
        "parallel.pp=4",
        "parallel.pipeline_split=[1,1,1,1]",
        "train.steps=3",
        "train.eval_interval=2",
        f"data.cache_dir={cache}",
    ]
    prepared = subprocess.run(
        [sys.executable, "-m", "orchestrator.data.prepare", *overrides],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert prepared.returncode == 0, prepared.stderr
    folder = prepared.stdout.split("data index: ")[1].split()[0]
    run_launch(*overrides, f"run.dir={run_dir}")
    logs = {r: (run_dir / "logs" / f"rank_{r}.log").read_text() for r in range(4)}
    assert f"found the data index {folder}" in logs[0]  # built ahead of time, not again
    assert "built the data index" not in logs[0]
    reads = "data: reading the train samples"
    assert reads in logs[0] and reads in logs[3]  # the first stage's inputs, the last's labels
    assert reads not in logs[1] and reads not in logs[2], logs[1][-2000:]
    assert "data: reading the valid samples" in logs[3]
    for rank in (1, 2, 3):
        assert "waiting for rank 0 to build or find the run's index" in logs[rank]
    assert [p.name for p in cache.iterdir()] == [Path(folder).name]
