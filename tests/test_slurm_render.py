"""sbatch scripts: the checked-in ones are current, headers per cluster and layout,
quoting (nothing in a path runs), the script's requeue logic against stub SLURM
commands, sbatch's own reading of the header, and launcher=slurm/auto end to end
with a fake sbatch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.schema import Config, load_config
from orchestrator.launch import slurm
from orchestrator.planning.plan import Plan, validate_config
from tests.test_config import load

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "launch" / "run.py"
NASTY = "a b/$(touch pwned)/`touch pwned2`/q\"u'o%t;e|&*"


def _plan(*overrides: str) -> tuple[Config, Plan]:
    config = load(*overrides)
    return config, validate_config(config)


def _options(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")
    ]


# -- the checked-in scripts -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(slurm.CHECKED_IN))
def test_checked_in_script_is_what_the_generator_renders(name: str) -> None:
    path = slurm.SLURM_DIR / f"{name}.sh"
    assert path.read_text() == slurm.render_checked_in(name), (
        f"{path} is stale: run python -m orchestrator.launch.slurm render-checked-in"
    )
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize(
    ("name", "model", "cluster", "nodes", "world", "layout"),
    [
        ("llama7b", "7b", "a100_80g", 16, 128, "tp(2) * pp(1) * dp(64), ZeRO-2"),
        ("llama13b", "13b", "a100_80g", 32, 256, "tp(4) * pp(2) * dp(32), ZeRO-1"),
        ("llama33b", "33b", "a100_80g", 128, 1024, "tp(4) * pp(2) * dp(128), ZeRO-1"),
        ("llama65b", "65b", "a100_80g", 256, 2048, "tp(8) * pp(4) * dp(64), ZeRO-1"),
        ("llama2_70b", "llama2_70b", "a100_80g", 256, 2048, "tp(8) * pp(4) * dp(64), ZeRO-1"),
        ("llama3_405b", "llama3_405b", "h100_sxm", 256, 2048, "tp(8) * pp(16) * dp(16), ZeRO-1"),
    ],
)
def test_checked_in_headers(
    name: str, model: str, cluster: str, nodes: int, world: int, layout: str
) -> None:
    script = (slurm.SLURM_DIR / f"{name}.sh").read_text()
    assert f"# LLaMA {model}: world size {world} = {layout}" in script
    assert f"on {nodes} nodes x 8 ranks (8 GPUs per node; cluster {cluster}" in script
    cpus = {"a100_80g": 10, "h100_sxm": 12}[cluster]
    assert _options(script) == [
        f"--job-name={name}",
        f"--nodes={nodes}",
        f"--ntasks={world}",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        f"--cpus-per-task={cpus}",
        "--time=2-00:00:00",
        "--partition=gpu",
        "--exclusive",
        "--output=slurm/logs/%x-%j.out",  # checked in: exists when sbatch opens it
        "--error=slurm/logs/%x-%j.err",
        "--open-mode=append",
        "--signal=USR1@600",
        "--requeue",
    ]
    assert 'cd "$SLURM_SUBMIT_DIR"' in script and f"RUN_DIR=runs/{name}\n" in script
    assert str(REPO) not in script and "/root" not in script and "/home" not in script
    assert (slurm.SLURM_DIR / "logs" / ".gitignore").is_file()
    subprocess.run(["bash", "-n", "-c", script], check=True)


def test_render_checked_in_check_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm.main(["render-checked-in", "--check"]) == 0
    assert "current" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("5:30", 330),
        ("04:00:00", 14400),
        ("2-00:00:00", 172800),
        ("1-2", 93600),
        ("1-2:03", 93780),
        ("0-0:0:7", 7),
    ],
)
def test_time_limit_seconds(text: str, seconds: int) -> None:
    assert slurm.time_limit_s(text) == seconds


# -- headers by cluster and layout ------------------------------------------------------


def test_cpu_cluster_has_no_gres_and_tasks_per_node() -> None:
    config, plan = _plan("parallel=tp2pp1", "parallel.dp=2", "cluster=slurm_cpu")
    script = slurm.render_sbatch(config, plan, "/runs/x", python="/venv/bin/python", workdir="/w")
    options = _options(script)
    assert options[1:4] == ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2"]
    assert plan.nodes == 2  # the plan counts the nodes the script asks for
    assert not any(
        o.startswith(("--gpus", "--gres", "--partition", "--exclusive")) for o in options
    )
    assert "--output=/runs/x/logs/slurm-%j.out" in options
    assert "PYTHON=/venv/bin/python\n" in script and "cd /w\n" in script
    assert "# (none for this cluster)" in script


def test_gpu_cluster_header_with_account_and_extra_args() -> None:
    config, plan = _plan(
        "model=7b",
        "parallel=tp8pp1",
        "cluster=a100_40g",
        "cluster.nodes=2",
        "cluster.account=proj-42",
        "cluster.time_limit=12:00:00",
        "slurm.job_name=my.job",
        "slurm.signal_grace_s=120",
        "slurm.max_requeues=3",
        "slurm.extra_sbatch_args=['--constraint=a100','--qos=high']",
    )
    options = _options(slurm.render_sbatch(config, plan, "/r"))
    assert options[:11] == [
        "--job-name=my.job",
        "--nodes=2",
        "--ntasks=16",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=10",
        "--time=12:00:00",
        "--partition=gpu",
        "--account=proj-42",
        "--exclusive",
        "--output=/r/logs/slurm-%j.out",
    ]
    assert options[-4:] == ["--signal=USR1@120", "--requeue", "--constraint=a100", "--qos=high"]


def test_small_layout_asks_for_its_ranks_only() -> None:
    config, plan = _plan("parallel=tp2pp1", "cluster=a100_80g")
    assert _options(slurm.render_sbatch(config, plan, "/r"))[1:5] == [
        "--nodes=1",
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--gpus-per-node=8",
    ]


@pytest.mark.parametrize(
    ("overrides", "run_dir", "message"),
    [
        (
            ("cluster=slurm_cpu", "cluster.nodes=1", "parallel.dp=2"),
            "/r",
            "cluster.nodes=1: the layout needs 4 nodes",
        ),
        (
            ("cluster=a100_80g", "cluster.partition=null"),
            "/r",
            "cluster.partition=None: cluster a100_80g needs a partition",
        ),
        (
            ("cluster=slurm_cpu",),
            "/tmp/new\nline",
            "run.dir='/tmp/new\\nline': an #SBATCH line cannot hold it",
        ),
        (("cluster=slurm_cpu",), "/tmp/back\\slash", "run.dir='/tmp/back\\\\slash'"),
    ],
)
def test_render_refuses(overrides: tuple[str, ...], run_dir: str, message: str) -> None:
    config, plan = _plan(*overrides)
    with pytest.raises(ValueError) as info:
        slurm.render_sbatch(config, plan, run_dir)
    assert str(info.value).startswith(message), info.value


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("cluster", "account", "my acct", "cluster.account=my acct: must be a SLURM name"),
        ("cluster", "partition", "gpu;rm", "cluster.partition=gpu;rm: must be a SLURM name"),
        ("cluster", "time_limit", "2days", "cluster.time_limit=2days: must be a SLURM time"),
        ("cluster", "nccl_env", {"A-B": "1"}, "cluster.nccl_env.A-B=1: the key must be a variable"),
        ("cluster", "nccl_env", {"A": "x\ny"}, "cluster.nccl_env.A=x\ny: must not hold control"),
        ("slurm", "job_name", "a$(b)", "slurm.job_name=a$(b): must be a SLURM name"),
        ("slurm", "signal_grace_s", 0, "slurm.signal_grace_s=0: must be in [1, 65535]"),
        ("slurm", "max_requeues", -1, "slurm.max_requeues=-1: must be >= 0"),
        ("slurm", "extra_sbatch_args", ["x"], "slurm.extra_sbatch_args[0]=x: must be one sbatch"),
        ("slurm", "python", "", "slurm.python=: must be a non-empty path"),
    ],
)
def test_slurm_settings_validate_themselves(
    section: str, field: str, value: object, message: str
) -> None:
    config = load()
    setattr(getattr(config, section), field, value)
    with pytest.raises(ValueError) as info:
        validate_config(config)
    assert str(info.value).startswith(message), info.value


# -- quoting: nothing in a value runs ---------------------------------------------------

_STUBS = {
    "scontrol": """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
