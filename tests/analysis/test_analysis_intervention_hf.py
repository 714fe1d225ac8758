"""The intervention through the role-attention hook equals HF eager attention with its logits edited by hand,
in the prefill and in cached decoding; with alpha = 0, generation is token-for-token plain HF generation."""

import pytest
import torch

from analysis_cases import role_batch, tiny_hf_model
from megatron_avar.analysis.hf_attention import RoleAttentionHook
from megatron_avar.analysis.intervention import InterventionSpec, intervention_query_mask
from megatron_avar.roles import TokenRole

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, AttentionMaskInterface  # noqa: E402
from transformers.masking_utils import eager_mask  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward, repeat_kv  # noqa: E402

HAND = {}  # what the hand-edited eager attention applies: roles, spec


def _hand_edited_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention, with the edit of docs/method.md, 'Training-free intervention', written out on the
    logits."""
    layer = getattr(module, "layer_idx", None)
    spec = HAND["spec"]
    if layer is None or spec is None or not spec.applies_to(layer):
        return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    prompt_roles = HAND["roles"]
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    roles = torch.cat([prompt_roles, torch.full((batch, kv_len - prompt_roles.shape[1]), int(TokenRole.RESPONSE))], 1)
    logits = torch.matmul(query, repeat_kv(key, module.num_key_value_groups).transpose(2, 3)) * scaling
    for b in range(batch):
        row = roles[b].tolist()
        if TokenRole.IMAGE not in row:
            continue
        first_image, sink = row.index(TokenRole.IMAGE), next(i for i, r in enumerate(row) if r >= 0)
        for t in range(q_len):
            i = kv_len - q_len + t
            if i <= first_image or row[i] not in (TokenRole.USER_TEXT, TokenRole.RESPONSE):
                continue
            for j, role in enumerate(row):
                if role == TokenRole.IMAGE:
                    gain = 1 + spec.alpha_img
                elif role == TokenRole.SYSTEM and (spec.edit_sink or j != sink):
                    gain = 1 - spec.alpha_sys
                else:
                    continue
                z = logits[b, :, t, j]
                logits[b, :, t, j] = z * gain if spec.mode == "multiplicative" else z + torch.log(torch.tensor(gain))
    logits = logits + attention_mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, repeat_kv(value, module.num_key_value_groups)).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register("avar_test_hand_edited", _hand_edited_eager)
AttentionMaskInterface.register("avar_test_hand_edited", eager_mask)

GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def setup():
    model = tiny_hf_model(num_text_layers=3)
    inputs, roles = role_batch()
    return model, inputs, roles


def _hand(model, inputs, roles, spec, generate):
    HAND.update(roles=roles, spec=spec)
    model.set_attn_implementation("avar_test_hand_edited")
    try:
        with torch.no_grad():
            return model.generate(**inputs, **GENERATE) if generate else model(**inputs).logits
    finally:
        model.set_attn_implementation("eager")


def _hooked(model, inputs, roles, spec, generate):
    with RoleAttentionHook(model) as hook, torch.no_grad():
        hook.set_batch(roles, intervention=spec)
        return model.generate(**inputs, **GENERATE) if generate else model(**inputs).logits


SPECS = [InterventionSpec(alpha_img=0.5, alpha_sys=0.6, mode="multiplicative", layers=(0, 2)),
         InterventionSpec(alpha_img=0.5, alpha_sys=0.6, mode="additive", layers=(1,)),
         InterventionSpec(alpha_img=0.3, alpha_sys=0.4, mode="additive", edit_sink=False)]


@pytest.mark.parametrize("spec", SPECS, ids=["mult-0,2", "add-1", "add-all-keep-sink"])
def test_prefill_logits_equal_hand_edited_eager(setup, spec):
    model, inputs, roles = setup
    real = inputs["attention_mask"].bool()
    hand = _hand(model, inputs, roles, spec, generate=False)
    hooked = _hooked(model, inputs, roles, spec, generate=False)
    plain = _hand(model, inputs, roles, None, generate=False)
    torch.testing.assert_close(hooked[real], hand[real], atol=2e-5, rtol=1e-5)
    # The edit is real: it moves the logits of image rows after the image, never the row without an image.
    assert (hooked[0, -1] - plain[0, -1]).abs().max() > 1e-3
    torch.testing.assert_close(hooked[2][real[2]], plain[2][real[2]], atol=2e-5, rtol=1e-5)


def test_cached_generation_equals_hand_edited_eager(setup):
    model, inputs, roles = setup
    spec = SPECS[0]
    hand = _hand(model, inputs, roles, spec, generate=True)
    hooked = _hooked(model, inputs, roles, spec, generate=True)
    assert torch.equal(hooked.sequences, hand.sequences)
    for step_hooked, step_hand in zip(hooked.scores, hand.scores):  # every decoding step's logits, from the cache
        torch.testing.assert_close(step_hooked, step_hand, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_alpha_zero_generation_is_plain_hf_generation(setup, implementation):
    model, inputs, roles = setup
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        plain = model.generate(**inputs, **GENERATE)
    zero = _hooked(model, inputs, roles, InterventionSpec(alpha_img=0.0, alpha_sys=0.0), generate=True)
    model.set_attn_implementation("eager")
    assert torch.equal(zero.sequences, plain.sequences)
    strong = _hooked(model, inputs, roles, InterventionSpec(alpha_img=1.0, alpha_sys=0.6), generate=True)
    assert not torch.equal(strong.sequences[:2], plain.sequences[:2])       # rows with an image change
    assert torch.equal(strong.sequences[2], plain.sequences[2])             # the row without one does not


def test_intervention_query_sets():
    roles = torch.tensor([[-1, 0, 0, 4, 2, 4, 1, 1, 4, 2, 2, 4, 3]])
    spec_rows = intervention_query_mask(roles, "user_text_and_response")
    all_rows = intervention_query_mask(roles, "all_after_image")
    assert spec_rows[0].nonzero().flatten().tolist() == [9, 10, 12]
    assert all_rows[0].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]


def test_spec_validation_and_tables():
    with pytest.raises(ValueError, match="alpha_sys"):
        InterventionSpec(alpha_sys=1.0)
    with pytest.raises(ValueError, match="mode"):
        InterventionSpec(mode="scaled")
    scale, bias = InterventionSpec(alpha_img=0.15, alpha_sys=0.05).role_logit_tables()
    assert bias is None and scale.tolist() == pytest.approx([0.95, 1.15, 1, 1, 1, 0.95])
    scale, bias = InterventionSpec(alpha_img=0.15, alpha_sys=0.05, mode="additive", edit_sink=False).role_logit_tables()
    assert scale is None and bias.tolist() == pytest.approx([torch.log(torch.tensor(0.95)).item(),
                                                             torch.log(torch.tensor(1.15)).item(), 0, 0, 0, 0])


def test_hook_refuses_roles_that_do_not_fit_the_batch(setup):
    model, inputs, roles = setup
    wrong_padding = roles.clone()
    wrong_padding[2, 0] = int(TokenRole.USER_TEXT)  # row 2 is left-padded: position 0 is padding
    with RoleAttentionHook(model) as hook, torch.no_grad():
        for bad, message in ((wrong_padding, "disagree on which tokens are padding"),
                             (roles[:, 1:], "exactly this batch")):
            hook.set_batch(bad)
            with pytest.raises(ValueError, match=message):
                model(**inputs)
        hook.clear_batch()
        with pytest.raises(RuntimeError, match="call set_batch"):
            model(**inputs)
    assert model.config._attn_implementation == "eager"
