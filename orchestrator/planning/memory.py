"""The memory model: bytes per device of a layout's model state and activations.

Pure arithmetic on the model and the resolved plan; nothing is allocated.
Notation (as ``orchestrator.planning.perf``): b micro-batch size, s sequence
length, h = ``dim``, f the SwiGLU width, t = tp, p = pp, m micro-batches per
step, e bytes per activation and weight element (2 in bf16/fp16, 4 in fp32),
Psi' the parameters one device holds on its stage
(``Plan.stage_params_per_rank``).

**Model state** follows what DeepSpeed 0.19 allocates for our config
(checked storage by storage against real CPU engines for ZeRO 0-3, fp32 and
bf16, and tp/pp/dp layouts in ``tests/test_perf.py``; fp16 is GPU-only and
unmeasured):

- fp32: ZeRO-0 is the plain optimiser, 4 + 4 + 8 (weights, gradients, two
  Adam moments). ZeRO-1/2/3 also keep an fp32 master copy of their partition,
  so 4 + 4 + 12 split as below.
- bf16/fp16: 2 (weights) + 2 (gradients) + 12 (fp32 master, two moments),
  except that our JSON asks for fp32 gradient accumulation in bf16: at
  ZeRO-1 DeepSpeed's ``BF16_Optimizer`` holds each bf16 ``.grad`` and the
  whole flat groups' gradients in fp32 (2 + 4), at ZeRO-2/3 the gradient
  partition is fp32 (4/dp).
- split over dp: ZeRO-1 the optimiser state, ZeRO-2 also the gradients,
  ZeRO-3 also the weights. ZeRO-1/2 flatten each parameter group (matrices
  with weight decay, norms without) and pad it to a multiple of 2·dp
  elements. ZeRO-1 in fp32 keeps each parameter's whole ``.grad``; ZeRO-2
  keeps the gradients of every parameter its partition overlaps (whole, so
  ranks differ). ZeRO-3 cuts each parameter into dp pieces (padded to a
  multiple of dp) and also keeps parameters of up to 100k elements whole
  (``zero_state_bytes``).

**Activations** per layer per micro-batch, what autograd saves in this
implementation (``model_parallel.llama``; checked tensor by tensor in
``tests/test_perf.py``), in units of s·b·h bytes:

- two RMSNorms, each its fp32 copy of x (4) and x/rms before the weight (e):
  2·(4 + e), /t with sequence parallelism;
- the inputs of the q/k/v and w1/w3 projections (x/rms times the weight):
  2·e (with sequence parallelism these are the all-gathered copies, held full);
- q, k, v after rotary and the attention output, which is also wo's input
  (SDPA's flash kernels keep no s x s scores): 4·e/t; with grouped-query
  attention K and V are saved at their own width (not expanded to the query
  heads, ``model_parallel.attention``): 2·e/t + 2·e·w/h, w = one rank's
  K width (``kv_width_per_rank``: n_kv_heads·head_dim/t, one head when t
  exceeds n_kv_heads);
- SwiGLU: w1 x, w3 x, silu(w1 x) and the product that feeds w2: 4·e·f/(h·t);
- per token, not per h: RMSNorm's two 1/rms (2·4, /t with sequence
  parallelism) and attention's logsumexp (4·heads/t).

With ``model.compile=true`` inductor's partitioner recomputes the cheap
elementwise work in backward and saves less (checked tensor by tensor on
compiled blocks at tp 1 and 2, with and without sequence parallelism, in
``tests/test_perf.py``, and within 3% of the peak that one
H200 measured, ``bench/RESULTS.md``):

- the two RMSNorms' inputs, x and x + attention (2·e), and their 1/rms (2·4
  per token), /t with sequence parallelism; no fp32 copies;
- the inputs of the q/k/v and w1/w3 projections: 2·e, as above;
- q, k, v and the attention output: 4·e/t (2·e/t + 2·e·w/h with grouped KV);
- SwiGLU: w1 x, w3 x and the product that feeds w2: 3·e·f/(h·t);
- attention's logsumexp (4·heads/t per token).

No dropout, so no masks. Full activation checkpointing keeps only each
layer's input (e, /t with sequence parallelism) plus one layer's activations
while it is recomputed. Under 1F1B stage i holds min(p - i, m) micro-batches
in flight. The last stage adds the final norm and the logits: (e + 4 + 4)·s·b·V/t
(the logits, the fp32 working copy of the loss, the fp32 softmax it saves);
compiled, 2·e·s·b·V/t + 4·s·b (the logits the compiled loss saves, their
gradient, which exists before they are freed, and one logsumexp per token).
A framework allowance (``cluster.memory_overhead_gb``) covers what is not
itemised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model_parallel.args import ModelArgs
from orchestrator.config.cluster import ClusterConfig
from orchestrator.config.model import ModelConfig
from orchestrator.planning.plan_view import PlanView
from orchestrator.planning.precision import Precision

GIB = 2**30
ZERO_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: partitions start 4-byte aligned
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold (DeepSpeed's default)


@dataclass(frozen=True)
class ModelState:
    """Bytes of weights, gradients and optimiser state (fp32 master + moments) on one device."""

    params: int
    grads: int
    optimizer: int


def _aligned(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def zero_state_bytes(
    groups: Sequence[Sequence[int]],
    *,
    zero_stage: int,
    dp: int,
    precision: str,
    dp_rank: int | None = None,
) -> ModelState:
    """DeepSpeed's model state on one dp rank, padding included.

    Only ZeRO-2's gradient buffer differs between dp ranks; ``dp_rank=None``
    gives the fullest rank's.

    ``groups``: the optimiser's parameter groups, each a list of parameter
    sizes (elements) in module order, as this rank's module holds them.
    """
    policy = Precision(precision)
    e = policy.weight_bytes
    bf16 = policy.accumulates_in_fp32  # our DeepSpeed JSON accumulates bf16 gradients in fp32
    n = sum(sum(g) for g in groups)
    if zero_stage == 0:  # the plain optimiser: fp32 is its own master copy
        return ModelState(n * e, n * e, n * policy.optimizer_bytes)
    if zero_stage in (1, 2):
        flat = [_aligned(sum(g), ZERO_ALIGNMENT * dp) for g in groups]
        part = sum(f // dp for f in flat)
        if zero_stage == 2 and bf16:  # its fp32 accumulation buffer: the partition
            grads = part * 4
        elif zero_stage == 2:  # a buffer for the gradients of the parameters its partition touches
            touched = [_touching(g, f // dp, dp) for g, f in zip(groups, flat, strict=True)]
            grads = e * (
                sum(t[dp_rank] for t in touched)
                if dp_rank is not None
                else max(sum(t[r] for t in touched) for r in range(dp))
            )
        elif bf16:  # BF16_Optimizer: each .grad in bf16 and the whole flat groups in fp32
            grads = n * e + sum(flat) * 4
        else:  # each parameter's own .grad
            grads = n * e
        return ModelState(sum(flat) * e, grads, part * 12)
    # ZeRO-3: every parameter is cut on its own into dp pieces (padded to a
    # multiple of dp); parameters up to the persistence threshold are also
    # kept whole between uses.
    part = sum(-(-size // dp) for g in groups for size in g)
    persistent = sum(size for g in groups for size in g if size <= ZERO3_PERSISTENCE_THRESHOLD)
    return ModelState((part + persistent) * e, part * (4 if bf16 else e), part * 12)


def _touching(sizes: Sequence[int], partition: int, dp: int) -> list[int]:
    """Per dp rank: elements of the parameters that overlap its partition of a flat group."""
    per_rank = [0] * dp
    offset = 0
    for size in sizes:
        for rank in range(offset // partition, (offset + size - 1) // partition + 1):
            per_rank[rank] += size
        offset += size
    return per_rank


def stage_param_groups(
    args: ModelArgs, vocab: int, tp: int, stage: int, stage_layers: Sequence[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """(matrices, norm weights): sizes of one tp rank's parameters on ``stage``, in module order.

    The same split as ``orchestrator.runtime.engine.param_groups`` (decay on matrices).
    """
    d, f = args.dim, args.hidden_dim
    kv = kv_width_per_rank(args, tp)
    first, last = stage_layers[stage]
    matrices: list[int] = [vocab * d // tp] if stage == 0 else []
    norms: list[int] = []
    for _ in range(first, last + 1):
        matrices += [d * d // tp, d * kv, d * kv, d * d // tp] + [d * f // tp] * 3
        norms += [d, d]
    if stage == len(stage_layers) - 1:
        norms.append(d)
        matrices.append(vocab * d // tp)
    return matrices, norms


def kv_width_per_rank(args: ModelArgs, tp: int) -> int:
    """Output width of one tp rank's K (or V) projection: its KV heads x head_dim
    (one head, replicated, when tp exceeds ``n_kv_heads``)."""
    return args.kv_dim * args.kv_replicas(tp) // tp


def layer_activation_bytes(
    args: ModelArgs,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    sp: bool,
    e: int,
    compiled: bool = False,
) -> float:
    """Bytes one layer saves for backward per micro-batch (module docstring);
    ``compiled``: what a ``torch.compile``d block saves instead."""
    sb = micro_batch * seq_len
    split = tp if sp else 1
    ffn = args.hidden_dim / args.dim
    attention = 2 * e / tp + 2 * e * kv_width_per_rank(args, tp) / args.dim  # q, out; k, v
    if compiled:
        norms = 2 * e / split  # the norms' inputs
        sharded = attention + 3 * e * ffn / tp
    else:
        norms = (2 * 4 + 2 * e) / split  # the fp32 copies and the normalised x before the weight
        sharded = attention + 4 * e * ffn / tp
    linear_inputs = 2 * e  # (with sequence parallelism the all-gathered copies)
    per_token = 2 * 4 / split + 4 * args.n_heads / tp  # RMSNorm's 1/rms, attention's logsumexp
    return sb * args.dim * (norms + linear_inputs + sharded) + sb * per_token


def logits_bytes(
    args: ModelArgs,
    vocab: int,
    *,
    micro_batch: int,
    seq_len: int,
    tp: int,
    e: int,
    compiled: bool = False,
) -> float:
    """The last stage's output: logits, the loss's fp32 working copy and its saved
    softmax; ``compiled``: the logits, their gradient and one logsumexp per token."""
    sb = micro_batch * seq_len
    if compiled:
        return sb * vocab / tp * 2 * e + sb * 4
    return sb * vocab / tp * (e + 4 + 4)


@dataclass(frozen=True)
class StageMemory:
    """One device's memory on one pipeline stage, in bytes."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    def items(self) -> tuple[tuple[str, float], ...]:
        return (
            ("parameters", self.params),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
            ("framework allowance", self.overhead),
        )

    @property
    def total(self) -> float:
        return sum(value for _, value in self.items())

    @property
    def largest(self) -> str:
        return max(self.items(), key=lambda item: item[1])[0]