case "$1 $2" in
  "show hostnames") printf 'node1\\nnode2\\n' ;;
  "show node") printf 'NodeName=node1 Arch=x86_64\\n   NodeAddr=10.1.2.3 NodeHostName=node1\\n' ;;
esac
""",
    "srun": """#!/bin/bash
printf '%s\\n' "$@" > "$STUB_LOG.srun"
echo "MASTER=$MASTER_ADDR:$MASTER_PORT NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME" >> "$STUB_LOG"
exit "${STUB_SRUN_EXIT:-0}"
""",
    "python": """#!/bin/bash
if [ "$1" = -c ]; then echo 29500; exit 0; fi
printf '%s\\n' "$@" > "$STUB_LOG.python"
""",
}


def _stub_job(tmp_path: Path, config: Config, plan: Plan, run_dir: str) -> tuple[Path, Path]:
    """The rendered script, with SLURM's commands and python replaced by stubs."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    (work / "launch").mkdir(parents=True)
    (work / "launch" / "run.py").touch()
    bin_dir.mkdir()
    for name, text in _STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = slurm.render_sbatch(
        config, plan, run_dir, python=str(bin_dir / "python"), workdir=work
    )
    path = tmp_path / "job.sh"
    path.write_text(script)
    return path, work


def _run_job(path: Path, tmp_path: Path, **env: str) -> tuple[int, str]:
    log = tmp_path / "stub.log"
    environ = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "STUB_LOG": str(log),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_NTASKS": "4",
        **env,
    }
    result = subprocess.run(
        ["bash", str(path)], env=environ, capture_output=True, text=True, cwd=tmp_path
    )
    return result.returncode, log.read_text() if log.exists() else ""


