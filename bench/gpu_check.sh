#!/usr/bin/env bash
# Issue 8's GPU checks (bench/gpu_check.py) on the device machine, in one call:
# install the wheels bench/build_gpu_wheels.sh left in .whl/ (DeepSpeed, Hydra,
# OmegaConf and what they need that the device image lacks), then run every
# part under its timeout and the whole under 8 minutes. What it prints also
# lands in $OUT (gpu_check.log, one JSON per part, summary.json).
#
#     bash bench/gpu_check.sh                # GPU machine; carry .whl
#     bash bench/gpu_check.sh --cpu-smoke    # here: the same parts, tiny model, CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"

if [[ " $* " != *" --cpu-smoke "* ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { echo "error: installing .whl/ failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "note: no .whl/ (run bash bench/build_gpu_wheels.sh here and carry .whl); using what is installed"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
        | tee -a "$out/gpu_check.log"
fi
export PYTHONUNBUFFERED=1
# The parts share a 450 s budget; this outer limit only catches a hang in the driver itself.
timeout -k 10 480 python3 bench/gpu_check.py --out "$out" "$@"
