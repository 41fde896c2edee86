"""sbatch scripts: rendering from the config, submission, and the job's own prepare step.

``render_sbatch`` is a pure function of the config, the plan and the run
directory: it fills ``slurm/template.sh``. Every value that comes from the
config reaches the shell through ``shlex.quote``. ``#SBATCH`` lines are not
read by the shell but by sbatch, whose parser takes single and double quotes
and backslash escapes much as the shell does (so ``shlex.quote`` output reads
back as the same word) and ends a line at a newline or an unquoted ``#``.
Values with control characters or backslashes are refused there; ``%`` in a
path is doubled (sbatch's filename patterns). Names (job, partition, account)
must be plain SLURM names.

Command line (run by the scripts themselves, and by hand)::

    python -m orchestrator.launch.slurm prepare RUN_DIR [--ntasks N] -- [OVERRIDE ...]
    python -m orchestrator.launch.slurm render-checked-in [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.compose import compose_config, describe_error
from orchestrator.config.schema import Config, load_config
from orchestrator.data.build import resolve_paths
from orchestrator.launch.run_folder import prepare_run_dir, write_atomic
from orchestrator.planning.ds_config import deepspeed_config
from orchestrator.planning.plan import Plan, validate_config, with_layout
from orchestrator.protocol import EXIT_REQUEUE

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO_ROOT / "slurm"
TEMPLATE = SLURM_DIR / "template.sh"
SCRIPT_NAME = "job.sh"  # the rendered script in a run directory
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f\\]")

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


@dataclass(frozen=True)
class JobShape:
    """What the job asks SLURM for."""

    nodes: int
    ntasks: int
    tasks_per_node: int
    gpus_per_node: int  # 0: CPU tasks, no GPUs requested


def job_shape(config: Config, plan: Plan) -> JobShape:
    """Nodes and tasks for the layout; raises ``ValueError`` when the cluster is too small."""
    cluster = config.cluster
    per_node = cluster.gpus_per_node or cluster.tasks_per_node or plan.world_size
    nodes = -(-plan.world_size // per_node)
    if cluster.nodes is not None and nodes > cluster.nodes:
        unit = "GPUs" if cluster.gpus_per_node else "tasks (cluster.tasks_per_node)"
        raise ValueError(
            f"cluster.nodes={cluster.nodes}: the layout needs {nodes} nodes = world_size"
            f"({plan.world_size}) = tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp}) over "
            f"{per_node} {unit} per node; use a smaller layout or more nodes"
        )
    return JobShape(nodes, plan.world_size, min(per_node, plan.world_size), cluster.gpus_per_node)


def render_sbatch(
    config: Config,
    plan: Plan,
    run_dir: str | os.PathLike[str],
    *,
    python: str = "python3",
    workdir: str | os.PathLike[str] | None = None,
    log_dir: str | None = None,
    overrides: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The sbatch script of this run (pure; raises ``ValueError`` for what SLURM cannot take).

    ``run_dir``: relative paths are taken from ``workdir``, the directory the
    job runs in (None: ``$SLURM_SUBMIT_DIR``, for scripts submitted from the
    repository root). ``log_dir``: sbatch's own output (None: RUN_DIR/logs; it
    must exist at submit time). ``overrides``: config overrides for the job's
    prepare step when it has to write RUN_DIR/config.yaml itself. ``python``:
    the interpreter on the compute nodes.
    """
    shape = job_shape(config, plan)
    cluster = config.cluster
    if cluster.partition_required and not cluster.partition:
        raise ValueError(
            f"cluster.partition={cluster.partition}: cluster {cluster.name} needs a partition; "
            "set cluster.partition=NAME (sinfo lists them)"
        )
    limit_s = time_limit_s(cluster.time_limit)
    if config.slurm.signal_grace_s >= limit_s:
        raise ValueError(
            f"slurm.signal_grace_s={config.slurm.signal_grace_s}: must be shorter than "
            f"cluster.time_limit={cluster.time_limit} ({limit_s}s), or every start is stopped at once"
        )
    run_dir = str(run_dir)
    _check_header_path("run.dir", run_dir)
    if log_dir is None:
        log_dir, log_name = f"{run_dir.rstrip('/')}/logs", "slurm-%j"
    else:
        _check_header_path("log_dir", log_dir)
        log_name = "%x-%j"
    values = {
        "comment": "\n".join(_comment(line) for line in _describe(config, plan, shape, notes)),
        "sbatch": "\n".join(_sbatch_lines(config, shape, log_dir, log_name)),
        "workdir": '"$SLURM_SUBMIT_DIR"' if workdir is None else shlex.quote(str(workdir)),
        "python": shlex.quote(python),
        "run_dir": shlex.quote(run_dir),
        "overrides": "".join(f"{shlex.quote(o)} " for o in overrides),
        "nccl_env": _nccl_exports(config.cluster.nccl_env),
        "grace": str(config.slurm.signal_grace_s),
        "step_wait": str(config.slurm.step_wait_s),
        "exit_requeue": str(EXIT_REQUEUE),
        "requeue": _requeue_block(config),
    }
    return _fill(TEMPLATE.read_text(), values)


