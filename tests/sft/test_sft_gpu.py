"""One AVAR SFT step on a CUDA GPU: the fp32 step equals the CPU's, and the bf16 step is the fp32 step within
bf16 error (megatron's mixed precision: bf16 weights and activations, fp32 main parameters and reduction).

Tolerances: fp32 on CUDA and on the CPU differ only in kernels and summation orders (~1e-7 relative; TF32 is
not used: torch's matmul default, and the role-attention kernels use IEEE fp32 dots), so the layout tests'
bounds hold: 1e-5 relative after one step, 1e-4 after an Adam update. bf16 against fp32: bf16 keeps ~3
significant digits, so 2e-2 relative on the losses and AVAR metrics, 5e-2 on the gradient norm (as the CPU
bf16 test). Runs the model's whole GPU path: megatron's CUDA schedules, the Triton role-attention kernels,
the vision encoder's SDPA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_avar.testing import run_on_ranks
from sft_cases import sft_overrides
from test_sft_layouts import COMPARED, _two_steps

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]

# The CPU run is a fresh interpreter with CUDA hidden before torch loads: run_on_ranks' forkserver, once
# started in this process, would hand its ranks this process's view of the devices.
_CPU_STEPS = """
import json, sys
import torch
assert not torch.cuda.is_available()
from megatron_avar.testing import run_on_ranks
from test_sft_layouts import _two_steps
steps = run_on_ranks(_two_steps, 1, json.loads(sys.argv[1]), [(1, 1, [])], timeout_s=400)[0][(1, 1, ())]
print("CPU_STEPS " + json.dumps(steps))
"""


def _cpu_steps(overrides: list[str]) -> list[dict]:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _CPU_STEPS, json.dumps(overrides)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("CPU_STEPS "))
    return json.loads(line.removeprefix("CPU_STEPS "))


def test_cuda_fp32_step_equals_the_cpu_step_and_bf16_is_within_bf16_error(sft_inputs, tmp_path):
    overrides = sft_overrides(sft_inputs, tmp_path / "run")
    cuda = run_on_ranks(_two_steps, 1, overrides, [(1, 1, []), (1, 1, ["train.precision=bf16"])],
                        timeout_s=400)[0]
    reference = _cpu_steps(overrides)
    fp32, bf16 = cuda[(1, 1, ())], cuda[(1, 1, ("train.precision=bf16",))]
    for step, tolerance in ((0, 1e-5), (1, 1e-4)):
        for name in COMPARED:
            print(f"step {step} {name}: cuda fp32 {fp32[step][name]:.8g} cpu {reference[step][name]:.8g} "
                  f"cuda bf16 {bf16[step][name]:.8g}")
            assert fp32[step][name] == pytest.approx(reference[step][name], rel=tolerance), (step, name)
    assert reference[0]["data/samples_with_agto_term"] > 0
    for name in ("loss/lm", "avar/l_enh", "avar/l_sup", "avar/vas"):
        assert bf16[0][name] == pytest.approx(fp32[0][name], rel=2e-2), name
    assert bf16[0]["optim/grad_norm"] == pytest.approx(fp32[0]["optim/grad_norm"], rel=5e-2)
