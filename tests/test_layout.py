"""Rank arithmetic, checked exhaustively without processes."""

from __future__ import annotations

import itertools

import pytest

from model_parallel.layout import Layout


def _partition_ok(groups: list[list[int]], world: int, size: int) -> None:
    flat = sorted(r for g in groups for r in g)
    assert flat == list(range(world)), "every rank in exactly one group"
    assert all(len(g) == size for g in groups)


@pytest.mark.parametrize("tp,pp,dp", list(itertools.product([1, 2, 4, 8], [1, 2, 3, 4], [1, 2, 3])))
def test_groups_partition_the_world(tp: int, pp: int, dp: int) -> None:
    layout = Layout(tp=tp, pp=pp, dp=dp)
    world = layout.world_size
    _partition_ok(layout.tp_groups(), world, tp)
    _partition_ok(layout.dp_groups(), world, dp)
    _partition_ok(layout.pp_groups(), world, pp)
    _partition_ok(layout.mp_groups(), world, tp * pp)
    for rank in range(world):
        c = layout.coords(rank)
        assert layout.rank(tp_rank=c.tp_rank, dp_rank=c.dp_rank, pp_rank=c.pp_rank) == rank
    for group in layout.tp_groups():
        assert group == list(range(group[0], group[0] + tp)), "tp groups are contiguous"
        assert len({(layout.coords(r).dp_rank, layout.coords(r).pp_rank) for r in group}) == 1
    for group in layout.dp_groups():
        assert len({(layout.coords(r).tp_rank, layout.coords(r).pp_rank) for r in group}) == 1
    for group in layout.pp_groups():
        assert [layout.coords(r).pp_rank for r in group] == list(range(pp))


def test_megatron_documented_example() -> None:
    # Megatron-LM's initialize_model_parallel docstring: 16 GPUs, tp=2, pp=4 (dp=2).
    layout = Layout(tp=2, pp=4, dp=2)
    assert layout.tp_groups() == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
        [10, 11],
        [12, 13],
        [14, 15],
    ]
    assert layout.dp_groups()[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(layout.pp_groups()) == [
        [0, 4, 8, 12],
        [1, 5, 9, 13],
        [2, 6, 10, 14],
        [3, 7, 11, 15],
    ]


def test_bad_layouts() -> None:
    with pytest.raises(ValueError, match="layout.tp=0"):
        Layout(tp=0)
    with pytest.raises(ValueError, match="rank=8"):
        Layout(tp=2, pp=2, dp=2).coords(8)


# Every layout the training tests run, and the checked-in scripts' (65B tp8 pp4 dp64,
# Llama-2-70B the same, Llama-3.1-405B tp8 pp16 dp16): DeepSpeed's pipeline grid must
# place each rank where our groups do, or the pipeline engine would send activations
# to a rank of another data-parallel replica.
GRID_LAYOUTS = [
    (1, 1, 1),
    (2, 1, 1),
    (1, 2, 1),
    (1, 1, 2),
    (2, 2, 1),
    (2, 1, 2),
    (1, 2, 2),
    (2, 2, 2),
    (4, 1, 1),
    (1, 4, 1),
    (8, 4, 64),
    (8, 16, 16),
]


@pytest.mark.parametrize("tp,pp,dp", GRID_LAYOUTS)
def test_deepspeed_pipeline_grid_places_ranks_as_our_layout(tp: int, pp: int, dp: int) -> None:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layout = Layout(tp=tp, pp=pp, dp=dp)
    grid = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    assert grid.world_size() == layout.world_size
    for rank in range(layout.world_size):
        ours, theirs = layout.coords(rank), grid.get_coord(rank)
        assert (theirs.pipe, theirs.data, theirs.model) == (
            ours.pp_rank,
            ours.dp_rank,
            ours.tp_rank,
        ), rank
    assert sorted(grid.get_axis_comm_lists("model")) == sorted(layout.tp_groups())
    assert sorted(grid.get_axis_comm_lists("data")) == sorted(layout.dp_groups())
    assert sorted(grid.get_axis_comm_lists("pipe")) == sorted(layout.pp_groups())
