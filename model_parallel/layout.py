"""Pure rank arithmetic: which global ranks form each tp/pp/dp group.

Megatron's order: tp varies fastest, then dp, then pp, so

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Tensor-parallel groups are runs of ``tp`` contiguous ranks, so with ``tp``
dividing the GPUs per node they never leave a node. No processes are
needed for anything in this file.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coords:
    """Position of one rank in the (pp, dp, tp) grid."""

    tp_rank: int
    dp_rank: int
    pp_rank: int


@dataclass(frozen=True)
class Layout:
    """A tp x pp x dp grid of ranks."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"layout.{name}={value!r}: must be a positive integer")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, *, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """Global rank of the given coordinates."""
        assert 0 <= tp_rank < self.tp and 0 <= dp_rank < self.dp and 0 <= pp_rank < self.pp
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> Coords:
        """Coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: must be in [0, {self.world_size})")
        return Coords(
            tp_rank=rank % self.tp,
            dp_rank=(rank // self.tp) % self.dp,
            pp_rank=rank // (self.tp * self.dp),
        )

    def tp_groups(self) -> list[list[int]]:
        """Ranks that share a model shard's tensor-parallel split (same dp, pp)."""
        return [
            [self.rank(tp_rank=t, dp_rank=d, pp_rank=p) for t in range(self.tp)]
            for p in range(self.pp)
            for d in range(self.dp)
        ]

    def dp_groups(self) -> list[list[int]]:
        """Ranks holding replicas of the same parameters (same tp, pp)."""
        return [
            [self.rank(tp_rank=t, dp_rank=d, pp_rank=p) for d in range(self.dp)]
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_groups(self) -> list[list[int]]:
        """Ranks forming one pipeline, first stage first (same tp, dp)."""
        return [
            [self.rank(tp_rank=t, dp_rank=d, pp_rank=p) for p in range(self.pp)]
            for d in range(self.dp)
            for t in range(self.tp)
        ]

    def mp_groups(self) -> list[list[int]]:
        """Ranks holding one full model copy between them (same dp): tp x pp."""
        return [
            [
                self.rank(tp_rank=t, dp_rank=d, pp_rank=p)
                for p in range(self.pp)
                for t in range(self.tp)
            ]
            for d in range(self.dp)
        ]
