"""Layout resolution: the cross-section rules, checked before anything starts.

``resolve_plan`` is a pure function of the config. It runs every section's own
``validate()`` first, then the rules that span sections (heads and FFN width
divisible by tp, layers over pp, world size = tp * pp * dp, batch over
micro-batches and dp, ...), and returns a frozen ``Plan`` with every derived
number. A bad layout raises ``ValueError`` with one line that names the field,
its value and the rule, printing every factor involved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model_parallel.args import VOCAB_MULTIPLE, ModelArgs, padded_vocab_size
from model_parallel.layout import Layout
from orchestrator.config.schema import (
    ClusterConfig,
    Config,
    ParallelConfig,
)
from orchestrator.planning import perf, search
from orchestrator.planning.precision import Precision
from orchestrator.planning.search import Candidate


@dataclass(frozen=True)
class Plan:
    """Everything derived from the layout. Layer indices are global and inclusive."""

    world_size: int
    nodes: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    global_batch_size: int
    num_micro_batches: int  # per optimiser step, per dp rank
    seq_len: int  # tokens per training sequence
    padded_vocab_size: int
    stage_layers: tuple[tuple[int, int], ...]  # (first, last) layer of each pp stage
    num_params: int  # unpadded model, as ModelArgs.num_params()
    num_padded_params: int  # with the embedding and output padded to padded_vocab_size
    stage_params_per_rank: tuple[int, ...]  # parameters held by one tp rank of each stage
    sequence_parallel: bool  # activations split over tp between the tp regions (tp > 1 only)
    activation_checkpointing: bool  # every block recomputed in backward ("full")
    precision: Precision
    parallel: ParallelConfig  # the concrete layout (parallel.auto: the chosen one)
    # parallel.auto: every layout considered, best first (the first is this plan's).
    candidates: tuple[Candidate, ...] = field(default=(), compare=False, repr=False)

    @property
    def grad_accumulation_steps(self) -> int:
        return self.num_micro_batches


def resolve_plan(cfg: Config) -> Plan:
    """Check the whole config and derive the layout; raises ``ValueError`` (one line).

    With ``parallel.auto`` the plan is the best layout's (``search_layouts``).
    """
    if cfg.parallel.auto:
        cfg.validate()
        candidates = search_layouts(cfg)
        best = candidates[0].plan
        assert isinstance(best, Plan)
        return dataclasses.replace(best, candidates=candidates)
    return _resolve_fixed(cfg)


def _resolve_fixed(cfg: Config) -> Plan:
    cfg.validate()
    par = cfg.parallel
    args = cfg.model.to_args()
    _check_tensor_parallel(cfg, args)
    seq_len = _check_training(cfg, args)
    stage_layers = _split_layers(args.n_layers, par)
    world_size, dp, nodes = _resolve_world(par, cfg.cluster)
    _check_fault_rank(cfg, world_size, dp)
    num_micro_batches = _num_micro_batches(cfg.train.global_batch_size, par, dp)
    vocab = padded_vocab_size(args.vocab_size, par.tp)  # the model pads by the same rule
    return Plan(
        world_size=world_size,
        nodes=nodes,
        tp=par.tp,
        pp=par.pp,
        dp=dp,
        zero_stage=par.zero_stage,
        micro_batch_size=par.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        num_micro_batches=num_micro_batches,
        seq_len=seq_len,
        padded_vocab_size=vocab,
        stage_layers=stage_layers,
        num_params=args.num_params(),
        num_padded_params=args.num_params() + 2 * (vocab - args.vocab_size) * args.dim,
        stage_params_per_rank=_stage_params_per_rank(args, vocab, par.tp, stage_layers),
        sequence_parallel=par.sequence_parallel and par.tp > 1,
        activation_checkpointing=par.activation_checkpointing == "full",
        precision=Precision(cfg.train.precision),
        parallel=par,
    )


def validate_config(cfg: Config) -> Plan:
    """The entry point's one check of a whole config; returns the resolved plan.

    Every section's own ``validate()`` runs first (inside ``resolve_plan``, so
    the cross-section arithmetic can assume positive sizes), then the rules
    that span sections. ``cfg`` is not changed: ``with_layout`` gives the
    config a run directory records (with ``parallel.auto``, the chosen layout).
    """
    return resolve_plan(cfg)


def with_layout(cfg: Config, plan: Plan) -> Config:
    """``cfg`` with the plan's concrete layout (itself when the layout was given)."""
    if cfg.parallel == plan.parallel:
        return cfg
    return dataclasses.replace(cfg, parallel=plan.parallel)


