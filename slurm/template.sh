#!/bin/bash
{{comment}}
{{sbatch}}
#
# Rendered by orchestrator/launch/slurm/render.py from slurm/template.sh: edit the config, not this file.
# Steps: (1) create or reuse the run directory and its resolved config, (2) the
# first node's address and a free port for the rendezvous, (3) NCCL settings,
# (4) srun: one rank per task, (5) requeue when the ranks stopped for time.
set -eo pipefail

cd {{workdir}}
if [ ! -f launch/run.py ]; then
    echo "error: $PWD is not this project's checkout: submit from the repository root" >&2
    exit 2
fi
PYTHON={{python}}
RUN_DIR={{run_dir}}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# 1. Written on the first start; a requeued job finds it and resumes from the
#    last checkpoint (run.resume=auto). Arguments to this script are config
#    overrides for the first start.
"$PYTHON" -m orchestrator.launch.slurm prepare "$RUN_DIR" --ntasks "${SLURM_NTASKS:-0}" \
    --job-id "${SLURM_JOB_ID:-}" -- {{overrides}}${1+"$@"}

# 2. This shell runs on the first node. Its address as SLURM knows it (NodeAddr,
#    usable where node names do not resolve) and a port free on it now.
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
first_node=${nodes%%$'\n'*}
MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' || true)
MASTER_ADDR=${MASTER_ADDR%%$'\n'*}
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT
MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NTASKS:-?} ranks, rendezvous $MASTER_ADDR:$MASTER_PORT"

# 3. NCCL for this cluster's fabric (cluster.nccl_env).
{{nccl_env}}

# 4. One rank per task (per GPU). SIGUSR1 {{grace}}s before the time limit reaches
#    every rank: each finishes its step, the checkpoint is written, all exit {{exit_requeue}}.
#    A rank that dies does not leave the others hanging: srun stops them after
#    {{step_wait}}s. Per-rank output: RUN_DIR/logs/rank_N.log.
status=0
srun --kill-on-bad-exit=0 --wait={{step_wait}} --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    --open-mode=append --output="${RUN_DIR//\%/%%}/logs/rank_%t.log" \
    "$PYTHON" -m orchestrator.runtime.worker "$RUN_DIR" || status=$?

# 5. Exit {{exit_requeue}}: stopped for time after a checkpoint, so run again.
{{requeue}}
echo "ranks finished with exit code $status"
exit "$status"
