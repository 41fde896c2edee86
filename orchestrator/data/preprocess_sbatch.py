"""The SLURM array job that runs ``orchestrator.data.preprocess_many``: rendering only.

``render_array_script`` is a pure function of its arguments; every value
reaches the script through ``shlex.quote``, and an ``#SBATCH`` value sbatch
cannot take is a ``ValueError`` naming it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

_SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_SLURM_TIME = re.compile(r"\d+(-\d+)?(:\d+){0,2}")
_UNSAFE_IN_HEADER = re.compile(r"[\x00-\x1f\x7f\\]")


def render_array_script(
    inputs: Sequence[str],
    output_dir: str,
    tokenizer: str,
    *,
    array_size: int,
    cpus_per_task: int,
    log_dir: str,
    files_per_shard: int = 1,
    strict: bool = False,
    text_split: str = "file",
    job_name: str = "preprocess",
    partition: str | None = None,
    time_limit: str | None = None,
    python: str = "python3",
    workdir: str | None = None,
) -> str:
    """An sbatch array script of ``array_size`` tasks running ``preprocess_many`` (pure).

    ``inputs`` (files or globs, expanded by each task, not by the shell) and
    the other paths are relative to ``workdir`` (None: ``$SLURM_SUBMIT_DIR``);
    ``log_dir`` must exist at submit time. Raises ``ValueError`` for a value
    sbatch cannot take.
    """
    for name, value, rule in [
        ("array_size", array_size, array_size >= 1),
        ("cpus_per_task", cpus_per_task, cpus_per_task >= 1),
        ("files_per_shard", files_per_shard, files_per_shard >= 1),
    ]:
        if not rule:
            raise ValueError(f"{name}={value}: must be >= 1")
    for name, text, pattern in [
        ("job_name", job_name, _SLURM_NAME),
        ("partition", partition, _SLURM_NAME),
        ("time", time_limit, _SLURM_TIME),
    ]:
        if text is not None and not pattern.fullmatch(text):
            raise ValueError(f"{name}={text!r}: not a SLURM {'time' if name == 'time' else 'name'}")
    if not log_dir or _UNSAFE_IN_HEADER.search(log_dir):
        raise ValueError(
            f"log_dir={log_dir!r}: an #SBATCH line cannot hold it (empty, or a control "
            "character or backslash); choose another path"
        )
    options = [f"--job-name={job_name}", f"--array=0-{array_size - 1}", "--ntasks=1"]
    options += [f"--cpus-per-task={cpus_per_task}"]
    options += [f"--partition={partition}"] * (partition is not None)
    options += [f"--time={time_limit}"] * (time_limit is not None)
    options += [f"--output={log_dir.rstrip('/').replace('%', '%%')}/%x-%A_%a.out"]
    command = [
        ["--input", *inputs],
        ["--output-dir", output_dir, "--tokenizer", tokenizer],
        ["--files-per-shard", str(files_per_shard), "--text-split", text_split]
        + ["--strict"] * strict,
    ]
    cd_to = '"$SLURM_SUBMIT_DIR"' if workdir is None else shlex.quote(workdir)
    return "\n".join(
        [
            "#!/bin/bash",
            f"# Tokenization into indexed shards: an array of {array_size} tasks.",
            *(f"#SBATCH {shlex.quote(option)}" for option in options),
            "#",
            "# Rendered by orchestrator/data/preprocess_many.py (--render-sbatch): render it",
            "# again rather than edit it. Array task i of N makes shards i, i+N, ... of the",
            "# sorted list and skips finished ones: submit it again to finish a partial run.",
            "set -eo pipefail",
            "",
            f"cd {cd_to}",
            "export OMP_NUM_THREADS=1",
            'echo "array task ${SLURM_ARRAY_TASK_ID:-?} of ${SLURM_ARRAY_TASK_COUNT:-?}'
            ' on $(hostname)"',
            f"exec {shlex.quote(python)} -m orchestrator.data.preprocess_many \\",
            *(f"    {shlex.join(words)} \\" for words in command),
            '    --workers "${SLURM_CPUS_PER_TASK:-1}"',
            "",
        ]
    )
