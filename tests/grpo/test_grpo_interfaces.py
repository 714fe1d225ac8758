"""The records the GRPO interfaces exchange validate their layout, and the response-token helpers build the
[N, T] layout the loss expects (column t = the t-th generated token)."""

import pytest
import torch

from megatron_avar.grpo.interfaces import PromptBatch, Rollout, SamplingParams, pad_response_values, response_token_mask
from megatron_avar.grpo.loss import policy_loss
from megatron_avar.grpo.rewards import RewardConfig, VisualAnchoredReward, score_rollout
from megatron_avar.roles import TokenRole as R

PROMPT_ROLES = [R.SYSTEM, R.SYSTEM, R.TEMPLATE, R.IMAGE, R.USER_TEXT, R.TEMPLATE]


def _rollout(response_length, sample_index=0, **overrides):
    roles = torch.tensor([int(r) for r in PROMPT_ROLES] + [int(R.RESPONSE)] * response_length)
    fields = dict(prompt_id="p0", sample_index=sample_index, ground_truth="3", input_ids=torch.arange(roles.numel()),
                  roles=roles, prompt_length=len(PROMPT_ROLES), response_text="<think>a</think><answer>3</answer>",
                  generator_logprobs=-torch.rand(response_length), finish_reason="stop")
    fields.update(overrides)
    return Rollout(**fields)


def test_response_layout_feeds_the_loss():
    rollouts = [_rollout(n, k) for k, n in enumerate((3, 5, 1))]
    mask = response_token_mask(rollouts)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] + [False] * 4]
    old = pad_response_values([r.generator_logprobs for r in rollouts], fill=float("nan"))
    assert old.shape == (3, 5) and torch.equal(old[1], rollouts[1].generator_logprobs)
    loss, metrics = policy_loss(old.clone().requires_grad_(), old, torch.tensor([1.0, -1.0, 0.5]), mask)
    # logp_new == logp_old: ratio 1 everywhere, loss = -mean_tokens(A), nothing clipped.
    assert loss.item() == pytest.approx(-(3 * 1.0 - 5 * 1.0 + 0.5) / 9)
    assert metrics["clip_fraction"].item() == 0 and metrics["ratio_max"].item() == 1


def test_records_reject_inconsistent_layouts():
    with pytest.raises(ValueError, match="every generated token must have role RESPONSE"):
        _rollout(3, prompt_length=len(PROMPT_ROLES) - 1)
    with pytest.raises(ValueError, match="generator_logprobs must be \\[3\\]"):
        _rollout(3, generator_logprobs=torch.zeros(4))
    with pytest.raises(ValueError, match="finish_reason"):
        _rollout(3, finish_reason="eos")
    prompt_roles = torch.tensor([int(r) for r in PROMPT_ROLES])
    with pytest.raises(ValueError, match="one entry per prompt"):
        PromptBatch(["a", "b"], [prompt_roles], [prompt_roles], [None], [None], ["1"])
    with pytest.raises(ValueError, match="already holds RESPONSE"):
        PromptBatch(["a"], [prompt_roles], [torch.full_like(prompt_roles, int(R.RESPONSE))], [None], [None], ["1"])
    with pytest.raises(ValueError, match="temperature > 0"):
        SamplingParams(temperature=0)


def test_default_reward_is_score_rollout_with_its_config():
    config = RewardConfig(lambda_visual=0.5, visual_clip=2.0)
    reward = VisualAnchoredReward(config)
    response = "<think>a</think><answer>3</answer>"
    assert reward.score(response, "3", 5.0) == score_rollout(response, "3", 5.0, config)
    assert reward.score(response, "3", 5.0).total == pytest.approx(1 + 0.5 * 2.0 + 0.1)


def test_sampling_params_take_whole_numbers_as_floats():
    """Found in review: temperature=2 reached Hugging Face's TemperatureLogitsWarper as an int, which refuses it
    (the local backend raised); the config loader made floats, a direct caller need not."""
    from megatron_avar.grpo.local_backend import _RowSampler

    sampling = SamplingParams(temperature=2, top_p=1)
    assert type(sampling.temperature) is float and type(sampling.top_p) is float
    _RowSampler([torch.Generator()], sampling, [], torch.device("cpu"))  # raised before
