"""Progress lines, metrics.jsonl, TensorBoard events and the start-up banner."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from orchestrator.status.metrics import (
    StepMetrics,
    format_duration,
    parse_progress_line,
    progress_line,
    read_metrics,
)
from tests.launch import run_launch

STEPS = 4


def _metrics(**overrides: object) -> StepMetrics:
    values: dict[str, object] = dict(
        step=3,
        loss=2.5,
        lr=3e-4,
        grad_norm=1.25,
        tokens_per_s=4096.0,
        consumed_tokens=3072,
        step_time_s=0.25,
        skipped_steps=1,
        total_steps=8,
        tokens_per_s_per_device=1024.0,
        tflops_per_device=0.5,
        mfu=0.25,
        peak_mem_gb=1.5,
        eta_s=3725.0,
    )
    values.update(overrides)
    return StepMetrics(**values)  # type: ignore[arg-type]


def test_progress_line_format() -> None:
    line = progress_line(_metrics(), total_steps=8)
    assert line.startswith("step 3/8 | loss 2.5000 | lr 3.000e-04 | grad_norm 1.2500 | ")
    fields = parse_progress_line(line)
    assert fields["consumed_tokens"] == "3,072"
    assert fields["skipped"] == "1"
    assert fields["tokens/s"] == "4,096"
    assert fields["tokens/s/device"] == "1,024.0"
    assert fields["tflops/device"] == "0.500"
    assert fields["mfu"] == "25.00%"
    assert fields["peak_mem"] == "1.50GB"
    assert fields["eta"] == "01:02:05"
    assert "loss_scale" not in fields  # fp16 only
    fp16 = parse_progress_line(progress_line(_metrics(loss_scale=65536.0), total_steps=8))
    assert fp16["loss_scale"] == "65536"
    recompute = parse_progress_line(progress_line(_metrics(hfu=1 / 3), total_steps=8))
    assert recompute["mfu"] == "25.00% (hfu 33.33%)"
    assert parse_progress_line(progress_line(_metrics(grad_norm=None), total_steps=8))[
        "grad_norm"
    ] == ("n/a")


def test_format_duration() -> None:
    assert format_duration(None) == "n/a"
    assert format_duration(float("inf")) == "n/a"
    assert format_duration(59.6) == "00:01:00"
    assert format_duration(2 * 86400 + 3 * 3600 + 4) == "2d 03:00:04"


def test_read_metrics_skips_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 1, "loss": 2.0})
        + "\n"
        + json.dumps({"step": 1, "valid_loss": 2.1})
        + '\n{"step": 2, "lo'
    )
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    assert read_metrics(path, kind="valid") == [{"step": 1, "valid_loss": 2.1}]


def _progress_lines(stdout: str) -> list[dict[str, str]]:
    return [
        parse_progress_line(line)
        for line in stdout.splitlines()
        if re.search(r"step \d+/\d+ \| loss ", line)
    ]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%sGB"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_progress_lines_agree_with_metrics_jsonl(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_launch(
        "model=tiny",
        "data=synthetic",
        "parallel=tp1pp1",
        f"train.steps={STEPS}",
        "train.log_interval=1",
        f"run.dir={run_dir}",
    )
    lines = _progress_lines(proc.stdout)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(lines) == len(records) == STEPS
    for line, rec in zip(lines, records, strict=True):
        assert line["step"] == f"{rec['step']}/{STEPS}"
        assert _number(line["loss"]) == pytest.approx(rec["loss"], abs=1e-4)
        assert _number(line["lr"]) == pytest.approx(rec["lr"], rel=1e-3)
        assert _number(line["grad_norm"]) == pytest.approx(rec["grad_norm"], abs=1e-4)
        assert int(_number(line["consumed_tokens"])) == rec["consumed_tokens"]
        assert int(line["skipped"]) == rec["skipped_steps"] == 0
        assert _number(line["step_time"]) == pytest.approx(rec["step_time_s"], abs=1e-3)
        assert _number(line["tokens/s"]) == pytest.approx(rec["tokens_per_s"], abs=1)
        assert _number(line["tokens/s/device"]) == pytest.approx(
            rec["tokens_per_s_per_device"], abs=0.1
        )
        assert _number(line["tflops/device"]) == pytest.approx(rec["tflops_per_device"], abs=1e-3)
        assert _number(line["mfu"]) == pytest.approx(100 * rec["mfu"], abs=0.01)
        assert _number(line["peak_mem"]) == pytest.approx(rec["peak_mem_gb"], abs=0.01)
        assert rec["peak_mem_gb"] > 0.05  # a real peak RSS, not a placeholder
        assert "loss_scale" not in line and rec["loss_scale"] is None  # fp32 run
        assert rec["eta_s"] is not None and line["eta"] != "n/a"
    # the derived numbers are consistent: one device, tokens per step over the step time
    last = records[-1]
    assert last["tokens_per_s"] == pytest.approx(8 * 128 / last["step_time_s"])
    assert last["tokens_per_s_per_device"] == pytest.approx(last["tokens_per_s"])
    # against the fp32 peak named in the banner (cluster=local measures it on this host;
    # the banner prints it to 3 significant digits)
    shown = re.search(r"device peak ([\d.e+-]+) TFLOP/s \(fp32\)", proc.stdout)
    assert shown, proc.stdout[-3000:]
    assert last["mfu"] == pytest.approx(last["tflops_per_device"] / float(shown[1]), rel=6e-3)
    assert last["eta_s"] == 0
    # every line carries date, time, rank and node
    host = socket.gethostname()
    stamp = rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 0 {re.escape(host)}\] INFO step 1/"
    assert re.search(stamp, proc.stdout, re.MULTILINE), proc.stdout[-2000:]
    # the banner, once, before the first step
    assert proc.stdout.count("resume: fresh start") == 1
    banner = proc.stdout[: proc.stdout.index(f"step 1/{STEPS} | loss")]
    for text in (
        f"run directory: {run_dir}",
        "world size: 1 = tp(1) * pp(1) * dp(1)",
        "stage 0: layers 0-3 (4)",
        "zero stage: 1",
        "precision: fp32; activation checkpointing: none",
        "total params: 1,365,120",
        "memory",
        "model FLOPs per token",
        "TFLOP/s (fp32), measured on this host",
    ):
        assert text in banner, text
    # TensorBoard events with the same numbers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert {"perf/mfu", "perf/tokens_per_s", "train/lr"} <= set(events.Tags()["scalars"])
    # heartbeats: the rank ended normally and left its recent step time
    beat = json.loads((run_dir / "heartbeats" / "rank_0.json").read_text())
    assert beat["phase"] == "exited" and beat["step"] == STEPS and beat["step_time_s"] > 0