def test_values_with_shell_syntax_run_nothing(tmp_path: Path) -> None:
    run_dir = str(tmp_path / NASTY)
    config, plan = _plan("parallel=tp2pp1", "parallel.dp=2", "cluster=slurm_cpu")
    config.cluster.nccl_env["NCCL_SOCKET_IFNAME"] = "$(touch pwned3)`touch pwned4`"
    path, work = _stub_job(tmp_path, config, plan, run_dir)
    subprocess.run(["bash", "-n", str(path)], check=True)
    code, log = _run_job(path, tmp_path)
    assert code == 0, log
    # The workers got the directory as one argument, byte for byte, and so did prepare.
    srun_args = (tmp_path / "stub.log.srun").read_text().splitlines()
    python = str(tmp_path / "bin" / "python")
    assert srun_args[-4:] == [python, "-m", "orchestrator.runtime.worker", run_dir]
    assert f"--output={run_dir.replace('%', '%%')}/logs/rank_%t.log" in srun_args
    prepare_args = (tmp_path / "stub.log.python").read_text().splitlines()
    assert prepare_args[:5] == ["-m", "orchestrator.launch.slurm", "prepare", run_dir, "--ntasks"]
    assert "MASTER=10.1.2.3:29500 NCCL_SOCKET_IFNAME=$(touch pwned3)`touch pwned4`" in log
    for where in (tmp_path, work, Path.cwd()):
        assert not list(where.glob("pwned*")), where


