"""Carving LLaMA into pipeline stages for DeepSpeed's pipeline engine.

The model is the sequence ``[embedding, block 0, ..., block L-1, head]``;
stage ``s`` holds the embedding if it is first, the head (final norm and
output layer) if it is last, and the blocks the plan gave it. Layers are
described by ``LayerSpec``s, so each rank builds only its own stage, and every
built layer initialises itself under its global name (``layers.12.attention
.wq.weight``), so the weights do not depend on the stage split or on tp.

The vocab-parallel loss runs on the last stage (``PipelineLoss``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from deepspeed.pipe import LayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn
from torch.utils.checkpoint import checkpoint

from model_parallel.args import ModelArgs, padded_vocab_size
from model_parallel.cross_entropy import masked_mean, vocab_parallel_cross_entropy
from model_parallel.groups import ProcessGroups
from model_parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    gather_full,
    load_shard_,
)
from model_parallel.llama import RMSNorm, TransformerBlock, init_parameters, with_shard_attrs
from model_parallel.mappings import Group, group_rank, group_size
from orchestrator.runtime.ds_compat.pipeline import FixedSplitPipelineModule, stage_modules


class EmbeddingPipe(nn.Module):
    """First-stage layer: token ids ``(B, S)`` -> hidden ``(B, S, H)`` (``(B, S/tp, H)`` with SP)."""

    def __init__(
        self, args: ModelArgs, *, tp_group: Group, sequence_parallel: bool, seed: int
    ) -> None:
        super().__init__()
        self.tok_embeddings = VocabParallelEmbedding(
            padded_vocab_size(args.vocab_size, group_size(tp_group)),
            args.dim,
            tp_group=tp_group,
            vocab_size=args.vocab_size,
            sequence_parallel=sequence_parallel,
        )
        init_parameters(self, args, seed=seed, tp_group=tp_group)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)


class BlockPipe(nn.Module):
    """One transformer block under its global number, optionally recomputed in backward."""

    def __init__(
        self,
        args: ModelArgs,
        layer_id: int,
        *,
        tp_group: Group,
        sequence_parallel: bool,
        checkpointing: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.checkpointing = checkpointing
        self.block = TransformerBlock(args, tp_group=tp_group, sequence_parallel=sequence_parallel)
        init_parameters(
            self.block, args, seed=seed, tp_group=tp_group, prefix=f"layers.{layer_id}."
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self.block, h, use_reentrant=False)
        return self.block(h)


class HeadPipe(nn.Module):
    """Last-stage layer: final RMSNorm and the column-parallel output layer -> logits shard."""

    def __init__(
        self, args: ModelArgs, *, tp_group: Group, sequence_parallel: bool, seed: int
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(
            args.dim, args.norm_eps, tp_group=tp_group, sequence_parallel=sequence_parallel
        )
        self.output = ColumnParallelLinear(
            args.dim,
            padded_vocab_size(args.vocab_size, group_size(tp_group)),
            tp_group=tp_group,
            sequence_parallel=sequence_parallel,
            full_out_features=args.vocab_size,
        )
        init_parameters(self, args, seed=seed, tp_group=tp_group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))


class PipelineLoss:
    """Mean vocab-parallel cross entropy over the labelled tokens of one micro-batch (last stage)."""

    def __init__(self, *, tp_group: Group, vocab_size: int) -> None:
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.compiled = False  # set by compile_model
        # Applied to each micro-batch's loss when set (the trainer's testing aids:
        # orchestrator.runtime.numerics.LossFault).
        self.hook: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = vocab_parallel_cross_entropy(
            logits,
            labels,
            tp_group=self.tp_group,
            vocab_size=self.vocab_size,
            compiled=self.compiled,
        )
        loss = masked_mean(loss, labels)
        return loss if self.hook is None else self.hook(loss)


def stage_boundaries(stage_layers: Sequence[tuple[int, int]]) -> list[int]:
    """DeepSpeed's ``parts`` for ``[embedding, blocks..., head]``.

    ``stage_layers`` holds each stage's (first, last) block, inclusive. Stage
    ``s`` owns layer-list entries ``parts[s]:parts[s+1]``; entry 0 is the
    embedding and block ``i`` is entry ``i + 1``.
    """
    parts = [0]
    for _, last in stage_layers[:-1]:
        parts.append(last + 2)
    parts.append(stage_layers[-1][1] + 3)
    return parts


class LlamaPipeline(FixedSplitPipelineModule):
    """``PipelineModule`` with the stage split taken from the plan, not balanced by DeepSpeed."""

    def __init__(
        self,
        args: ModelArgs,
        *,
        groups: ProcessGroups,
        stage_layers: Sequence[tuple[int, int]],
        sequence_parallel: bool = False,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        if len(stage_layers) != groups.pp_size:
            raise ValueError(f"{len(stage_layers)} stage splits for pp({groups.pp_size})")
        self._parts = stage_boundaries(stage_layers)
        sp = sequence_parallel and groups.tp_size > 1
        common = dict(tp_group=groups.tp_group, sequence_parallel=sp, seed=seed)
        specs: list[LayerSpec] = [LayerSpec(EmbeddingPipe, args, **common)]
        specs += [
            LayerSpec(BlockPipe, args, i, checkpointing=activation_checkpointing, **common)
            for i in range(args.n_layers)
        ]
        specs.append(LayerSpec(HeadPipe, args, **common))
        topology = PipeModelDataParallelTopology(
            num_pp=groups.pp_size, num_mp=groups.tp_size, num_dp=groups.dp_size
        )
        super().__init__(
            layers=specs,
            topology=topology,
            loss_fn=PipelineLoss(tp_group=groups.tp_group, vocab_size=args.vocab_size),
        )
        self.tp_group = groups.tp_group


def _stage_parameters(pipeline: LlamaPipeline) -> Iterator[tuple[str, nn.Parameter]]:
    """This rank's stage parameters under their global (Meta) names."""
    for module in stage_modules(pipeline):
        prefix, target = "", module
        if isinstance(module, BlockPipe):
            prefix, target = f"layers.{module.layer_id}.", module.block
        for name, param in target.named_parameters():
            yield prefix + name, param


def load_stage_state_dict(pipeline: LlamaPipeline, state: dict[str, torch.Tensor]) -> None:
    """Load this rank's stage (and tp shard) from a full state dict with Meta's names."""
    for name, param in _stage_parameters(pipeline):
        load_shard_(
            param,
            state[name].to(param.dtype),
            tp_rank=group_rank(pipeline.tp_group),
            tp_size=group_size(pipeline.tp_group),
        )


def stage_state_dict(pipeline: LlamaPipeline, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's stage parameters (or gradients) as full, unpadded tensors under Meta's
    names; a tp collective (``Transformer.full_state_dict`` for a stage)."""
    out = {}
    for name, param in _stage_parameters(pipeline):
        value = param.grad if grads else param
        if value is not None:
            out[name] = gather_full(with_shard_attrs(value.detach(), param), pipeline.tp_group)
    return out
