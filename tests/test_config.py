"""The config schema and the conf/ tree: strictness, section rules, the LLaMA sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from model_parallel.args import ModelArgs
from orchestrator.config.compose import compose_config
from orchestrator.config.schema import (
    ClusterConfig,
    Config,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load(*overrides: str) -> Config:
    return compose_config(overrides, conf_dir=CONF_DIR)


def test_default_config_is_typed_and_valid() -> None:
    cfg = load()
    assert isinstance(cfg, Config)
    assert isinstance(cfg.model, ModelConfig) and cfg.model.name == "tiny"
    assert isinstance(cfg.parallel, ParallelConfig) and cfg.parallel.name == "tp2pp2"
    assert isinstance(cfg.cluster, ClusterConfig) and cfg.cluster.name == "local"
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.dry_run is False and cfg.launcher == "auto"
    assert cfg.cluster.gpus_per_node == 0 and cfg.cluster.nodes is None
    cfg.validate()


# dim, n_heads, n_layers, FFN width, peak lr, steps (tokens / 4M)
LLAMA = {
    "7b": (4096, 32, 32, 11008, 3.0e-4, 238419),
    "13b": (5120, 40, 40, 13824, 3.0e-4, 238419),
    "33b": (6656, 52, 60, 17920, 1.5e-4, 333786),
    "65b": (8192, 64, 80, 22016, 1.5e-4, 333786),
}


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_llama_sizes_match_the_paper(name: str) -> None:
    dim, n_heads, n_layers, hidden, lr, steps = LLAMA[name]
    cfg = load(f"model={name}")
    m, t = cfg.model, cfg.train
    assert (m.name, m.dim, m.n_heads, m.n_layers) == (name, dim, n_heads, n_layers)
    assert (m.vocab_size, m.multiple_of, m.norm_eps, m.max_seq_len) == (32000, 256, 1e-6, 2048)
    assert m.ffn_dim_multiplier is None
    args = m.to_args()
    assert isinstance(args, ModelArgs)
    assert args.hidden_dim == hidden
    assert args.head_dim == 128
    assert t.lr == lr
    assert t.global_batch_size * m.max_seq_len == 2048 * 2048  # 4M tokens per step
    assert t.warmup_steps == 2000
    assert t.steps == steps
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip, t.min_lr_ratio) == (
        0.9,
        0.95,
        0.1,
        1.0,
        0.1,
    )


def test_tiny_model() -> None:
    m = load().model
    assert (m.dim, m.n_layers, m.n_heads, m.vocab_size, m.multiple_of, m.max_seq_len) == (
        128,
        4,
        8,
        2000,
        64,
        128,
    )


@pytest.mark.parametrize(
    "layout", ["tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2", "tp4pp2", "tp8pp1", "tp8pp4", "tp8pp8"]
)
def test_parallel_layouts(layout: str) -> None:
    p = load(f"parallel={layout}").parallel
    assert p.name == layout
    assert f"tp{p.tp}pp{p.pp}" == layout
    assert p.dp == -1 and p.zero_stage == 1


def test_a100_clusters() -> None:
    for name, memory in (("a100_80g", 80), ("a100_40g", 40)):
        c = load(f"cluster={name}").cluster
        assert (c.gpus_per_node, c.device_memory_gb, c.peak_tflops) == (8, memory, 312)
        assert c.partition == "gpu" and c.account is None and c.exclusive is True
        assert c.time_limit == "2-00:00:00"
        assert "NCCL_IB_HCA" in c.nccl_env
        c.validate()


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException):
        load("parallel.tpp=2")


def test_added_key_is_an_error() -> None:
    # Hydra's + lifts the struct flag; the entry point must still refuse it.
    with pytest.raises(ValueError, match=r"^parallel\.foo: unknown key"):
        load("+parallel.foo=1")


def test_added_env_var_is_allowed() -> None:
    assert load("+cluster.nccl_env.NCCL_DEBUG=INFO").cluster.nccl_env == {"NCCL_DEBUG": "INFO"}


def test_wrong_type_is_an_error() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        load("parallel.tp=abc")
    assert isinstance(info.value.__cause__, ValidationError)


def test_overrides_are_typed() -> None:
    cfg = load("parallel.pipeline_split=[1,3]", "parallel.pp=2", "cluster.nodes=2")
    assert cfg.parallel.pipeline_split == [1, 3]
    assert cfg.cluster.nodes == 2


def _model(**changes: object) -> ModelConfig:
    fields = dict(name="m", dim=64, n_layers=2, n_heads=4) | changes
    return ModelConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (_model(dim=0), "model.dim=0: must be a positive integer"),
        (_model(n_heads=-1), "model.n_heads=-1: must be a positive integer"),
        (_model(n_layers=0), "model.n_layers=0: must be a positive integer"),
        (_model(vocab_size=0), "model.vocab_size=0: must be a positive integer"),
        (_model(norm_eps=0.0), "model.norm_eps=0.0: must be > 0"),
        (_model(dim=65), "model.dim=65: must be divisible by model.n_heads(4)"),
        (_model(dim=12, n_heads=4), "model.dim=12: head_dim = dim / n_heads(4) = 3 must be even"),
        (ParallelConfig(name="p", tp=0), "parallel.tp=0: must be a positive integer"),
        (ParallelConfig(name="p", pp=-2), "parallel.pp=-2: must be a positive integer"),
        (ParallelConfig(name="p", dp=0), "parallel.dp=0: must be a positive integer"),
        (
            ParallelConfig(name="p", micro_batch_size=0),
            "parallel.micro_batch_size=0: must be a positive integer",
        ),
        (ParallelConfig(name="p", zero_stage=4), "parallel.zero_stage=4: must be 0, 1, 2 or 3"),
        (ParallelConfig(name="p", zero_stage=-1), "parallel.zero_stage=-1: must be 0, 1, 2 or 3"),
        (
            ParallelConfig(name="p", zero_stage=2, pp=2),
            "parallel.zero_stage=2: DeepSpeed's pipeline engine supports ZeRO stage <= 1",
        ),
        (
            ParallelConfig(name="p", activation_checkpointing="some"),
            "parallel.activation_checkpointing=some: must be one of none, full",
        ),
        (
            ParallelConfig(name="p", pp=2, pipeline_split=[4]),
            "parallel.pipeline_split=[4]: must have one entry per stage: length 1 != pp(2)",
        ),
        (
            ParallelConfig(name="p", pp=2, pipeline_split=[4, 0]),
            "parallel.pipeline_split=[4, 0]: every stage needs >= 1 layer",
        ),
        (
            ClusterConfig(
                name="c", gpus_per_node=-1, device="x", device_memory_gb=1, peak_tflops=1
            ),
            "cluster.gpus_per_node=-1: must be >= 0",
        ),
        (
            ClusterConfig(
                name="c", nodes=0, gpus_per_node=8, device="x", device_memory_gb=1, peak_tflops=1
            ),
            "cluster.nodes=0: must be a positive integer",
        ),
        (
            ClusterConfig(
                name="c",
                gpus_per_node=8,
                device="x",
                device_memory_gb=1,
                peak_tflops=1,
                time_limit="2 days",
            ),
            "cluster.time_limit=2 days: must be a SLURM time",
        ),
        (
            ClusterConfig(
                name="c",
                gpus_per_node=8,
                device="x",
                device_memory_gb=1,
                peak_tflops=1,
                peak_tflops_fp32=0.0,
            ),
            "cluster.peak_tflops_fp32=0.0: must be > 0",
        ),
        (TrainConfig(steps=0, global_batch_size=8, lr=1e-3), "train.steps=0: must be a positive"),
        (
            TrainConfig(steps=1, global_batch_size=0, lr=1e-3),
            "train.global_batch_size=0: must be a positive integer",
        ),
        (TrainConfig(steps=1, global_batch_size=8, lr=0.0), "train.lr=0.0: must be > 0"),
        (
            TrainConfig(steps=1, global_batch_size=8, lr=1e-3, precision="fp8"),
            "train.precision=fp8: must be one of fp32, bf16, fp16",
        ),
        (
            TrainConfig(steps=1, global_batch_size=8, lr=1e-3, beta2=1.0),
            "train.beta2=1.0: must be in [0, 1)",
        ),
    ],
)
def test_section_rules(
    section: ModelConfig | ParallelConfig | ClusterConfig | TrainConfig, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        section.validate()
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


@pytest.mark.parametrize("time_limit", ["30", "04:00:00", "2-00:00:00", "1-12", "90:00"])
def test_slurm_time_limits(time_limit: str) -> None:
    ClusterConfig(
        name="c",
        gpus_per_node=8,
        device="x",
        device_memory_gb=1,
        peak_tflops=1,
        time_limit=time_limit,
    ).validate()


def test_unknown_launcher() -> None:
    cfg = load()
    cfg.launcher = "kubernetes"
    with pytest.raises(
        ValueError, match=r"^launcher=kubernetes: must be one of auto, local, slurm"
    ):
        cfg.validate()


def test_peak_follows_the_precision() -> None:
    """fp32 runs are measured against the fp32 peak where a cluster states one."""
    a100 = load("cluster=a100_80g").cluster
    assert (a100.peak_for("bf16"), a100.peak_for("fp16"), a100.peak_for("fp32")) == (312, 312, 19.5)
    cfg = load("cluster=a100_80g")
    cfg.cluster.peak_tflops_fp32 = None
    assert cfg.cluster.peak_for("fp32") == 312
    from orchestrator.planning.perf import estimate
    from orchestrator.planning.plan import resolve_plan

    times = {}
    for precision in ("bf16", "fp32"):
        cfg = load(
            "model=7b", "parallel=tp8pp1", "cluster=a100_80g", f"train.precision={precision}"
        )
        est = estimate(resolve_plan(cfg), cfg.model, cfg.cluster)
        times[precision] = est.time.compute
        assert est.peak_tflops == cfg.cluster.peak_for(precision)
    assert times["fp32"] == pytest.approx(times["bf16"] * 312 / 19.5)
