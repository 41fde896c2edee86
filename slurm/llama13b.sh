#!/bin/bash
# LLaMA 13b: world size 256 = tp(4) * pp(2) * dp(32), ZeRO-1
# on 32 nodes x 8 ranks (8 GPUs per node; cluster a100_80g, a100-80gb), time limit 2-00:00:00 per job
#
# Submit from the repository root:  sbatch slurm/llama13b.sh [OVERRIDE ...]
#   e.g. sbatch slurm/llama13b.sh data.root=/data/redpajama data.tokenizer=/data/tokenizer.model
#   (overrides apply when the run directory is new; a requeued job reuses its config).
# Partition and account: sbatch -p NAME -A ACCOUNT ..., or SBATCH_PARTITION and
#   SBATCH_ACCOUNT in the environment: both take precedence over the #SBATCH lines.
# Run directory: runs/llama13b (logs/rank_N.log, checkpoints/); sbatch's own output:
#   slurm/logs/<job name>-<job id>.out. Python: python3 on PATH (sbatch passes PATH).
# Regenerate: python -m orchestrator.launch.slurm render-checked-in
#SBATCH --job-name=llama13b
#SBATCH --nodes=32
#SBATCH --ntasks=256
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=2-00:00:00
#SBATCH --partition=gpu
#SBATCH --exclusive
#SBATCH --output=slurm/logs/%x-%j.out
#SBATCH --error=slurm/logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR1@600
#SBATCH --requeue
#
# Rendered by orchestrator/launch/slurm/render.py from slurm/template.sh: edit the config, not this file.
# Steps: (1) create or reuse the run directory and its resolved config, (2) the
# first node's address and a free port for the rendezvous, (3) NCCL settings,
# (4) srun: one rank per task, (5) requeue when the ranks stopped for time.
set -eo pipefail

cd "$SLURM_SUBMIT_DIR"
if [ ! -f launch/run.py ]; then
    echo "error: $PWD is not this project's checkout: submit from the repository root" >&2
    exit 2
fi
PYTHON=python3
RUN_DIR=runs/llama13b
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# 1. Written on the first start; a requeued job finds it and resumes from the
#    last checkpoint (run.resume=auto). Arguments to this script are config
#    overrides for the first start.
"$PYTHON" -m orchestrator.launch.slurm prepare "$RUN_DIR" --ntasks "${SLURM_NTASKS:-0}" \
    --job-id "${SLURM_JOB_ID:-}" -- model=13b cluster=a100_80g parallel=tp4pp2 parallel.dp=32 parallel.activation_checkpointing=full data=llama_mixture data.root=data/redpajama data.tokenizer=data/llama/tokenizer.model ${1+"$@"}

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
export NCCL_IB_HCA=mlx5
export NCCL_SOCKET_IFNAME='^lo,docker0'
export NCCL_IB_TIMEOUT=22
export NCCL_DEBUG=WARN

# 4. One rank per task (per GPU). SIGUSR1 600s before the time limit reaches
#    every rank: each finishes its step, the checkpoint is written, all exit 75.
#    A rank that dies does not leave the others hanging: srun stops them after
#    300s. Per-rank output: RUN_DIR/logs/rank_N.log.
status=0
srun --kill-on-bad-exit=0 --wait=300 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    --open-mode=append --output="${RUN_DIR//\%/%%}/logs/rank_%t.log" \
    "$PYTHON" -m orchestrator.runtime.worker "$RUN_DIR" || status=$?

# 5. Exit 75: stopped for time after a checkpoint, so run again.
if [ "$status" -eq 75 ]; then
    echo "stopped for time after a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "error: scontrol requeue failed; submit again to resume" >&2
fi
echo "ranks finished with exit code $status"
exit "$status"
