"""The process groups of one rank, built once and passed to every layer.

This is the only module that calls ``torch.distributed.new_group``. There is
no module-level state: a model built with ``ProcessGroups.single()`` runs in
one process with no process group at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from model_parallel.layout import Coords, Layout


@dataclass(frozen=True)
class ProcessGroups:
    """This rank's tp/dp/pp (and model-parallel) groups and its coordinates.

    ``build`` creates every group, size 1 included (DeepSpeed's ``mpu`` needs
    real groups). Without ``torch.distributed`` (``single()``) the groups are
    ``None``; collectives over ``None`` or a group of size 1 are identities.
    """

    layout: Layout
    rank: int
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    pp_ranks: tuple[int, ...] = (0,)

    @classmethod
    def single(cls) -> ProcessGroups:
        """One process, no parallelism, no process groups."""
        return cls(layout=Layout(), rank=0)

    @classmethod
    def build(cls, layout: Layout) -> ProcessGroups:
        """Create every group of ``layout`` (a collective: all ranks must call it)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before building groups")
        world = dist.get_world_size()
        if world != layout.world_size:
            raise ValueError(
                f"tp({layout.tp}) * pp({layout.pp}) * dp({layout.dp}) = {layout.world_size}"
                f" != world_size({world})"
            )
        rank = dist.get_rank()

        def mine(all_groups: list[list[int]]) -> tuple[dist.ProcessGroup | None, list[int]]:
            # new_group is collective over the whole world: every rank creates
            # every group, in the same order, and keeps the one it belongs to.
            found: dist.ProcessGroup | None = None
            ranks_found: list[int] = []
            for ranks in all_groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    found, ranks_found = group, ranks
            return found, ranks_found

        tp_group, _ = mine(layout.tp_groups())
        dp_group, _ = mine(layout.dp_groups())
        pp_group, pp_ranks = mine(layout.pp_groups())
        mp_group, _ = mine(layout.mp_groups())
        return cls(
            layout=layout,
            rank=rank,
            tp_group=tp_group,
            dp_group=dp_group,
            pp_group=pp_group,
            mp_group=mp_group,
            pp_ranks=tuple(pp_ranks),
        )

    @property
    def coords(self) -> Coords:
        return self.layout.coords(self.rank)

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1
