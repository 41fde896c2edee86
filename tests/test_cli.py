"""launch/run.py end to end: dry runs, --cfg job, and one clear line per bad setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.launch import cli
from tests.test_config import CONF_DIR, load

RUN = CONF_DIR.parent / "launch" / "run.py"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        capture_output=True,
        text=True,
        cwd=cwd or CONF_DIR.parent,
        timeout=120,
    )


def test_dry_run_13b_tp8pp4(tmp_path: Path) -> None:
    # From another directory, which must stay empty: nothing is written.
    result = run("model=13b", "parallel=tp8pp4", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "world size: 32 = tp(8) * pp(4) * dp(1)" in result.stdout
    for stage, layers in enumerate(("0-9", "10-19", "20-29", "30-39")):
        assert f"stage {stage}: layers {layers} (10)" in result.stdout
    assert "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_dry_run_65b_tp8pp8_on_a100() -> None:
    result = run("model=65b", "parallel=tp8pp8", "cluster=a100_80g", "dry_run=true")
    assert result.returncode == 0, result.stderr
    assert "world size: 64 = tp(8) * pp(8) * dp(1)" in result.stdout
    assert "8 nodes x 8 GPUs (a100-80gb)" in result.stdout
    assert "stage 7: layers 70-79 (10)" in result.stdout
    assert "total params: 65,285,660,672" in result.stdout


def test_cfg_job_prints_the_composed_config() -> None:
    result = run("model=13b", "parallel=tp8pp4", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.model.dim == 5120 and printed.parallel.tp == 8 and printed.parallel.pp == 4


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("model=13c",),
            "error: model=13c: no config 'model/13c'; available: 13b, 1b, 33b, 65b, 7b",
        ),
        (("parallel.tpp=2",), "error: parallel.tpp=2: Key 'tpp' not in 'ParallelConfig'"),
        (("+parallel.foo=1",), "error: parallel.foo: unknown key"),
        (("parallel.tp=abc",), "error: parallel.tp=abc: Value 'abc'"),
        (
            ("model=7b", "parallel.tp=3"),
            "error: parallel.tp=3: model.n_heads(32) must be divisible by tp",
        ),
        (
            ("model=7b", "parallel=tp2pp2", "parallel.dp=3", "cluster=a100_80g", "cluster.nodes=2"),
            "error: parallel: tp(2) * pp(2) * dp(3) = 12 != world_size(16)",
        ),
    ],
)
def test_bad_setting_is_one_line_and_exit_2(args: tuple[str, ...], expected: str) -> None:
    result = run(*args)
    _assert_one_line_error(result, expected)


def _assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""


# The rest in-process: describe_error on the exceptions Hydra really raises.
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model=13c"],
            "model=13c: no config 'model/13c'; available: 13b, 1b, 33b, 65b, 7b, llama2_13b, "
            "llama2_70b, llama2_7b, llama3_405b, llama3_70b, llama3_8b, pretrained, tiny",
        ),
        (["cluster=nope"], "cluster=nope: no config 'cluster/nope'; available: a100_40g"),
        (["parallel.tpp=2"], "parallel.tpp=2: Key 'tpp' not in 'ParallelConfig'"),
        (["foo=1"], "foo=1: Key 'foo' not in 'Config'"),
        (["parallel.tp=abc"], "parallel.tp=abc: Value 'abc' of type 'str' could not be converted"),
        (["model.dim=null"], "model.dim=null: field 'model.dim' is not Optional"),
        (["parallel.pipeline_split=[a]"], "parallel.pipeline_split=[a]: Value 'a'"),
        (["model=[1"], "no viable alternative at input '[1'"),
        (["+parallel.tp=2"], "Could not append to config. An item is already at 'parallel.tp'."),
    ],
)
def test_describe_composition_errors(overrides: list[str], expected: str) -> None:
    with pytest.raises(HydraException) as info:
        load(*overrides)
    line = compose.describe_error(info.value, conf_dir=CONF_DIR)
    assert line.startswith(expected), line
    assert "\n" not in line


def test_main_prints_plan_or_one_error(capsys: pytest.CaptureFixture[str]) -> None:
    good = OmegaConf.structured(load("parallel=tp1pp1", "dry_run=true"))
    assert cli.main(good) == 0
    out, err = capsys.readouterr()
    assert "world size: 1" in out and err == ""

    bad = OmegaConf.structured(load("parallel.tp=3"))
    assert cli.main(bad) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: parallel.tp=3: model.n_heads(8) must be divisible by tp\n"

    # A required value left unset (???) is a bad setting too, not a traceback.
    missing = OmegaConf.structured(load())
    missing.model.dim = "???"
    assert cli.main(missing) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("model=13b", "parallel=tp8pp4", "launcher=local"),
            "error: launcher=local: the layout needs 32 processes (tp(8) * pp(4) * dp(1))",
        ),
        (
            ("model=13b", "parallel=tp8pp4"),
            "error: launcher=auto: the layout needs 32 processes (tp(8) * pp(4) * dp(1)) but "
            "cluster.max_local_procs (CPU worker processes) allow 8; cluster=local is this machine",
        ),
        (
            ("parallel=tp1pp2", "train.global_batch_size=1"),
            "error: train.global_batch_size=1: gives 1 micro-batches",
        ),
        (("train.precision=fp16",), "error: train.precision=fp16: needs GPUs"),
        (
            ("model.vocab_size=3000",),
            "error: model.vocab_size=3000: the tokenizer tokenizer.model has 2000 tokens",
        ),
        (("data.root=/nonexistent",), "error: data.sources[0].prefix=code: no shard at"),
        (
            ("+deepspeed.extra.gradient_clipping=0.5",),
            "error: deepspeed.extra.gradient_clipping=0.5: conflicts with 1.0",
        ),
    ],
)
def test_bad_launch_stops_before_any_worker(
    args: tuple[str, ...], expected: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run(*args, f"run.dir={run_dir}")
    _assert_one_line_error(result, expected)
    assert not run_dir.exists()  # nothing written, nothing started


def test_launch_steps_return_new_configs_and_leave_the_composed_one(tmp_path: Path) -> None:
    """The entry point resolves paths and the run folder on copies: the composed config
    stays as the user wrote it (one source of truth for the layout: the plan)."""
    import copy

    from orchestrator.data.build import resolve_paths
    from orchestrator.launch.run_folder import run_dir_of, with_run_dir

    cfg = load("data=demo", "model=tiny")
    before = copy.deepcopy(cfg)
    resolved = resolve_paths(cfg)
    placed = with_run_dir(resolved)
    assert cfg == before
    assert Path(str(resolved.data.tokenizer)).is_absolute()
    assert all(Path(s.prefix).is_absolute() for s in resolved.data.sources)
    assert run_dir_of(placed).is_absolute() and resolved.run.dir == before.run.dir
    assert with_run_dir(placed) is placed  # already absolute: the same folder every time
