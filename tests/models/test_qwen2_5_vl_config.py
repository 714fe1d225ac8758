"""Qwen25VLConfig reads HF configs (tiny, and the real 3B/7B/72B config.json layouts) and refuses what the
megatron implementation would not reproduce; the megatron TransformerConfigs carry the right fields."""

import copy

import pytest
import torch
import torch.nn.functional as F

from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig, build_transformer_configs
from qwen_vl_cases import IMAGE, tiny_hf_config
from qwen_vl_real_configs import QWEN2_5_VL_3B, QWEN2_5_VL_7B, QWEN2_5_VL_72B


def test_tiny_hf_config_fields():
    config = Qwen25VLConfig.from_hf(tiny_hf_config())
    text, vision = config.text, config.vision
    assert (text.vocab_size, text.hidden_size, text.num_layers, text.num_attention_heads) == (256, 64, 3, 4)
    assert (text.num_query_groups, text.ffn_hidden_size, text.head_dim) == (2, 128, 16)
    assert (text.rope_theta, text.rms_norm_eps, text.mrope_section) == (1e6, 1e-6, (2, 3, 3))
    assert not text.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (3, 32, 2, 64)
    assert (vision.out_hidden_size, vision.window_size, vision.fullatt_block_indexes) == (64, 56, (1,))
    assert (vision.patch_dim, vision.window_merged_tokens, vision.rope_theta) == (1176, 2, 10000.0)
    assert config.image_token_id == IMAGE
    assert Qwen25VLConfig.from_hf(tiny_hf_config(tie_word_embeddings=True)).text.tie_word_embeddings


@pytest.mark.parametrize("raw, expected", [
    (QWEN2_5_VL_3B, dict(hidden_size=2048, num_layers=36, num_query_groups=2, tie_word_embeddings=True,
                         vocab_size=151936)),
    (QWEN2_5_VL_7B, dict(hidden_size=3584, num_layers=28, num_query_groups=4, tie_word_embeddings=False,
                         vocab_size=152064)),
    (QWEN2_5_VL_72B, dict(hidden_size=8192, num_layers=80, num_query_groups=8, tie_word_embeddings=False,
                          vocab_size=152064)),
])
def test_hub_config_json_layout(tmp_path, raw, expected):
    import json

    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = Qwen25VLConfig.from_hf(tmp_path)  # a model directory
    assert config == Qwen25VLConfig.from_hf(raw)
    for field, value in expected.items():
        assert getattr(config.text, field) == value, field
    assert config.text.mrope_section == (16, 24, 24) and config.text.rope_theta == 1e6
    assert config.text.rms_norm_eps == 1e-6
    assert config.vision.fullatt_block_indexes == (7, 15, 23, 31) and config.vision.window_merged_tokens == 4
    assert config.vision.out_hidden_size == config.text.hidden_size
    assert config.image_token_id == 151655


def _with(raw, path, value):
    raw = copy.deepcopy(raw)
    *parents, leaf = path
    target = raw
    for key in parents:
        target = target[key]
    target[leaf] = value
    return raw