def _check_tensor_parallel(cfg: Config, args: ModelArgs) -> None:
    tp = cfg.parallel.tp
    if args.n_heads % tp != 0:
        raise ValueError(f"parallel.tp={tp}: model.n_heads({args.n_heads}) must be divisible by tp")
    if args.hidden_dim % tp != 0:
        raise ValueError(
            f"parallel.tp={tp}: FFN hidden width({args.hidden_dim}) = ffn_hidden_dim("
            f"model.dim({args.dim}), model.multiple_of({args.multiple_of})) "
            "must be divisible by tp"
        )
    gpus = cfg.cluster.gpus_per_node
    if gpus > 0 and gpus % tp != 0:
        raise ValueError(
            f"parallel.tp={tp}: cluster.gpus_per_node({gpus}) must be divisible by tp "
            "(a tensor-parallel group must stay inside one node)"
        )
    if cfg.parallel.sequence_parallel and args.max_seq_len % tp != 0:
        raise ValueError(
            f"parallel.sequence_parallel=true: model.max_seq_len({args.max_seq_len}) "
            f"must be divisible by tp({tp})"
        )


def _check_training(cfg: Config, args: ModelArgs) -> int:
    """Rules between train, model and parallel; returns the training sequence length."""
    seq_len = cfg.train.seq_len or args.max_seq_len
    if seq_len > args.max_seq_len:
        raise ValueError(
            f"train.seq_len={seq_len}: must be <= model.max_seq_len({args.max_seq_len})"
        )
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and seq_len % tp != 0:
        raise ValueError(
            f"parallel.sequence_parallel=true: train.seq_len({seq_len}) must be divisible by tp({tp})"
        )
    Precision(cfg.train.precision).check_zero_stage(cfg.parallel.zero_stage)
    return seq_len


def _check_fault_rank(cfg: Config, world_size: int, dp: int) -> None:
    """faults.inject_rank must be a rank that computes a loss: any rank, or the last stage's."""
    rank = cfg.faults.inject_rank
    if rank is None:
        return
    par = cfg.parallel
    # the last pipeline stage's ranks are first..world-1
    first = Layout(tp=par.tp, pp=par.pp, dp=dp).rank(tp_rank=0, dp_rank=0, pp_rank=par.pp - 1)
    if not first <= rank < world_size:
        where = "the last pipeline stage, where the loss is computed" if par.pp > 1 else "the job"
        raise ValueError(
            f"faults.inject_rank={rank}: must be a rank of {where} ({first}..{world_size - 1})"
        )


