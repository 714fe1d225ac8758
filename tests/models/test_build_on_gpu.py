"""A stage built for a CUDA device has megatron allocate and initialise its parameters on the GPU
(``MegatronSettings.init_device="cuda"``): every parameter lands there, finite, with the spread of the host's
initialisation (the same init methods, other random streams). The host path stays the default everywhere else:
the layout tests rely on its same-weights-at-every-layout property, conversion on its staying off the GPU.

Tolerance on each weight's standard deviation: 15% relative. The smallest weight here has 1,024 entries, whose
sample standard deviation varies by ~1/sqrt(2n) = 2.2%; a wrong init method (the output projections' 1/sqrt(2L)
scaling missing: 0.02 instead of 0.008, or zeros) is off by 60% or more.
"""

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import tiny_hf_config

pytestmark = [pytest.mark.gpu, pytest.mark.multiprocess]


def _built_on_each_device():
    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel

    init_model_parallel(1, 1, seed=5)
    config = Qwen25VLConfig.from_hf(tiny_hf_config().to_dict())
    found = {}
    for device in (torch.device("cpu"), platform.current_device()):
        model = build_stage(config, tp=1, pp=1, dtype=torch.float32, initialize=True, device=device)
        params = dict(model.named_parameters())
        found[device.type] = {
            "devices": sorted({p.device.type for p in params.values()}),
            "finite": all(bool(torch.isfinite(p).all()) for p in params.values()),
            "std": {name: float(p.std()) for name, p in params.items() if p.dim() >= 2},
        }
    return found


def test_a_stage_built_for_the_gpu_is_initialised_there_like_the_host_one():
    found = run_on_ranks(_built_on_each_device, 1, timeout_s=300)[0]
    host, gpu = found["cpu"], found["cuda"]
    assert host["devices"] == ["cpu"] and gpu["devices"] == ["cuda"]
    assert host["finite"] and gpu["finite"]
    assert host["std"].keys() == gpu["std"].keys()
    for name, spread in host["std"].items():
        assert gpu["std"][name] == pytest.approx(spread, rel=0.15), name
