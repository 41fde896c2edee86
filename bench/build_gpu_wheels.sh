#!/usr/bin/env bash
# Build, here, the wheels that bench/gpu_check.sh installs on the GPU machine.
#
# The device image has torch, transformers, numpy, ninja, psutil, einops, ...
# but not DeepSpeed, Hydra, OmegaConf or DeepSpeed's pydantic/hjson, and it
# cannot reach a package index. So they travel as wheels in .whl/ (ignored by
# git; name it in the device call's `carry`). Versions are the ones installed
# here, so the GPU run uses what the CPU tests use. Pure-Python packages are
# built with `pip wheel --no-deps`; pydantic-core, the one compiled package, is
# downloaded for the device's CPython 3.12 on x86-64.
#
#     bash bench/build_gpu_wheels.sh        # writes .whl/*.whl (a few MB)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

version() {
    python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}

PURE=(deepspeed hydra-core omegaconf antlr4-python3-runtime hjson pydantic annotated-types
      typing-inspection typing-extensions)
specs=()
for name in "${PURE[@]}"; do
    specs+=("$name==$(version "$name")")
done
core="pydantic-core==$(version pydantic-core)"

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
echo "building: ${specs[*]}"
# No build isolation: DeepSpeed's setup.py imports torch (the one installed here);
# DS_BUILD_OPS=0 (its default) keeps it a pure-Python wheel whose ops build at run time.
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "${specs[@]}"
echo "downloading: $core (cp312, manylinux x86_64)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$WHEELS" "$core"

# Wheels built for this interpreter only would not install on the device's 3.12.
bad=$(find "$WHEELS" -type f -name '*.whl' ! -name '*-py3-none-any.whl' ! -name '*-py2.py3-none-any.whl' \
      ! -name '*cp312*manylinux*x86_64.whl' -printf '%f\n')
if [[ -n "$bad" ]]; then
    echo "error: wheels that will not install on CPython 3.12 x86-64: $bad" >&2
    exit 1
fi
ls -1 "$WHEELS"
du -sh "$WHEELS"
