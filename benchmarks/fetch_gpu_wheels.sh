#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before `benchmarks/gpu.sh` runs on the GPU machine, which
# can reach no package registry. Downloads, into .whl/ (git-ignored), the wheels the GPU image
# lacks: open_clip_torch and its ftfy/wcwidth, and the benchmark peers xformers and Liger-Kernel,
# for CPython 3.12 on x86-64 Linux (the GPU image's Python). Then, with the device tool:
#     run(command="bash benchmarks/gpu.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .whl
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${platforms[@]}"; do args+=(--platform "$p"); done
for pkg in open_clip_torch==3.3.0 ftfy wcwidth xformers liger-kernel; do
    "$PY" -m pip download -q "${args[@]}" "$pkg"
done
ls -l .whl