def rank_model_state(
    plan: PlanView, model: ModelConfig, *, stage: int, dp_rank: int | None = None
) -> ModelState:
    """Model state of one device of ``stage`` (``dp_rank=None``: the fullest dp rank)."""
    args = model.to_args()
    groups = stage_param_groups(args, plan.padded_vocab_size, plan.tp, stage, plan.stage_layers)
    precision = plan.precision.name
    return zero_state_bytes(
        groups, zero_stage=plan.zero_stage, dp=plan.dp, precision=precision, dp_rank=dp_rank
    )


def stage_memory(
    plan: PlanView, model: ModelConfig, cluster: ClusterConfig, stage: int
) -> StageMemory:
    """One device of ``stage``: model state for its ZeRO stage, activations in flight."""
    args = model.to_args()
    e = plan.precision.weight_bytes
    state = rank_model_state(plan, model, stage=stage)
    sp = plan.sequence_parallel
    shape = dict(micro_batch=plan.micro_batch_size, seq_len=plan.seq_len, tp=plan.tp)
    compiled = model.compile
    layer = layer_activation_bytes(args, sp=sp, e=e, compiled=compiled, **shape)
    first, last = plan.stage_layers[stage]
    n_layers = last - first + 1
    in_flight = min(plan.pp - stage, plan.num_micro_batches)
    if plan.activation_checkpointing:
        layer_input = plan.micro_batch_size * plan.seq_len * args.dim * e / (plan.tp if sp else 1)
        activations = in_flight * n_layers * layer_input + layer
    else:
        activations = in_flight * n_layers * layer
    logits = 0.0
    if stage == plan.pp - 1:
        logits = logits_bytes(args, plan.padded_vocab_size, e=e, compiled=compiled, **shape)
        logits += plan.micro_batch_size * plan.seq_len * args.dim * (4 + e)  # final norm
    return StageMemory(
        stage=stage,
        params=state.params,
        grads=state.grads,
        optimizer=state.optimizer,
        activations=activations,
        logits=logits,
        overhead=cluster.memory_overhead_gb * GIB,
    )