def time_limit_s(text: str) -> int:
    """Seconds in a SLURM time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(parts) < 3:
        m, s = (parts + [0])[:2]
        return m * 60 + s
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _fill(template: str, values: Mapping[str, str]) -> str:
    names = set(_PLACEHOLDER.findall(template))
    assert names == set(values), f"template placeholders {sorted(names ^ set(values))}"
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def job_name(config: Config) -> str:
    """``slurm.job_name``, or llama-<model>-<parallel> with anything unusual made ``_``."""
    if config.slurm.job_name:
        return config.slurm.job_name
    name = f"llama-{config.model.name}-{config.parallel.name}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _sbatch_lines(config: Config, shape: JobShape, log_dir: str, log_name: str) -> list[str]:
    cluster, slurm = config.cluster, config.slurm
    options = [
        f"--job-name={job_name(config)}",
        f"--nodes={shape.nodes}",
        f"--ntasks={shape.ntasks}",
        f"--ntasks-per-node={shape.tasks_per_node}",
    ]
    if shape.gpus_per_node:
        options.append(f"--gpus-per-node={shape.gpus_per_node}")
    options += [f"--cpus-per-task={cluster.cpus_per_task}", f"--time={cluster.time_limit}"]
    if cluster.partition:
        options.append(f"--partition={cluster.partition}")
    if cluster.account:
        options.append(f"--account={cluster.account}")
    if cluster.exclusive:
        options.append("--exclusive")
    pattern_dir = log_dir.rstrip("/").replace("%", "%%")  # %j etc. are sbatch's patterns
    options += [
        f"--output={pattern_dir}/{log_name}.out",
        f"--error={pattern_dir}/{log_name}.err",
        "--open-mode=append",  # a requeued job appends to the same files
        f"--signal=USR1@{slurm.signal_grace_s}",
    ]
    if slurm.requeue:
        options.append("--requeue")
    for i, arg in enumerate(slurm.extra_sbatch_args):
        _check_header_path(f"slurm.extra_sbatch_args[{i}]", arg)
        options.append(arg)
    return [f"#SBATCH {shlex.quote(option)}" for option in options]


def _check_header_path(field: str, value: str) -> None:
    if not value or _UNSAFE_IN_HEADER.search(value):
        raise ValueError(
            f"{field}={value!r}: an #SBATCH line cannot hold it (empty, or a control "
            "character or backslash); choose another path"
        )


def _describe(config: Config, plan: Plan, shape: JobShape, notes: Sequence[str]) -> list[str]:
    c = config.cluster
    per_node = f"{shape.gpus_per_node} GPUs" if shape.gpus_per_node else "CPU tasks"
    noun = "node" if shape.nodes == 1 else "nodes"
    return [
        f"LLaMA {config.model.name}: world size {plan.world_size} = tp({plan.tp}) * pp({plan.pp}) "
        f"* dp({plan.dp}), ZeRO-{plan.zero_stage}",
        f"on {shape.nodes} {noun} x {shape.tasks_per_node} ranks ({per_node} per node; "
        f"cluster {c.name}, {c.device}), time limit {c.time_limit} per job",
        *notes,
    ]


def _comment(text: str) -> str:
    # A newline in a comment would end it: the rest would be a command.
    return "# " + re.sub(r"[\x00-\x1f\x7f]", "?", text) if text else "#"


def _nccl_exports(env: Mapping[str, str]) -> str:
    if not env:
        return "# (none for this cluster)"
    return "\n".join(f"export {key}={shlex.quote(str(value))}" for key, value in env.items())


def _requeue_block(config: Config) -> str:
    slurm = config.slurm
    if not slurm.requeue:
        return "# slurm.requeue=false: not requeued; submit again to resume (run.resume=auto)."
    requeue = [
        '    echo "stopped for time after a checkpoint: requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    echo "error: scontrol requeue failed; submit again to resume" >&2',
    ]
    if slurm.max_requeues is not None:
        bound = slurm.max_requeues
        requeue = [
            f'    if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {bound} ]; then',
            *("    " + line for line in requeue),
            "    else",
            f'        echo "slurm.max_requeues={bound} reached: not requeueing" >&2',
            "    fi",
        ]
    return "\n".join([f'if [ "$status" -eq {EXIT_REQUEUE} ]; then', *requeue, "fi"])


# -- submission -------------------------------------------------------------------------


def find_sbatch() -> str:
    """The sbatch on PATH; ``ValueError`` when there is none."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError(
            "launcher=slurm: sbatch is not on PATH; run this on a SLURM login node, "
            "or add slurm.submit=false to only write the run directory and its script"
        )
    return sbatch


