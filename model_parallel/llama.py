"""The LLaMA model (Touvron et al., 2023) built from tensor-parallel layers.

Pre-norm RMSNorm, rotary position embeddings (Meta's interleaved-pair
convention), causal attention with heads split over tp, SwiGLU MLP, no
biases, untied output layer. Parameter names are Meta's (``tok_embeddings``,
``layers.N.attention.wq``, ``feed_forward.w1`` ...), with global layer
numbers, so a pipeline stage holding layers 10..19 names them 10..19.

Initialisation is layout-independent: every parameter's full tensor is drawn
from a generator seeded by (seed, parameter name) and this rank's shard cut
out of it, so a tp=4 model holds exactly the shards of the tp=1 model.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model_parallel.args import ModelArgs, padded_vocab_size
from model_parallel.attention import causal_attention
from model_parallel.cross_entropy import vocab_parallel_cross_entropy
from model_parallel.fused import fused_rms_norm_affine
from model_parallel.groups import ProcessGroups
from model_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_shape,
    gather_full,
    load_shard_,
    map_column_input,
)
from model_parallel.mappings import (
    Group,
    copy_to_tp_region,
    gather_from_tp_region,
    group_rank,
    group_size,
)
from model_parallel.rotary import RotaryTables, apply_rotary


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w``, normalised in fp32 (Meta's numerics).

    Replicated over tp. With sequence parallelism each rank normalises only
    its part of the sequence, so each rank's weight gradient is partial: the
    weight passes through ``copy_to_tp_region`` (forward identity, backward
    all-reduce over tp), and every tp rank ends with the full gradient.
    """

    def __init__(
        self, dim: int, eps: float, *, tp_group: Group = None, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.eps = eps
        self.tp_group = tp_group if sequence_parallel else None
        self.weight = nn.Parameter(torch.ones(dim))
        self.weight.sequence_parallel = sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tp_region(self.weight, self.tp_group)
        # Compiled, inductor fuses the norm itself (apex's kernel would break the graph).
        eager_cuda = x.is_cuda and not torch.compiler.is_compiling()
        fused = fused_rms_norm_affine() if eager_cuda else None
        if fused is not None:
            return fused(x, weight, weight.shape, self.eps)
        normed = F.rms_norm(x.float(), weight.shape, eps=self.eps)
        return normed.type_as(x) * weight


class Attention(nn.Module):
    """Causal self-attention with heads split over tp, grouped-query when
    ``n_kv_heads < n_heads`` (each KV head serves ``g = n_heads / n_kv_heads``
    consecutive query heads).

    wq is column-parallel: rank i computes query heads ``[i*h/p, (i+1)*h/p)``.
    wk/wv are column-parallel too: when p divides n_kv_heads, rank i computes
    KV heads ``[i*kv/p, (i+1)*kv/p)``, exactly those its query heads use.
    When p > n_kv_heads, each KV head j is replicated on the ``r = p / kv``
    ranks ``[j*r, (j+1)*r)`` whose query heads use it (Megatron-Core's rule);
    each replica's weight gradient is partial (its own query heads only), so
    the weights' gradients are summed over the r replicas in backward
    (``ColumnParallelLinear(replicas=r)``). No communication in forward. wo
    is row-parallel and sums the heads' partial outputs (all-reduce, or
    reduce-scatter with sequence parallelism). The input mapping (backward
    all-reduce, or sequence all-gather) runs once for all three projections.
    """

    def __init__(self, args: ModelArgs, *, tp_group: Group, sequence_parallel: bool) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.head_dim = args.head_dim
        tp = group_size(tp_group)
        self.n_local_heads = args.n_heads // tp
        replicas = args.kv_replicas(tp)
        self.n_local_kv_heads = args.num_kv_heads * replicas // tp
        self.rotary = RotaryTables(
            args.head_dim, args.rope_theta, args.max_seq_len, scaling=args.rope_scaling
        )
        self.cpu_matmul_backward = False  # set by compile_model
        kw = dict(tp_group=tp_group, sequence_parallel=sequence_parallel, mapped_input=True)
        kv = dict(kw, replicas=replicas)
        self.wq = ColumnParallelLinear(args.dim, args.dim, **kw)  # type: ignore[arg-type]
        self.wk = ColumnParallelLinear(args.dim, args.kv_dim, **kv)  # type: ignore[arg-type]
        self.wv = ColumnParallelLinear(args.dim, args.kv_dim, **kv)  # type: ignore[arg-type]
        self.wo = RowParallelLinear(
            args.dim, args.dim, tp_group=tp_group, sequence_parallel=sequence_parallel
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = map_column_input(x, self.tp_group, sequence_parallel=self.sequence_parallel)
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, self.n_local_heads, self.head_dim)
        kv_shape = (bsz, seq, self.n_local_kv_heads, self.head_dim)
        k, v = self.wk(x).view(kv_shape), self.wv(x).view(kv_shape)
        cos, sin = self.rotary(seq, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # (B, S, h, hd) -> (B, h, S, hd); the local KV heads are not repeated for their
        # query heads: attention reads head i // g (grouped-query attention)
        out = causal_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            cpu_matmul_backward=self.cpu_matmul_backward,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))  # (B, S, h*hd)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; w1/w3 column-parallel, w2 row-parallel.

    Each rank holds a slice of the hidden width, so the elementwise product
    needs no communication; w2 sums the partial outputs.
    """

    def __init__(self, args: ModelArgs, *, tp_group: Group, sequence_parallel: bool) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        kw = dict(tp_group=tp_group, sequence_parallel=sequence_parallel, mapped_input=True)
        self.w1 = ColumnParallelLinear(args.dim, args.hidden_dim, **kw)  # type: ignore[arg-type]
        self.w3 = ColumnParallelLinear(args.dim, args.hidden_dim, **kw)  # type: ignore[arg-type]
        self.w2 = RowParallelLinear(
            args.hidden_dim, args.dim, tp_group=tp_group, sequence_parallel=sequence_parallel
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = map_column_input(x, self.tp_group, sequence_parallel=self.sequence_parallel)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """``h = x + attention(norm(x)); out = h + feed_forward(norm(h))``."""

    def __init__(self, args: ModelArgs, *, tp_group: Group, sequence_parallel: bool) -> None:
        super().__init__()
        sp = sequence_parallel
        norm = dict(tp_group=tp_group, sequence_parallel=sp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, **norm)  # type: ignore[arg-type]
        self.attention = Attention(args, tp_group=tp_group, sequence_parallel=sp)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, **norm)  # type: ignore[arg-type]
        self.feed_forward = FeedForward(args, tp_group=tp_group, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))


def compile_model(model: nn.Module) -> int:
    """``torch.compile`` every ``TransformerBlock`` of ``model`` in place, and its loss
    (a ``Transformer``'s, or a pipeline's ``loss_fn``); returns the number of
    blocks compiled.

    Each block's ``forward`` (norms, rotary, attention, SwiGLU, residuals, and
    their backward) becomes inductor kernels that fuse the elementwise work
    between the matmuls, including the fp32 round trips of RMSNorm and RoPE
    (same fp32 math, no materialised copies). ``Module.compile`` keeps the
    module and its parameter names, so state dicts, checkpoints and the
    optimiser see the same model. All blocks share one traced graph
    (parameters are graph inputs), so the compile is paid once per shape, at
    the first step. The loss is ``vocab_parallel_cross_entropy(compiled=True)``
    at any tp: its local work compiled, its all-reduces between the kernels.
    On CPU, compiled attention uses ``attention.flash_attention_cpu`` (ATen's
    flash forward, a backward of matmuls that inductor fuses); on a GPU, SDPA.
    """
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        block.attention.cpu_matmul_backward = True
        block.compile()
    if isinstance(model, Transformer):
        model.compiled_loss = True
    loss_fn = getattr(model, "loss_fn", None)  # a LlamaPipeline's PipelineLoss
    if hasattr(loss_fn, "compiled"):
        loss_fn.compiled = True  # type: ignore[union-attr]
    return len(blocks)


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_parameters(
    module: nn.Module, args: ModelArgs, *, seed: int, tp_group: Group, prefix: str = ""
) -> None:
    """Initialise ``module``'s parameters, named ``prefix + name`` in the whole model.

    Each full tensor is drawn from a generator seeded by (seed, global name)
    and this rank's shard cut out of it, so the values depend on neither the
    tp size nor the pipeline stage. Norm weights are ones; the output
    projection of each residual branch (wo, w2) gets std / sqrt(2 * n_layers)
    (GPT-2/Megatron scaled init); everything else N(0, init_std).
    """
    scaled = args.init_std / math.sqrt(2 * args.n_layers)
    for local_name, param in module.named_parameters():
        name = prefix + local_name
        if name.endswith("norm.weight"):
            full = torch.ones(full_shape(param))
        else:
            gen = torch.Generator().manual_seed(_param_seed(seed, name))
            std = scaled if name.endswith(("wo.weight", "w2.weight")) else args.init_std
            full = torch.empty(full_shape(param)).normal_(0.0, std, generator=gen)
        load_shard_(
            param, full.to(param.dtype), tp_rank=group_rank(tp_group), tp_size=group_size(tp_group)
        )


class Transformer(nn.Module):
    """LLaMA, whole (pp = 1): token ids ``(B, S)`` to logits ``(B, S, V_pad/tp)``.

    With sequence parallelism the hidden state between layers is ``(B, S/tp, H)``.
    Pipeline stages are carved in one place, ``model_parallel.pipeline``, from
    the same layers under the same global names, so the weights agree.
    """

    def __init__(
        self,
        args: ModelArgs,
        *,
        groups: ProcessGroups | None = None,
        sequence_parallel: bool = False,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        groups = groups or ProcessGroups.single()
        self.args = args
        self.tp_group = groups.tp_group
        self.sequence_parallel = sequence_parallel and groups.tp_size > 1
        self.activation_checkpointing = activation_checkpointing
        self.compiled_loss = False  # set by compile_model
        self.padded_vocab_size = padded_vocab_size(args.vocab_size, groups.tp_size)
        sp, tp_group = self.sequence_parallel, self.tp_group

        self.tok_embeddings = VocabParallelEmbedding(
            self.padded_vocab_size,
            args.dim,
            tp_group=tp_group,
            vocab_size=args.vocab_size,
            sequence_parallel=sp,
        )
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerBlock(args, tp_group=tp_group, sequence_parallel=sp)
                for i in range(args.n_layers)
            }
        )
        self.norm = RMSNorm(args.dim, args.norm_eps, tp_group=tp_group, sequence_parallel=sp)
        self.output = ColumnParallelLinear(
            args.dim,
            self.padded_vocab_size,
            tp_group=tp_group,
            sequence_parallel=sp,
            full_out_features=args.vocab_size,
        )
        self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Fill every parameter from its full tensor, drawn from (seed, name)."""
        init_parameters(self, self.args, seed=seed, tp_group=self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x)
        for layer in self.layers.values():
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return self.output(self.norm(h))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token cross entropy ``(B, S)`` from this rank's logits shard."""
        return vocab_parallel_cross_entropy(
            logits,
            target,
            tp_group=self.tp_group,
            vocab_size=self.args.vocab_size,
            compiled=self.compiled_loss,
        )

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full logits ``(B, S, V)`` from this rank's shard (a tp collective)."""
        return gather_from_tp_region(logits, self.tp_group)[..., : self.args.vocab_size]

    def full_state_dict(self, *, grads: bool = False) -> dict[str, torch.Tensor]:
        """This stage's parameters (or gradients) as full, unpadded tensors; a tp collective."""
        out = {}
        for name, param in self.named_parameters():
            value = param.grad if grads else param
            if value is None:
                continue
            out[name] = gather_full(with_shard_attrs(value.detach(), param), self.tp_group)
        return out

    def load_full_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        """Load this rank's shards from full tensors keyed by Meta's names."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        if strict and missing:
            raise KeyError(f"missing from the state dict: {missing[:5]}")
        for name, param in own.items():
            if name in state:
                load_shard_(
                    param,
                    state[name].to(param.dtype),
                    tp_rank=group_rank(self.tp_group),
                    tp_size=group_size(self.tp_group),
                )


def with_shard_attrs(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a gradient, a copy) marked as cut from its full tensor as ``param`` is."""
    for attr in ("tensor_model_parallel", "partition_dim", "full_size", "replicas"):
        if hasattr(param, attr):
            setattr(tensor, attr, getattr(param, attr))
    return tensor
