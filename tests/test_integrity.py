"""Checkpoint integrity records: checksums taken while writing, shares of the check, failures."""

from __future__ import annotations

import errno
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from model_parallel.layout import Layout
from orchestrator.state import integrity


def test_checksum_taken_while_writing_is_the_files_crc(tmp_path: Path) -> None:
    state = {"w": torch.randn(1000, 700), "step": 3, "small": torch.arange(5)}
    path = tmp_path / "f.pt"
    entry = integrity.write_checksummed(state, path)
    data = path.read_bytes()
    assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert integrity.checksum_file(path) == entry
    loaded = torch.load(path, weights_only=True, mmap=True)  # a normal torch file
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3


class _FullDisk:
    """A file object whose device fills up after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= n
        return n

    def flush(self) -> None:
        pass


def test_a_full_disk_is_kept_as_the_oserror_torch_wraps() -> None:
    """torch's zip writer turns a failed write() into a RuntimeError; the OSError is kept."""
    with ThreadPoolExecutor(1) as pool:
        out = integrity._ChecksummedFile(_FullDisk(room=10_000), pool)
        with pytest.raises(RuntimeError):
            torch.save({"w": torch.zeros(100_000)}, out)  # type: ignore[arg-type]
    assert out.error is not None and out.error.errno == errno.ENOSPC


class _Engine:
    class checkpoint_engine:  # noqa: N801 - DeepSpeed's attribute name
        @staticmethod
        def save(state_dict: Any, path: str) -> None:
            raise AssertionError("the recorder replaces this")


def test_recorder_records_files_and_swallows_the_first_error(tmp_path: Path) -> None:
    engine = _Engine()
    with integrity.Recorder(engine, tmp_path) as record:
        engine.checkpoint_engine.save({"a": torch.ones(4)}, str(tmp_path / "a.pt"))
        engine.checkpoint_engine.save(
            state_dict={"b": torch.ones(8)}, path=str(tmp_path / "no/b.pt")
        )
        engine.checkpoint_engine.save({"c": torch.ones(16)}, str(tmp_path / "c.pt"))
    assert list(record.files) == ["a.pt"]  # nothing more is written after an error
    assert record.error is not None and "no/b.pt" in record.error and "No such file" in record.error
    assert record.planned_bytes == (4 + 8 + 16) * 4
    assert not (tmp_path / "c.pt").exists()
    assert engine.checkpoint_engine.save is _Engine.checkpoint_engine.save  # put back


def _deepspeed_names(tp: int, pp: int, dp: int, n_layers: int) -> list[str]:
    names = [
        f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
        for d in range(dp)
        for m in range(tp * pp)
    ]
    names += [f"mp_rank_{m:02d}_model_states.pt" for m in range(tp * pp)]
    names += [
        f"layer_{i:02d}-model_{t:02d}-model_states.pt"
        for i in range(n_layers + 2)
        for t in range(tp)
    ]
    return [*names, "layout.json"]


def test_each_file_is_checked_by_the_rank_that_loads_it() -> None:
    tp, pp, dp, n_layers = 2, 3, 4, 6
    stage_layers = [[0, 1], [2, 3], [4, 5]]
    names = _deepspeed_names(tp, pp, dp, n_layers)
    owner = integrity.owners(names, tp=tp, pp=pp, dp=dp, stage_layers=stage_layers)
    grid = Layout(tp=tp, pp=pp, dp=dp)
    for name, rank in owner.items():
        c = grid.coords(rank)
        if name.startswith("zero_pp_rank_"):
            d, m = int(name.split("_")[3]), int(name.split("_")[6])
            assert (c.dp_rank, c.pp_rank * tp + c.tp_rank) == (d, m), name
        elif name.startswith("layer_"):
            index, tp_rank = int(name[6:8]), int(name[15:17])
            layer = min(max(index - 1, 0), n_layers - 1)
            assert (c.pp_rank, c.tp_rank, c.dp_rank) == (layer // 2, tp_rank, 0), name
    assert "layout.json" not in owner
    manifest = {"files": {n: {"bytes": 10 + i} for i, n in enumerate(names)}}
    parts = integrity.shares(manifest, grid.world_size, owner)
    assert sorted(n for part in parts for n in part) == sorted(names)  # each file once
    for rank, part in enumerate(parts):
        assert all(owner.get(n, rank) == rank for n in part)


def test_shares_balance_bytes_when_no_rank_owns_the_files() -> None:
    sizes = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    manifest = {"files": {f"f{i}": {"bytes": s} for i, s in enumerate(sizes)}}
    parts = integrity.shares(manifest, 3)
    loads = [sum(manifest["files"][n]["bytes"] for n in part) for part in parts]
    assert sorted(n for p in parts for n in p) == sorted(manifest["files"])
    assert max(loads) - min(loads) <= max(sizes) // 2, loads
