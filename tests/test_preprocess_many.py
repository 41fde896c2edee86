"""Many shards: .zst input, one shard per file, restarts, workers, array tasks, the CLI."""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

from orchestrator.data import preprocess_many as many
from orchestrator.data.indexed import IndexedDataset, shard_paths
from orchestrator.data.preprocess import preprocess
from orchestrator.data.preprocess_many import preprocess_many, render_array_script
from orchestrator.data.shard_plan import plan_shards, shard_names
from orchestrator.runtime.dist_env import array_task
from tests.test_preprocess import MALFORMED_LINES, decoded_documents, write_malformed
from tests.test_tokenizer import make_documents, train_small_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_zst(path: Path, texts: list[str], *, frames: int = 2) -> Path:
    """JSONL in ``frames`` zstd frames, as multi-threaded zstd writes large files."""
    lines = [json.dumps({"text": t, "id": i}).encode() + b"\n" for i, t in enumerate(texts)]
    cut = [len(lines) * k // frames for k in range(frames + 1)]
    compress = zstandard.ZstdCompressor().compress
    path.write_bytes(
        b"".join(compress(b"".join(lines[a:b])) for a, b in zip(cut, cut[1:], strict=False))
    )
    return path


def write_corpus(directory: Path, sizes: list[int]) -> list[list[str]]:
    """``part-0000i.jsonl.zst`` with ``sizes[i]`` documents each; their texts."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = [make_documents(n, seed=10 + i) for i, n in enumerate(sizes)]
    for i, docs in enumerate(texts):
        write_zst(directory / f"part-{i:05d}.jsonl.zst", docs)
    return texts


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def cli(*args: str | Path) -> list[str]:
    return [str(a) for a in args]


def test_array_task_from_environment() -> None:
    assert array_task({}) is None
    assert array_task({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    offset = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert array_task({**offset, "SLURM_ARRAY_TASK_MIN": "5"}) == (2, 4)
    stepped = {**offset, "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "3"}
    assert array_task(stepped) == (2, 4)  # --array=1-10:3: ids 1, 4, 7, 10
    with pytest.raises(RuntimeError, match=r"SLURM_ARRAY_TASK_ID=7: not min\(0\)"):
        array_task(offset)  # 7 is not in [0, 4)
    with pytest.raises(RuntimeError, match="SLURM_ARRAY_TASK_COUNT is not set"):
        array_task({"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(RuntimeError, match="SLURM_ARRAY_TASK_ID='x' is not an integer"):
        array_task({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "1"})


def test_zst_gives_the_tokens_of_the_same_text_uncompressed(tmp_path: Path, model: Path) -> None:
    texts = [*make_documents(300, seed=5), "😀 unseen 漢字"]
    write_jsonl(tmp_path / "plain.jsonl", texts)
    write_zst(tmp_path / "packed.jsonl.zst", texts, frames=3)
    plain = preprocess([tmp_path / "plain.jsonl"], tmp_path / "plain", model, batch_size=16)
    packed = preprocess([tmp_path / "packed.jsonl.zst"], tmp_path / "packed", model, batch_size=16)
    assert decoded_documents(tmp_path / "packed", model) == texts
    a, b = IndexedDataset(tmp_path / "plain"), IndexedDataset(tmp_path / "packed")
    assert len(a) == len(b) == len(texts)
    assert all((a[i] == b[i]).all() for i in range(len(a)))
    assert (packed.num_documents, packed.num_tokens) == (plain.num_documents, plain.num_tokens)
    assert packed.bytes_read == packed.input_bytes == (tmp_path / "packed.jsonl.zst").stat().st_size


def test_truncated_zst_names_the_file(tmp_path: Path, model: Path) -> None:
    write_corpus(tmp_path / "in", [50, 400])
    broken = tmp_path / "in" / "part-00001.jsonl.zst"
    broken.write_bytes(broken.read_bytes()[:-200])
    with pytest.raises(OSError, match=r"part-00001\.jsonl\.zst: cannot read \(compressed file"):
        preprocess([broken], tmp_path / "out", model)
    run = preprocess_many(sorted((tmp_path / "in").iterdir()), tmp_path / "many", model)
    assert run.made == ["part-00000"]
    assert [r.name for r in run.failed] == ["part-00001"]
    assert f"{broken}: cannot read" in str(run.failed[0].error)
    assert sorted(shard_bytes(tmp_path / "many")) == ["part-00000.bin", "part-00000.idx"]


def test_one_shard_per_input_file(tmp_path: Path, model: Path) -> None:
    texts = write_corpus(tmp_path / "in", [30, 1, 45])
    write_jsonl(tmp_path / "in" / "extra.jsonl", ["plain one", "plain two"])
    run = preprocess_many(sorted((tmp_path / "in").iterdir()), tmp_path / "out", model)
    names = ["extra", "part-00000", "part-00001", "part-00002"]
    assert sorted(run.made) == names and run.skipped == [] and run.failed == []
    assert sorted(shard_bytes(tmp_path / "out")) == sorted(
        f"{n}.{e}" for n in names for e in ("bin", "idx")
    )
    assert decoded_documents(tmp_path / "out" / "extra", model) == ["plain one", "plain two"]
    for i, docs in enumerate(texts):
        assert decoded_documents(tmp_path / "out" / f"part-{i:05d}", model) == docs
    assert run.totals.num_documents == 2 + sum(map(len, texts))


def test_files_per_shard(tmp_path: Path, model: Path) -> None:
    texts = write_corpus(tmp_path / "in", [5, 6, 7, 8, 9])
    inputs = sorted((tmp_path / "in").iterdir())
    run = preprocess_many(inputs, tmp_path / "out", model, files_per_shard=2)
    groups = {"part-00000.g00000": [0, 1], "part-00002.g00001": [2, 3], "part-00004.g00002": [4]}
    assert sorted(run.made) == sorted(groups)
    for name, files in groups.items():
        expected = [t for i in files for t in texts[i]]
        assert decoded_documents(tmp_path / "out" / name, model) == expected


def test_shard_names() -> None:
    assert shard_names([Path("cc/part-1.jsonl.zst"), Path("x/a.b.txt.gz")]) == ["part-1", "a.b"]
    clashing = [Path("cc/2019-30/en_0.jsonl.zst"), Path("cc/2020-05/en_0.jsonl"), Path("cc/z.json")]
    assert shard_names(clashing) == ["2019-30__en_0", "2020-05__en_0", "z"]
    deep = [Path("a/x/p.jsonl"), Path("b/x/p.jsonl")]
    assert shard_names(deep) == ["a__x__p", "b__x__p"]
    with pytest.raises(ValueError, match=r"inputs d/a\.jsonl and d/a\.jsonl\.gz would both make"):
        shard_names([Path("d/a.jsonl"), Path("d/a.jsonl.gz")])


@pytest.mark.timeout(90)
def test_workers_do_not_change_the_shards(tmp_path: Path, model: Path) -> None:
    write_corpus(tmp_path / "in", [120, 10, 200, 60, 90])
    inputs = sorted((tmp_path / "in").iterdir())
    for workers in (1, 2):
        run = preprocess_many(inputs, tmp_path / f"w{workers}", model, workers=workers)
        assert len(run.made) == 5
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    # one shard made with the batch-parallel preprocess gives the same bytes too
    preprocess_many(inputs[2:3], tmp_path / "one", model, workers=2)
    assert shard_bytes(tmp_path / "one") == {
        k: v for k, v in shard_bytes(tmp_path / "w1").items() if k.startswith("part-00002.")
    }


def test_rerun_remakes_only_unfinished_shards(tmp_path: Path, model: Path) -> None:
    write_corpus(tmp_path / "in", [20, 30, 40, 50])
    inputs = sorted((tmp_path / "in").iterdir())
    preprocess_many(inputs, tmp_path / "clean", model)
    out = tmp_path / "out"
    preprocess_many(inputs, out, model)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # What a killed run leaves: a shard half written, one renamed .bin without .idx,
    # and a finished shard whose .idx does not match its .bin.
    (out / "part-00001.idx").unlink()
    (out / "part-00001.bin.tmp").write_bytes(b"\x01\x02" * 7)
    (out / "part-00003.idx.tmp").write_bytes(b"\x03")  # beside a finished shard
    bin2, _ = shard_paths(out / "part-00002")
    bin2.write_bytes(bin2.read_bytes()[:-2])
    run = preprocess_many(inputs, out, model)
    assert (sorted(run.made), sorted(run.skipped)) == (
        ["part-00001", "part-00002"],
        ["part-00000", "part-00003"],
    )
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    for name in ("part-00000.bin", "part-00000.idx", "part-00003.bin", "part-00003.idx"):
        assert (out / name).stat().st_mtime_ns == mtimes[name], name


@pytest.mark.timeout(120)
def test_killed_run_then_rerun_is_byte_identical(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_corpus(tmp_path / "in", [20, 12000, 12000, 12000])
    argv = cli("--input", tmp_path / "in" / "*.jsonl.zst", "--tokenizer", model, "--workers", 1)
    assert many.main([*argv, "--output-dir", str(tmp_path / "clean"), "--no-progress"]) == 0
    out = tmp_path / "out"
    command = [sys.executable, "-m", "orchestrator.data.preprocess_many", *argv]
    process = subprocess.Popen([*command, "--output-dir", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "part-00000.idx").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.stem for p in out.glob("*.idx"))
    assert "part-00000" in finished and len(finished) < 4, finished
    first_mtime = (out / "part-00000.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert many.main([*argv, "--output-dir", str(out), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert f"{4 - len(finished)} made, {len(finished)} already finished, 0 failed" in report
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")  # no .tmp left either
    assert (out / "part-00000.bin").stat().st_mtime_ns == first_mtime


@pytest.mark.timeout(90)
def test_array_tasks_together_make_one_full_run(tmp_path: Path, model: Path) -> None:
    write_corpus(tmp_path / "in", [9, 8, 7, 6, 5, 4, 3])
    inputs = sorted((tmp_path / "in").iterdir())
    preprocess_many(inputs, tmp_path / "full", model)
    made = []
    for task in range(3):
        run = preprocess_many(inputs, tmp_path / "tasks", model, workers=2, task=(task, 3))
        assert run.skipped == [] and run.num_shards_in_all == 7
        made.append(sorted(run.made))
    assert made == [
        ["part-00000", "part-00003", "part-00006"],
        ["part-00001", "part-00004"],
        ["part-00002", "part-00005"],
    ]
    assert shard_bytes(tmp_path / "tasks") == shard_bytes(tmp_path / "full")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.timeout(90)
def test_malformed_lines_name_file_and_line(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    bad = write_malformed(tmp_path / f"bad{suffix}")
    if suffix.endswith(".zst"):
        bad.write_bytes(zstandard.ZstdCompressor().compress(bad.read_bytes()))
    write_zst(tmp_path / "good.jsonl.zst", ["fine"])
    argv = cli("--input", bad, tmp_path / "good.jsonl.zst", "--tokenizer", model, "--workers", 2)
    assert many.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    lines = [n for n, (_, reason) in enumerate(MALFORMED_LINES, 1) if reason is not None]
    warnings = [line.split(": ")[1] for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"{bad}:{n}" for n in lines], err
    assert decoded_documents(tmp_path / "out" / "bad", model) == ["good one", "good two"]

    assert many.main([*argv, "--output-dir", str(tmp_path / "strict"), "--strict"]) == 1
    err = capsys.readouterr().err
    assert f"error: shard bad failed: {bad}:2: invalid JSON" in err
    assert err.splitlines()[-1] == "error: 1 shards failed: bad"
    assert sorted(shard_bytes(tmp_path / "strict")) == ["good.bin", "good.idx"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--input", "nothing/*.zst"], {}, "error: --input 'nothing/*.zst': matches no file"),
        (["--output-dir", "a_file"], {}, "error: output_dir=a_file: is not a directory"),
        (["--files-per-shard", "0"], {}, "error: files_per_shard=0: must be >= 1"),
        (["--workers", "0"], {}, "error: workers=0: must be >= 1"),
        (
            ["--array-task-id", "3", "--array-task-count", "3"],
            {},
            "error: array_task_id=3: must be in [0, array_task_count=3)",
        ),
        (
            ["--array-task-id", "0", "--array-task-count", "0"],
            {},
            "error: array_task_count=0: must be >= 1",
        ),
        (
            ["--array-task-id", "1"],
            {},
            "error: --array-task-id and --array-task-count: give both or neither",
        ),
        ([], {"SLURM_ARRAY_TASK_ID": "1"}, "error: SLURM_ARRAY_TASK_COUNT is not set"),
        (["--tokenizer", "none.model"], {}, "error: none.model: tokenizer model not found"),
    ],
)
def test_cli_bad_arguments(
    tmp_path: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("SLURM_ARRAY")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_zst(tmp_path / "c.jsonl.zst", ["text"])
    (tmp_path / "a_file").write_text("")
    before = sorted(os.listdir(tmp_path))
    base = ["--input", "*.zst", "--output-dir", "out", "--tokenizer", str(model)]
    assert many.main([*base, *args]) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.timeout(60)
def test_render_array_script(tmp_path: Path) -> None:
    odd = "my data/$(rm -rf ~)'x"
    script = render_array_script(
        [f"{odd}/*.jsonl.zst", "b c.jsonl"],
        f"{odd}/out",
        "tok.model",
        array_size=16,
        cpus_per_task=4,
        log_dir=f"{odd}/logs%",
        files_per_shard=2,
        partition="cpu",
        time_limit="2:00:00",
        python=str(tmp_path / "fake python"),
        workdir=str(tmp_path),
    )
    assert "#SBATCH --array=0-15\n" in script and "#SBATCH --cpus-per-task=4\n" in script
    assert "#SBATCH --partition=cpu\n#SBATCH --time=2:00:00\n" in script
    output = shlex.quote(f"--output={odd}/logs%%/%x-%A_%a.out")  # sbatch's % doubled
    assert f"#SBATCH {output}\n" in script
    assert "Rendered by orchestrator/data/preprocess_many.py" in script
    assert "set -eo pipefail" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    # The script runs "python": a stand-in that prints each argument on its own line.
    fake = tmp_path / "fake python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    run = subprocess.run(
        ["bash", str(path)],
        env={"PATH": os.environ["PATH"], "SLURM_CPUS_PER_TASK": "4"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.splitlines()[1:] == [
        *["-m", "orchestrator.data.preprocess_many", "--input", f"{odd}/*.jsonl.zst", "b c.jsonl"],
        *["--output-dir", f"{odd}/out", "--tokenizer", "tok.model"],
        *["--files-per-shard", "2", "--text-split", "file", "--workers", "4"],
    ]
    with pytest.raises(ValueError, match=r"partition='a b': not a SLURM name"):
        render_array_script(
            ["x"], "o", "t", array_size=1, cpus_per_task=1, log_dir="l", partition="a b"
        )
    with pytest.raises(ValueError, match="array_size=0: must be >= 1"):
        render_array_script(["x"], "o", "t", array_size=0, cpus_per_task=1, log_dir="l")


def test_cli_renders_sbatch(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "in", [1, 1, 1])
    argv = ["--input", "in/*.zst", "--output-dir", "out", "--tokenizer", str(model)]
    assert many.main([*argv, "--render-sbatch", "jobs/pre.sh", "--cpus-per-task", "6"]) == 0
    assert capsys.readouterr().out == "wrote jobs/pre.sh (3 shards, 3 tasks)\n"
    script = (tmp_path / "jobs" / "pre.sh").read_text()
    assert "#SBATCH --array=0-2\n" in script and "    --input 'in/*.zst' \\\n" in script
    assert (tmp_path / "jobs" / "logs").is_dir() and not (tmp_path / "out").exists()
    assert len(plan_shards(sorted((tmp_path / "in").iterdir()))) == 3