def write_and_submit(
    run_dir: Path, files: Mapping[str, str], *, sbatch: str | None, cwd: Path
) -> str | None:
    """Write ``files`` (name -> text, the script as ``job.sh``) into ``run_dir``; submit it.

    Returns the job id, or None when ``sbatch`` is None (render only). When
    sbatch refuses the job the run directory is put back as it was (removed
    if this call created it) and ``ValueError`` carries sbatch's message.
    """
    created = not run_dir.exists()
    previous = {name: _read(run_dir / name) for name in files}
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch's --output goes here
    try:
        for name, text in files.items():
            write_atomic(run_dir / name, text)
        if sbatch is None:
            return None
        job_id = _sbatch(sbatch, run_dir / SCRIPT_NAME, cwd=cwd)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for name, old in previous.items():
                if old is None:
                    (run_dir / name).unlink(missing_ok=True)
                else:
                    write_atomic(run_dir / name, old)
        raise
    write_atomic(run_dir / "job_id", job_id + "\n")  # status knows the job while it is pending
    return job_id


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _sbatch(sbatch: str, script: Path, *, cwd: Path) -> str:
    try:
        result = subprocess.run(
            [sbatch, "--parsable", str(script)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"launcher=slurm: could not run sbatch: {exc}") from exc
    job_id = result.stdout.strip().split(";")[0]
    if result.returncode != 0 or not job_id.isdigit():
        lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise ValueError(
            f"launcher=slurm: sbatch refused the job: {reason} (check cluster.partition, "
            "cluster.account, cluster.time_limit, slurm.extra_sbatch_args)"
        )
    return job_id


# -- the checked-in scripts and the job's prepare step ---------------------------------


def render_checked_in(name: str) -> str:
    """``slurm/<name>.sh``: run from the submit directory, writing its own run directory."""
    overrides = CHECKED_IN[name]
    composed = _compose(overrides)
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


def prepare(run_dir: Path, overrides: Sequence[str] = (), *, ntasks: int = 0) -> str:
    """The job's first step: reuse RUN_DIR/config.yaml, or compose and write it.

    ``ntasks``: the job's task count (0: unknown), which must be the layout's
    world size. Returns a line saying what it did; ``ValueError`` for a bad config.
    """
    path = run_dir / "config.yaml"
    if path.exists():
        plan = validate_config(load_config(path))
        _check_ntasks(ntasks, plan)
        return f"reusing {path} (run.resume=auto continues from the latest checkpoint, if any)"
    composed = _compose(overrides)
    # run.dir is not an override: Hydra would parse the path
    config = dataclasses.replace(composed, run=dataclasses.replace(composed.run, dir=str(run_dir)))
    plan = validate_config(config)
    config = with_layout(config, plan)
    _check_ntasks(ntasks, plan)
    ds_json = deepspeed_config(plan, config.train, config.deepspeed)  # checks deepspeed.extra
    prepare_run_dir(resolve_paths(config), ds_json)
    return f"wrote {path}"


def _compose(overrides: Sequence[str]) -> Config:
    return compose_config(overrides, conf_dir=REPO_ROOT / "conf")


def _check_ntasks(ntasks: int, plan: Plan) -> None:
    if ntasks and ntasks != plan.world_size:
        raise ValueError(
            f"the job has {ntasks} tasks (SLURM_NTASKS) but the layout needs world_size"
            f"({plan.world_size}) = tp({plan.tp}) * pp({plan.pp}) * dp({plan.dp}); "
            "submit with the script's --nodes/--ntasks or change the layout"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare`` and ``render-checked-in``; a bad setting is one ``error:`` line, exit 2."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.launch.slurm")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="create or reuse RUN_DIR/config.yaml")
    prep.add_argument("run_dir", type=Path)
    prep.add_argument("--ntasks", type=int, default=0, help="the job's tasks (SLURM_NTASKS)")
    prep.add_argument("--job-id", default="", help="recorded in RUN_DIR/job_id (SLURM_JOB_ID)")
    render = commands.add_parser("render-checked-in", help="regenerate slurm/llama*.sh")
    render.add_argument("--check", action="store_true", help="only report stale scripts")
    # Config overrides follow "--" (none: the run directory must already have a config).
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    try:
        if args.command == "prepare":
            print(prepare(args.run_dir, argv[split + 1 :], ntasks=args.ntasks), flush=True)
            if args.job_id:  # for ``python -m orchestrator.status RUN_DIR``
                write_atomic(args.run_dir / "job_id", args.job_id + "\n")
            return 0
        return _render_all(check=args.check)
    except (ValueError, HydraException, OmegaConfBaseException) as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2


def _render_all(*, check: bool) -> int:
    stale = []
    for name in CHECKED_IN:
        path = SLURM_DIR / f"{name}.sh"
        text = render_checked_in(name)
        if _read(path) == text:
            continue
        stale.append(path.name)
        if not check:
            write_atomic(path, text)
    verb = "stale" if check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "all checked-in scripts are current")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
