"""Which ranks touch the data in a real pipeline run: rank 0 builds the whole-run index,
the others wait for it, and only the first and last pipeline stages read samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch import run_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_middle_pipeline_stages_open_no_data(tmp_path: Path) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    run_launch(
        "model=tiny",
        "parallel=tp1pp2",
        "parallel.pp=4",
        "parallel.pipeline_split=[1,1,1,1]",
        "train.steps=3",
        "train.eval_interval=2",
        f"data.cache_dir={cache}",
        f"run.dir={run_dir}",
    )
    logs = {r: (run_dir / "logs" / f"rank_{r}.log").read_text() for r in range(4)}
    reads = "data: reading the train samples"
    assert reads in logs[0] and reads in logs[3]  # the first stage's inputs, the last's labels
    assert reads not in logs[1] and reads not in logs[2], logs[1][-2000:]
    assert "data: reading the valid samples" in logs[3]
    for rank in (1, 2, 3):
        assert "waiting for rank 0 to build or find the run's index" in logs[rank]
    assert "built the data index" in logs[0]
    assert len(list(cache.iterdir())) == 1  # one index, built once