@pytest.mark.parametrize("path, value, message", [
    (("use_sliding_window",), True, "use_sliding_window"),
    (("rope_scaling",), {"type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]}, "rope_type='yarn'"),
    (("rope_scaling",), {"type": "mrope", "mrope_section": [16, 24, 16]}, "mrope_section"),
    (("hidden_act",), "gelu", "text hidden_act='gelu'"),
    (("vision_config", "hidden_act"), "gelu", "vision hidden_act='gelu'"),
    (("vision_config", "fullatt_block_indexes"), [7, 32], r"fullatt_block_indexes \[32\]"),
    (("vision_config", "window_size"), 100, "window_size=100"),
    (("vision_config", "out_hidden_size"), 2048, "out_hidden_size=2048"),
    (("model_type",), "qwen2_vl", "model_type='qwen2_vl'"),
])
def test_unsupported_configs_are_refused(path, value, message):
    with pytest.raises(ValueError, match=message):
        Qwen25VLConfig.from_hf(_with(QWEN2_5_VL_7B, path, value))


def test_a_config_without_model_type_is_refused():
    """Found in review: `{}` (or any config.json without model_type) read as transformers' Qwen2.5-VL defaults,
    and the error that followed blamed the defaults' vision width."""
    raw = {k: v for k, v in QWEN2_5_VL_7B.items() if k != "model_type"}
    with pytest.raises(ValueError, match="model_type=None: only 'qwen2_5_vl' is supported"):
        Qwen25VLConfig.from_hf(raw)


def test_a_config_json_of_wrong_types_is_named_in_one_line(tmp_path):
    """Found in review: a string for an int raised huggingface_hub's StrictDataclassFieldValidationError, and a
    JSON list a TypeError: tracebacks from `avar convert`, which reports ValueErrors in one line."""
    bad = _with(QWEN2_5_VL_7B, ("num_hidden_layers",), "28")
    with pytest.raises(ValueError, match=r"refused by transformers \(Validation error for field 'num_hidden_layers': "
                                         r"TypeError: .*expected int, got str.*\): fix that field of config.json"):
        Qwen25VLConfig.from_hf(bad)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json holds a JSON list, not a config object"):
        Qwen25VLConfig.from_hf(tmp_path)


def test_tensor_parallel_sizes_that_do_not_split_are_refused():
    config = Qwen25VLConfig.from_hf(QWEN2_5_VL_7B)
    build_transformer_configs(config, MegatronSettings(tensor_model_parallel_size=4))
    eight_ranks = MegatronSettings(tensor_model_parallel_size=8)
    with pytest.raises(ValueError, match="text num_query_groups=4 does not split over tensor_model_parallel_size=8"):
        build_transformer_configs(config, eight_ranks)
    build_transformer_configs(Qwen25VLConfig.from_hf(QWEN2_5_VL_72B), eight_ranks)
    # A vision MLP width of 3420 (3B/7B) = 4 * 855 does not split over 8 ranks; 72B's 3456 does.
    odd_vision = Qwen25VLConfig.from_hf(_with(QWEN2_5_VL_72B, ("vision_config", "intermediate_size"), 3420))
    with pytest.raises(ValueError, match="vision intermediate_size=3420 does not split over"):
        build_transformer_configs(odd_vision, eight_ranks)
    with pytest.raises(ValueError, match="params_dtype"):
        MegatronSettings(params_dtype=torch.float16)
    with pytest.raises(ValueError, match="init_device='tpu': allowed cpu, cuda"):
        MegatronSettings(init_device="tpu")


def test_parameters_are_built_on_the_host_unless_the_gpu_is_asked_for():
    """CPU initialisation (the same weights at any TP size) by default; megatron's GPU path on request."""
    config = Qwen25VLConfig.from_hf(QWEN2_5_VL_7B)
    host = build_transformer_configs(config, MegatronSettings())
    gpu = build_transformer_configs(config, MegatronSettings(init_device="cuda"))
    assert all(c.use_cpu_initialization for c in (host.language, host.vision, host.merger))
    assert not any(c.use_cpu_initialization for c in (gpu.language, gpu.vision, gpu.merger))


def test_megatron_transformer_configs():
    config = Qwen25VLConfig.from_hf(QWEN2_5_VL_7B)
    configs = build_transformer_configs(config, MegatronSettings(tensor_model_parallel_size=2,
                                                                 params_dtype=torch.bfloat16))
    lm, vision, merger = configs.language, configs.vision, configs.merger
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups) == (28, 3584, 28, 4)
    assert (lm.kv_channels, lm.ffn_hidden_size, lm.layernorm_epsilon) == (128, 18944, 1e-6)
    assert lm.normalization == "RMSNorm" and lm.gated_linear_unit and lm.activation_func is F.silu
    assert lm.add_qkv_bias and not lm.add_bias_linear and lm.mrope_section == [16, 24, 24]
    assert lm.bf16 and lm.params_dtype == torch.bfloat16 and lm.tensor_model_parallel_size == 2
    assert (vision.num_layers, vision.hidden_size, vision.num_attention_heads, vision.num_query_groups) == (
        32, 1280, 16, 16)
    assert vision.add_bias_linear and vision.add_qkv_bias and vision.gated_linear_unit
    assert vision.layernorm_epsilon == 1e-6 and vision.ffn_hidden_size == 3420
    assert (merger.hidden_size, merger.ffn_hidden_size) == (3584, 1280 * 4)
    assert merger.activation_func is F.gelu and not merger.gated_linear_unit and merger.add_bias_linear
    # On this CPU machine the GPU fusions default to off (they would fall back to torch.compile).
    assert not (lm.bias_activation_fusion or lm.masked_softmax_fusion or lm.apply_rope_fusion)
    # With them on (a GPU), the merger's bias+GELU stays unfused: megatron's fused GELU is the tanh approximation,
    # HF's merger the exact one. The SwiGLU fusions are exact and stay on.
    fused = build_transformer_configs(config, MegatronSettings(fused_kernels=True))
    assert fused.language.bias_activation_fusion and fused.vision.bias_activation_fusion
    assert not fused.merger.bias_activation_fusion and fused.merger.activation_func is F.gelu
