"""The checked-in sbatch scripts (``slurm/llama*.sh``): their configs and their rendering.

``python -m orchestrator.launch.slurm render-checked-in [--check]`` rewrites
them (or reports the stale ones); ``tests/test_slurm_render.py`` fails when one
is stale.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.launch.run_folder import write_atomic
from orchestrator.launch.slurm.job import compose
from orchestrator.launch.slurm.render import SLURM_DIR, render_sbatch
from orchestrator.planning.plan import validate_config, with_layout

# The data of the checked-in scripts, relative to the repository root (pass
# data.root=... data.tokenizer=... to sbatch instead): the LLaMA mixture, tokenized
# with Meta's SentencePiece model, or for Llama 3 with its Hugging Face tokenizer.json.
_LLAMA_DATA = (
    "data=llama_mixture",
    "data.root=data/redpajama",
    "data.tokenizer=data/llama/tokenizer.model",
)
_LLAMA3_DATA = (
    "data=llama_mixture",
    "data.root=data/redpajama_llama3",
    "data.tokenizer=data/llama3/tokenizer.json",
)
# The checked-in scripts: name -> config overrides.
CHECKED_IN: dict[str, tuple[str, ...]] = {
    # 7B: tp2, ZeRO-2 over dp 64: 128 GPUs, 16 nodes.
    "llama7b": (
        "model=7b",
        "cluster=a100_80g",
        "parallel=tp2pp1",
        "parallel.dp=64",
        "parallel.zero_stage=2",
        "parallel.activation_checkpointing=full",
        *_LLAMA_DATA,
    ),
    # 13B: tp4 x pp2, dp 32: 256 GPUs, 32 nodes.
    "llama13b": (
        "model=13b",
        "cluster=a100_80g",
        "parallel=tp4pp2",
        "parallel.dp=32",
        "parallel.activation_checkpointing=full",
        *_LLAMA_DATA,
    ),
    # 33B (52 heads: tp <= 4): tp4 x pp2, dp 128: 1024 GPUs, 128 nodes.
    "llama33b": (
        "model=33b",
        "cluster=a100_80g",
        "parallel=tp4pp2",
        "parallel.dp=128",
        "parallel.activation_checkpointing=full",
        *_LLAMA_DATA,
    ),
    # 65B at the paper's scale: tp8 x pp4, dp 64: 2048 GPUs, 256 nodes.
    "llama65b": (
        "model=65b",
        "cluster=a100_80g",
        "parallel=tp8pp4",
        "parallel.dp=64",
        *_LLAMA_DATA,
    ),
    # Llama-2-70B on A100-80GB (Meta's RSC ran it on A100-80GB): tp8 x pp4 x dp64 =
    # 2048 GPUs, 256 nodes; sequence parallelism keeps 1F1B's in-flight activations at
    # 24 GiB without recomputation (43.5 GiB per GPU planned).
    "llama2_70b": (
        "model=llama2_70b",
        "cluster=a100_80g",
        "parallel=tp8pp4",
        "parallel.dp=64",
        "parallel.sequence_parallel=true",
        "parallel.activation_checkpointing=none",
        *_LLAMA_DATA,
    ),
    # Llama-3.1-405B's initial stage (4M tokens: 1024 x 4096) on H100 SXM: Meta's tp8 x
    # pp16 with one layer fewer on the first and last stages (the paper's 3.3.2), dp 16:
    # 2048 GPUs, 256 nodes. Without recomputation stage 1 would hold 98.6 GiB.
    "llama3_405b": (
        "model=llama3_405b",
        "cluster=h100_sxm",
        "parallel=tp8pp8",
        "parallel.pp=16",
        "parallel.dp=16",
        "parallel.pipeline_split=[7,8,8,8,8,8,8,8,8,8,8,8,8,8,8,7]",
        "parallel.sequence_parallel=true",
        "parallel.activation_checkpointing=full",
        *_LLAMA3_DATA,
    ),
}


def render_checked_in(name: str) -> str:
    """``slurm/<name>.sh``: run from the submit directory, writing its own run directory."""
    overrides = CHECKED_IN[name]
    composed = compose(overrides)
    tokenizer = Path(composed.data.tokenizer or "tok.model").name
    config = dataclasses.replace(composed, slurm=dataclasses.replace(composed.slurm, job_name=name))
    plan = validate_config(config)
    config = with_layout(config, plan)
    notes = (
        "",
        f"Submit from the repository root:  sbatch slurm/{name}.sh [OVERRIDE ...]",
        f"  e.g. sbatch slurm/{name}.sh data.root=/data/redpajama data.tokenizer=/data/{tokenizer}",
        "  (overrides apply when the run directory is new; a requeued job reuses its config).",
        "Partition and account: sbatch -p NAME -A ACCOUNT ..., or SBATCH_PARTITION and",
        "  SBATCH_ACCOUNT in the environment: both take precedence over the #SBATCH lines.",
        f"Run directory: runs/{name} (logs/rank_N.log, checkpoints/); sbatch's own output:",
        "  slurm/logs/<job name>-<job id>.out. Python: python3 on PATH (sbatch passes PATH).",
        "Regenerate: python -m orchestrator.launch.slurm render-checked-in",
    )
    return render_sbatch(
        config, plan, f"runs/{name}", log_dir="slurm/logs", overrides=overrides, notes=notes
    )


def render_all(*, check: bool) -> int:
    """Rewrite the stale checked-in scripts (``check``: only name them); 1 if any is stale."""
    stale = []
    for name in CHECKED_IN:
        path = SLURM_DIR / f"{name}.sh"
        text = render_checked_in(name)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not check:
            write_atomic(path, text)
    verb = "stale" if check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "all checked-in scripts are current")
    return 1 if check and stale else 0
