"""sbatch scripts rendered from the config: a pure function of the config, the plan
and the run directory, filling ``slurm/template.sh``.

Every value that comes from the config reaches the shell through
``shlex.quote``. ``#SBATCH`` lines are not read by the shell but by sbatch,
whose parser takes single and double quotes and backslash escapes much as the
shell does (so ``shlex.quote`` output reads back as the same word) and ends a
line at a newline or an unquoted ``#``. Values with control characters or
backslashes are refused there; ``%`` in a path is doubled (sbatch's filename
patterns). Names (job, partition, account) must be plain SLURM names.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config.schema import Config
from orchestrator.planning.plan import Plan
from orchestrator.protocol import EXIT_REQUEUE

REPO_ROOT = Path(__file__).resolve().parents[3]
SLURM_DIR = REPO_ROOT / "slurm"
TEMPLATE = SLURM_DIR / "template.sh"
SCRIPT_NAME = "job.sh"  # the rendered script in a run directory
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f\\]")


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