def test_sbatch_reads_the_header_back_as_written(tmp_path: Path) -> None:
    """sbatch's own parser (``sbatch -v`` lists the options it read) on a quoted header."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not installed")
    run_dir = str(tmp_path / NASTY)
    config, plan = _plan("cluster=slurm_cpu", "slurm.extra_sbatch_args=['--comment=x y#z']")
    script = tmp_path / "job.sh"
    script.write_text(slurm.render_sbatch(config, plan, run_dir))
    conf = tmp_path / "slurm.conf"  # a controller that is not there: sbatch stops after parsing
    conf.write_text(
        "ClusterName=fake\nSlurmctldHost=localhost\nSlurmctldPort=1\n"
        "NodeName=localhost CPUs=2 State=UNKNOWN\nPartitionName=p Nodes=localhost Default=YES\n"
    )
    proc = subprocess.Popen(
        ["sbatch", "-v", "--test-only", str(script)],
        env={**os.environ, "SLURM_CONF": str(conf)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    read: dict[str, str] = {}
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = re.match(r"sbatch: (\S+)\s+: (.*)$", line.rstrip("\n"))
            if match:
                read[match.group(1)] = match.group(2)
            if "end of defined options" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    pattern_dir = run_dir.replace("%", "%%")
    assert read["output"] == f"{pattern_dir}/logs/slurm-%j.out"
    assert read["error"] == f"{pattern_dir}/logs/slurm-%j.err"
    assert read["comment"] == "x y#z"
    assert read["job-name"] == "llama-tiny-tp2pp2"


@pytest.mark.parametrize(
    ("srun_exit", "settings", "restarts", "code", "requeued"),
    [
        (0, (), "0", 0, False),  # finished
        (1, (), "0", 1, False),  # failed: not requeued
        (75, (), "5", 0, True),  # stopped for time: requeued, unbounded
        (75, ("slurm.max_requeues=2",), "1", 0, True),
        (75, ("slurm.max_requeues=2",), "2", 75, False),  # bound reached
        (75, ("slurm.requeue=false",), "0", 75, False),
    ],
)
def test_requeue_only_when_stopped_for_time(
    tmp_path: Path,
    srun_exit: int,
    settings: tuple[str, ...],
    restarts: str,
    code: int,
    requeued: bool,
) -> None:
    config, plan = _plan("parallel=tp2pp1", "parallel.dp=2", "cluster=slurm_cpu", *settings)
    path, _ = _stub_job(tmp_path, config, plan, str(tmp_path / "run"))
    got, log = _run_job(path, tmp_path, STUB_SRUN_EXIT=str(srun_exit), SLURM_RESTART_COUNT=restarts)
    assert got == code, log
    assert ("scontrol requeue 77" in log) == requeued, log


# -- the job's prepare step ---------------------------------------------------------------


def test_prepare_writes_then_reuses_the_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = ["parallel=tp1pp1", "data=synthetic", "train.steps=7"]
    assert slurm.prepare(run_dir, overrides, ntasks=1) == f"wrote {run_dir}/config.yaml"
    config = load_config(run_dir / "config.yaml")
    assert config.train.steps == 7 and config.run.dir == str(run_dir.resolve())
    assert (run_dir / "deepspeed.json").is_file() and (run_dir / "logs").is_dir()
    # A requeued job: the same config, whatever the command line says now.
    assert slurm.prepare(run_dir, ["train.steps=9"], ntasks=1).startswith("reusing")
    assert load_config(run_dir / "config.yaml").train.steps == 7
    with pytest.raises(ValueError, match=r"^the job has 4 tasks \(SLURM_NTASKS\) but the layout"):
        slurm.prepare(run_dir, ntasks=4)


def test_prepare_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # As the scripts call it: overrides after "--", none for a prepared run directory.
    run_dir = tmp_path / "run"
    args = ["prepare", str(run_dir), "--ntasks", "1", "--"]
    assert slurm.main([*args, "parallel=tp1pp1", "data=synthetic"]) == 0
    assert slurm.main(args) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("reusing")


def test_prepare_bad_setting_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = slurm.main(["prepare", str(tmp_path / "run"), "--", "parallel.tp=3"])
    assert code == 2
    assert (
        capsys.readouterr().err
        == "error: parallel.tp=3: model.n_heads(8) must be divisible by tp\n"
    )
    assert not (tmp_path / "run").exists()


# -- launch/run.py launcher=slurm / auto with a fake sbatch -------------------------------

FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "${0%/*}/sbatch.args"
if [ -n "$REFUSE" ]; then
    echo "sbatch: error: Batch job submission failed: $REFUSE" >&2
    exit 1
fi
echo 4242
"""
SLURM_JOB = ("model=7b", "parallel=tp8pp1", "cluster=a100_80g", "data=synthetic")


def _launch(
    tmp_path: Path, *args: str, sbatch: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if sbatch:
        (bin_dir / "sbatch").write_text(FAKE_SBATCH)
        (bin_dir / "sbatch").chmod(0o755)
    environ = {**os.environ, "PATH": str(bin_dir), **env}
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=120,
    )


