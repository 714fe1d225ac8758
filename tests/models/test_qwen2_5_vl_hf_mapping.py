"""HF <-> megatron state-dict conversion: bit-exact round trip, megatron's grouped qkv and [gate; up]
layouts checked by hand, legacy hub names accepted, mismatches reported."""

import pytest
import torch

from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
from megatron_avar.models.qwen2_5_vl.hf_mapping import hf_to_megatron, megatron_to_hf, param_mappings
from qwen_vl_cases import tiny_hf_model


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_and_config(request):
    hf = tiny_hf_model(tie_word_embeddings=request.param)
    return hf, Qwen25VLConfig.from_hf(hf.config)


def _canonical_hf_state(hf, config):
    state = hf.state_dict()
    if config.text.tie_word_embeddings:  # save_pretrained drops the tied copy; so does the export
        del state["lm_head.weight"]
    return state


@pytest.mark.parametrize("fused_layer_norms", [False, True], ids=["local_spec", "te_spec"])
def test_round_trip_is_bit_exact(hf_and_config, fused_layer_norms):
    hf, config = hf_and_config
    state = _canonical_hf_state(hf, config)
    megatron = hf_to_megatron(state, config, fused_layer_norms=fused_layer_norms)
    back = megatron_to_hf(megatron, config, fused_layer_norms=fused_layer_norms)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # The megatron side has no more and no fewer tensors than the table says, and holds every HF value once.
    assert len(megatron) == len(param_mappings(config, fused_layer_norms=fused_layer_norms))
    assert sum(t.numel() for t in megatron.values()) == sum(t.numel() for t in state.values())


def test_tied_lm_head_is_ignored_on_input(hf_and_config):
    hf, config = hf_and_config
    megatron = hf_to_megatron(hf.state_dict(), config)
    assert ("language_model.output_layer.weight" in megatron) == (not config.text.tie_word_embeddings)


def test_language_qkv_is_grouped_per_query_group(hf_and_config):
    hf, config = hf_and_config
    text = config.text  # 4 query heads, 2 groups, head_dim 16
    layer = hf.model.language_model.layers[1].self_attn
    qkv = hf_to_megatron(hf.state_dict(), config)["language_model.decoder.layers.1.self_attention.linear_qkv.weight"]
    d = text.head_dim
    q, k, v = layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight
    expected = torch.cat([q[0:2 * d], k[0:d], v[0:d],            # group 0: q heads 0-1, k_0, v_0
                          q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])  # group 1: q heads 2-3, k_1, v_1
    assert torch.equal(qkv, expected)


def test_vision_qkv_and_swiglu_layouts(hf_and_config):
    hf, config = hf_and_config
    block = hf.model.visual.blocks[0]
    megatron = hf_to_megatron(hf.state_dict(), config)
    d = config.vision.head_dim  # 2 heads of 16
    qkv_bias = block.attn.qkv.bias  # HF rows: [q (2 heads); k; v]
    q, k, v = qkv_bias.chunk(3)
    expected = torch.cat([q[:d], k[:d], v[:d], q[d:], k[d:], v[d:]])
    assert torch.equal(megatron["vision.layers.0.self_attention.linear_qkv.bias"], expected)
    fc1 = megatron["vision.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight]))
    patch = megatron["vision.patch_embed.weight"]
    pixels = torch.randn(5, 3 * 2 * 14 * 14)
    with torch.no_grad():
        conv = hf.model.visual.patch_embed(pixels)
    torch.testing.assert_close(pixels @ patch.T, conv, rtol=1e-5, atol=1e-6)


def test_legacy_hub_names_are_accepted(hf_and_config):
    hf, config = hf_and_config
    state = hf.state_dict()
    legacy = {}
    for name, tensor in state.items():
        if name.startswith("model.visual."):
            name = name[len("model."):]
        elif name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model."):]
        legacy[name] = tensor
    assert "visual.blocks.0.attn.qkv.weight" in legacy and "model.layers.0.mlp.up_proj.weight" in legacy
    converted, reference = hf_to_megatron(legacy, config), hf_to_megatron(state, config)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_mismatched_state_dicts_are_reported(hf_and_config):
    hf, config = hf_and_config
    state = dict(hf.state_dict())
    del state["model.language_model.layers.2.mlp.up_proj.weight"]
    state["model.language_model.layers.3.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['model.language_model.layers.2.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.language_model.layers.3.mlp.up_proj.weight'\]"):
        hf_to_megatron(state, config)
    megatron = hf_to_megatron(hf.state_dict(), config)
    del megatron["vision.merger.encoder.linear_fc2.bias"]
    with pytest.raises(ValueError, match="vision.merger.encoder.linear_fc2.bias"):
        megatron_to_hf(megatron, config)
