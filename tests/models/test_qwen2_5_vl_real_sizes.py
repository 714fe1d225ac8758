"""The real 3B/7B/72B configurations, built on the meta device (no memory): the megatron model has exactly the
HF model's parameter count, and every parameter the shape the HF -> megatron mapping produces."""

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from qwen_vl_real_configs import QWEN2_5_VL_3B, QWEN2_5_VL_7B, QWEN2_5_VL_72B

REAL_CONFIGS = {"3B": QWEN2_5_VL_3B, "7B": QWEN2_5_VL_7B, "72B": QWEN2_5_VL_72B}


def _meta_models():
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import hf_to_megatron
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    results = {}
    for size, raw in REAL_CONFIGS.items():
        config = Qwen25VLConfig.from_hf(raw)
        model = Qwen25VLModel(config, MegatronSettings(params_dtype=torch.bfloat16, init_on_meta_device=True),
                              pg_collection=ProcessGroupCollection.use_mpu_process_groups())
        with torch.device("meta"):
            hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**raw))
        mapped = hf_to_megatron(hf.state_dict(), config)
        results[size] = {
            "megatron_count": sum(p.numel() for p in model.parameters()),
            "hf_count": sum(p.numel() for p in hf.parameters()),
            "devices": {p.device.type for p in model.parameters()},
            "megatron_shapes": {name: tuple(p.shape) for name, p in model.named_parameters()},
            "mapped_shapes": {name: tuple(t.shape) for name, t in mapped.items()},
        }
    return results


@pytest.fixture(scope="module")
def meta_models():
    return run_on_ranks(_meta_models, 1, timeout_s=240)[0]


@pytest.mark.parametrize("size", sorted(REAL_CONFIGS))
def test_parameter_count_equals_hf(meta_models, size):
    result = meta_models[size]
    assert result["devices"] == {"meta"}
    assert result["megatron_count"] == result["hf_count"]


@pytest.mark.parametrize("size", sorted(REAL_CONFIGS))
def test_every_parameter_has_the_mapped_shape(meta_models, size):
    result = meta_models[size]
    assert result["megatron_shapes"] == result["mapped_shapes"]


def test_published_sizes(meta_models):
    # Sanity check of the configs themselves: Qwen reports 3.75B, 8.29B and 73.4B parameters.
    billions = {size: round(meta_models[size]["hf_count"] / 1e9, 2) for size in REAL_CONFIGS}
    assert billions == {"3B": 3.75, "7B": 8.29, "72B": 73.41}
