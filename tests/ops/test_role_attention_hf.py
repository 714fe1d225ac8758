"""role_attention reproduces Hugging Face's eager attention of a (tiny, random) Qwen2.5-VL text model.

The q/k/v that each text decoder layer hands to its attention function (after the multimodal rotary
embedding) are captured through transformers' AttentionInterface; the captured function delegates to
HF's own eager attention, so the model's attention probabilities (output_attentions=True) are HF's.
Masses summed from those probabilities per key role must equal role_attention's masses.
"""

import pytest
import torch

from megatron_avar import platform
from megatron_avar.ops import role_attention, role_attention_triton

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AttentionInterface,
    AttentionMaskInterface,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.masking_utils import eager_mask  # noqa: E402
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl  # noqa: E402

NUM_ROLES = 5  # SYSTEM, IMAGE, USER_TEXT, RESPONSE, TEMPLATE (ids are all the op needs)
_captured: list[dict] = []


def _capture_then_eager(module, query, key, value, attention_mask, **kwargs):
    out, weights = modeling_qwen2_5_vl.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _captured.append(dict(layer=module.layer_idx, q=query.detach(), k=key.detach(), v=value.detach(),
                          scaling=kwargs["scaling"], out=out.detach()))
    return out, weights


AttentionInterface.register("avar_test_capture_eager", _capture_then_eager)
# A custom attention name also needs its mask format registered: otherwise transformers builds the
# sdpa-style mask (bool, or None when it relies on is_causal), which eager attention would misread.
AttentionMaskInterface.register("avar_test_capture_eager", eager_mask)


@pytest.fixture(scope="module")
def hf_attention():
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
        image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.set_attn_implementation("avar_test_capture_eager")
    # A chat-like role layout; batch row 1 is left-padded by 5 tokens.
    roles_row = [0] * 5 + [4] * 2 + [1] * 9 + [2] * 6 + [4] * 3 + [3] * 6
    seq_len = len(roles_row)
    input_ids = torch.randint(3, 300, (2, seq_len))
    attention_mask = torch.ones(2, seq_len, dtype=torch.long)
    attention_mask[1, :5] = 0
    key_roles = torch.tensor([roles_row, roles_row])
    key_roles[attention_mask == 0] = -1
    _captured.clear()
    with torch.no_grad():
        result = model(input_ids=input_ids, attention_mask=attention_mask,
                       mm_token_type_ids=torch.zeros_like(input_ids), output_attentions=True)
    layers = [dict(c) for c in _captured]
    assert [c["layer"] for c in layers] == [0, 1] and len(result.attentions) == 2
    return layers, result.attentions, key_roles


IMPLS = ["reference", "blockwise"] + (
    ["triton"] if role_attention_triton.INTERPRETING or platform.triton_gpu_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_masses_equal_hf_eager_attention_probabilities(hf_attention, impl):
    layers, attentions, key_roles = hf_attention
    real_rows = key_roles >= 0  # HF fills fully masked (padding) query rows with a uniform softmax: skip them
    for captured, probs in zip(layers, attentions):
        q, k, v = (captured[name].transpose(1, 2) for name in ("q", "k", "v"))   # HF [B, H, S, D] -> [B, S, H, D]
        out, mass = role_attention(q, k, v, key_roles, num_roles=NUM_ROLES, softmax_scale=captured["scaling"],
                                   impl=impl)
        one_hot = torch.nn.functional.one_hot(key_roles.clamp(min=0), NUM_ROLES).float() * real_rows[..., None]
        hf_mass = probs.float() @ one_hot[:, None]                                 # [B, H, S, R]
        rows = real_rows[:, None, :].expand(-1, mass.shape[1], -1)
        # fp32 on both sides, probabilities <= 1 summed over <= 31 keys: a few fp32 ulps.
        torch.testing.assert_close(mass[rows], hf_mass[rows], atol=2e-6, rtol=0)
        torch.testing.assert_close(out[real_rows], captured["out"][real_rows], atol=2e-6, rtol=1e-5)
        # The image share is a real signal here, not a constant: masses differ across heads and rows.
        assert mass[..., 1][rows].std() > 1e-3