def _one_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_launcher_slurm_submits(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _launch(tmp_path, *SLURM_JOB, "launcher=slurm", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "submitted batch job 4242" in result.stdout
    assert f"run directory: {run_dir}" in result.stdout
    assert (
        "squeue -j 4242" in result.stdout and f"tail -f {run_dir}/logs/rank_0.log" in result.stdout
    )
    args = (tmp_path / "bin" / "sbatch.args").read_text().splitlines()
    assert args == ["--parsable", str(run_dir / "job.sh")]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.yaml",
        "deepspeed.json",
        "job.sh",
        "job_id",
        "logs",
    ]
    assert (run_dir / "job_id").read_text() == "4242\n"
    script = (run_dir / "job.sh").read_text()
    assert f"--output={run_dir}/logs/slurm-%j.out" in script and "--nodes=1" in script
    assert load_config(run_dir / "config.yaml").run.dir == str(run_dir)


def test_launcher_auto_submits_what_does_not_fit_here(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine may run this layout locally")
    result = _launch(tmp_path, *SLURM_JOB, f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "submitted batch job 4242" in result.stdout


def test_submit_false_writes_the_run_dir_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _launch(
        tmp_path, *SLURM_JOB, "launcher=slurm", "slurm.submit=false", f"run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "bin" / "sbatch.args").exists()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "job.sh").is_file()
    assert f"sbatch {run_dir / 'job.sh'}" in result.stdout


def test_refused_job_leaves_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _launch(
        tmp_path, *SLURM_JOB, "launcher=slurm", f"run.dir={run_dir}", REFUSE="Invalid account"
    )
    _one_error(
        result,
        "error: launcher=slurm: sbatch refused the job: sbatch: error: Batch job submission failed: Invalid account",
    )
    assert not run_dir.exists()


def test_refused_job_restores_an_existing_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("old\n")
    result = _launch(tmp_path, *SLURM_JOB, "launcher=slurm", f"run.dir={run_dir}", REFUSE="x")
    assert result.returncode == 2
    assert (run_dir / "config.yaml").read_text() == "old\n"
    assert not (run_dir / "job.sh").exists() and not (run_dir / "deepspeed.json").exists()


@pytest.mark.parametrize(
    ("args", "sbatch", "expected"),
    [
        (("launcher=slurm",), False, "error: launcher=slurm: sbatch is not on PATH"),
        (
            ("launcher=slurm", "cluster.nodes=2", "parallel.dp=4"),
            True,
            "error: parallel: tp(8) * pp(1) * dp(4) = 32 != world_size(16)",
        ),
        (("launcher=slurm", "cluster.partition=null"), True, "error: cluster.partition=None"),
        (("launcher=slurm", "cluster.account=a b"), True, "error: cluster.account=a b: must be"),
        (
            ("launcher=slurm", "cluster.time_limit=1h"),
            True,
            "error: cluster.time_limit=1h: must be",
        ),
        (
            ("launcher=slurm", "model=65b"),
            True,
            "error: cluster.device_memory_gb=80: the plan needs 179.8 GiB per device on "
            "pipeline stage 0 (largest item: optimizer state 91.2 GiB); raise parallel.tp",
        ),
        (
            ("model=65b",),
            True,
            "error: cluster.device_memory_gb=80: the plan needs 179.8 GiB per device",
        ),
        (
            (),
            False,
            "error: launcher=auto: cluster=a100_80g runs one rank per GPU (world size 8) "
            "and this machine has no GPU; sbatch is not on PATH here (launcher=slurm",
        ),
    ],
)
def test_bad_slurm_launch_is_one_line(
    tmp_path: Path, args: tuple[str, ...], sbatch: bool, expected: str
) -> None:
    if not args and shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine may run this layout locally")
    run_dir = tmp_path / "run"
    result = _launch(tmp_path, *SLURM_JOB, *args, f"run.dir={run_dir}", sbatch=sbatch)
    _one_error(result, expected)
    assert not run_dir.exists()


def test_auto_inside_an_allocation_needs_a_shared_run_dir(tmp_path: Path) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = _launch(tmp_path, "parallel=tp1pp1", "data=synthetic", sbatch=False, **env)
    _one_error(
        result, "error: run.dir=null: started by torchrun, every rank must write one directory"
    )
    result = _launch(
        tmp_path,
        "parallel=tp1pp1",
        f"run.dir={tmp_path}/r",
        sbatch=False,
        **{**env, "WORLD_SIZE": "2", "RANK": "1"},
    )
    _one_error(
        result,
        "error: launcher=auto: started by torchrun with 2 ranks but the layout needs world_size(1)",
    )


def test_every_checked_in_script_has_its_header_checked() -> None:
    checked = {"llama7b", "llama13b", "llama33b", "llama65b", "llama2_70b", "llama3_405b"}
    assert set(slurm.CHECKED_IN) == checked


def test_llama3_405b_script_carries_meta_stage_split_and_its_tokenizer() -> None:
    script = (slurm.SLURM_DIR / "llama3_405b.sh").read_text()
    assert "parallel.pipeline_split=[7,8,8,8,8,8,8,8,8,8,8,8,8,8,8,7]" in script
    assert "data.tokenizer=data/llama3/tokenizer.json" in script
    config = slurm.compose(slurm.CHECKED_IN["llama3_405b"])
    plan = validate_config(config)
    sizes = [last - first + 1 for first, last in plan.stage_layers]
    assert sizes == [7] + [8] * 14 + [7] and plan.world_size == 2048
