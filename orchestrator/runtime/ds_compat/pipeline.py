"""DeepSpeed's pipeline module with our stage split (part of ``orchestrator.runtime.ds_compat``)."""

from __future__ import annotations

from collections.abc import Iterator

from deepspeed.pipe import PipelineModule
from torch import nn


class FixedSplitPipelineModule(PipelineModule):
    """DeepSpeed's ``PipelineModule`` with the stage split given, not computed.

    DeepSpeed's ``partition_method`` balances layers by count or parameters;
    the plan chooses the split (the embedding and the head weigh differently
    on each stage), so ``_partition_layers``, which DeepSpeed calls from
    ``__init__``, is replaced: stage ``s`` holds layers
    ``parts[s]:parts[s + 1]``. Set ``_parts`` before calling
    ``super().__init__``.
    """

    _parts: list[int]

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = self._parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def stage_modules(pipeline: PipelineModule) -> Iterator[nn.Module]:
    """The layers this rank's stage built, in order (DeepSpeed's ``forward_funcs``)."""
    yield from pipeline.forward_funcs