def _split_layers(n_layers: int, par: ParallelConfig) -> tuple[tuple[int, int], ...]:
    """(first, last) global layer index of each pipeline stage."""
    if par.pipeline_split is None:
        if n_layers % par.pp != 0:
            raise ValueError(
                f"parallel.pp={par.pp}: model.n_layers({n_layers}) must be divisible by pp "
                "(or set parallel.pipeline_split)"
            )
        counts = [n_layers // par.pp] * par.pp
    else:
        counts = list(par.pipeline_split)
        if sum(counts) != n_layers:
            raise ValueError(
                f"parallel.pipeline_split={counts}: sums to {sum(counts)} "
                f"!= model.n_layers({n_layers})"
            )
    stages = []
    first = 0
    for count in counts:
        stages.append((first, first + count - 1))
        first += count
    return tuple(stages)


def _resolve_world(par: ParallelConfig, cluster: ClusterConfig) -> tuple[int, int, int]:
    """(world_size, dp, nodes). dp == -1 is derived from the cluster when nodes is set."""
    model_parallel = par.tp * par.pp
    gpus = cluster.gpus_per_node
    if gpus == 0 and cluster.nodes not in (None, 1):  # CPU workers: this one machine
        raise ValueError(
            f"cluster.nodes={cluster.nodes}: a CPU cluster (gpus_per_node=0) "
            "runs on one node; set nodes to null or 1"
        )
    if cluster.nodes is None or gpus == 0:
        dp = 1 if par.dp == -1 else par.dp
        world_size = model_parallel * dp
        per_node = gpus or cluster.tasks_per_node or world_size  # CPU: tasks_per_node ranks each
        nodes = -(-world_size // per_node)
        return world_size, dp, nodes
    world_size = cluster.nodes * gpus
    world = (
        f"world_size({world_size}) = cluster.nodes({cluster.nodes}) * cluster.gpus_per_node({gpus})"
    )
    if par.dp == -1:
        if world_size % model_parallel != 0:
            raise ValueError(
                f"parallel.dp=-1: {world} is not divisible by "
                f"tp({par.tp}) * pp({par.pp}) = {model_parallel}"
            )
        return world_size, world_size // model_parallel, cluster.nodes
    if model_parallel * par.dp != world_size:
        raise ValueError(
            f"parallel: tp({par.tp}) * pp({par.pp}) * dp({par.dp}) = "
            f"{model_parallel * par.dp} != {world}"
        )
    return world_size, par.dp, cluster.nodes


def _num_micro_batches(global_batch_size: int, par: ParallelConfig, dp: int) -> int:
    per_micro_step = par.micro_batch_size * dp
    if global_batch_size % per_micro_step != 0:
        raise ValueError(
            f"train.global_batch_size={global_batch_size}: must be divisible by "
            f"parallel.micro_batch_size({par.micro_batch_size}) * dp({dp}) = {per_micro_step}"
        )
    num_micro_batches = global_batch_size // per_micro_step
    if par.pp > 1 and num_micro_batches < par.pp:
        raise ValueError(
            f"train.global_batch_size={global_batch_size}: gives {num_micro_batches} "
            f"micro-batches = global_batch_size({global_batch_size}) / (micro_batch_size"
            f"({par.micro_batch_size}) * dp({dp})), fewer than pp({par.pp}); "
            "the 1F1B schedule needs at least pp"
        )
    return num_micro_batches


def _stage_params_per_rank(
    args: ModelArgs, vocab: int, tp: int, stage_layers: tuple[tuple[int, int], ...]
) -> tuple[int, ...]:
    """Parameters one tp rank holds on each stage.

    Attention (wq, wk, wv, wo) and the SwiGLU MLP (w1, w2, w3) are split over tp;
    wk and wv are ``dim x kv_dim`` (grouped-query attention), and when tp exceeds
    the KV heads each rank holds a whole one (``kv_replicas`` copies over tp).
    The two RMSNorm weights per layer and the final norm are replicated. The
    embedding sits on the first stage and the final norm and output on the last.
    """
    dim = args.dim
    kv = 2 * dim * args.kv_dim * args.kv_replicas(tp)
    per_layer = (2 * dim * dim + kv + 3 * dim * args.hidden_dim) // tp + 2 * dim
    vocab_shard = vocab * dim // tp
    params = []
    for stage, (first, last) in enumerate(stage_layers):
        n = (last - first + 1) * per_layer
        if stage == 0:
            n += vocab_shard
        if stage == len(stage_layers) - 1:
            n += dim + vocab_shard
        params.append(n)
    return tuple(params)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_plan(plan: Plan, cfg: Config, *, estimate: bool = True) -> str:
    """A human-readable, greppable summary: one ``key: value`` per line.

    ``estimate``: with the memory and time estimate (``perf``) at the end.
    """
    m, c = cfg.model, cfg.cluster
    args = m.to_args()
    noun = "node" if plan.nodes == 1 else "nodes"
    if c.gpus_per_node == 0:
        nodes = f"{plan.nodes} {noun}, {plan.world_size} CPU worker processes"
    else:
        nodes = f"{plan.nodes} {noun} x {c.gpus_per_node} GPUs ({c.device})"
    lines = [
        f"model: {m.name}, {_billions(plan.num_params)} params (dim {m.dim}, "
        f"{m.n_layers} layers, {m.n_heads} heads, ffn {args.hidden_dim}, seq {m.max_seq_len})",
        f"cluster: {c.name}, {nodes}",
        f"world size: {plan.world_size} = tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp})",
        f"zero stage: {plan.zero_stage}",
        f"batch: global {plan.global_batch_size} sequences = micro {plan.micro_batch_size} "
        f"* dp {plan.dp} * {plan.num_micro_batches} micro-batches",
        f"grad accumulation steps: {plan.grad_accumulation_steps}",
        f"vocab: {m.vocab_size} -> padded {plan.padded_vocab_size} "
        f"(multiple of {VOCAB_MULTIPLE}*tp = {VOCAB_MULTIPLE * plan.tp})",
    ]
    for stage, ((first, last), params) in enumerate(
        zip(plan.stage_layers, plan.stage_params_per_rank, strict=True)
    ):
        lines.append(
            f"stage {stage}: layers {first}-{last} ({last - first + 1}), "
            f"{params:,} params per rank ({_billions(params)})"
        )
    lines.append(
        f"total params: {plan.num_params:,} ({_billions(plan.num_params)}; "
        f"{plan.num_padded_params:,} with padded vocab)"
    )
    if plan.candidates:
        lines += search.format_candidates(plan.candidates)
    if estimate:
        # parallel.auto estimated the chosen layout while searching
        chosen = (
            plan.candidates[0].estimate
            if plan.candidates
            else perf.estimate(plan, cfg.model, cfg.cluster)
        )
        lines += perf.format_estimate(chosen, cfg.cluster)
    return "\n".join(lines)


def search_layouts(cfg: Config) -> tuple[Candidate, ...]:
    """``parallel.auto``'s layouts of ``cfg``, best first (``orchestrator.planning.search``)."""
    return search.search_layouts(cfg, resolve=_resolve_fixed)
