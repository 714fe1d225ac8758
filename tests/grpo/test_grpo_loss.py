"""The clipped policy-ratio loss equals a token-by-token computation in plain Python (math.exp, min, max) on a
hand-built batch: each aggregation mode, the k3 KL term, the clip fractions, and the gradient w.r.t. the new
log-probs (zero exactly where the clip is active)."""

import math

import pytest
import torch

from megatron_avar.grpo.loss import PolicyLossConfig, policy_loss

# 3 rollouts, up to 4 response tokens; ratios chosen on both sides of both clip bounds.
LOGP_OLD = [[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.7, -1.2, 0.0], [-2.0, -1.0, 0.0, 0.0]]
DELTA = [[0.5, -0.1, 0.05, -0.6], [0.3, -0.5, 0.0, 0.0], [-0.02, 0.4, 0.0, 0.0]]  # logp_new - logp_old
LOGP_REF = [[-1.2, -1.7, -0.6, -1.0], [-0.1, -0.9, -1.0, 0.0], [-2.5, -0.8, 0.0, 0.0]]
LENGTHS = [4, 3, 2]
ADV = [1.5, -0.8, 0.6]
CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def _tensors():
    logp_old = torch.tensor(LOGP_OLD, dtype=torch.float64)
    logp_new = (logp_old + torch.tensor(DELTA, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[t < n for t in range(4)] for n in LENGTHS])
    return logp_new, logp_old, torch.tensor(LOGP_REF, dtype=torch.float64), mask, torch.tensor(ADV, dtype=torch.float64)


def _direct(kl_coef):
    """Per-token losses, per-token gradients d loss_token / d logp_new, and the clip counts, by hand."""
    losses, grads, low, high = [], [], 0, 0
    for i, n in enumerate(LENGTHS):
        row_losses, row_grads = [], []
        for t in range(n):
            new = LOGP_OLD[i][t] + DELTA[i][t]
            ratio, a = math.exp(DELTA[i][t]), ADV[i]
            clipped_ratio = min(max(ratio, 1 - CLIP_LOW), 1 + CLIP_HIGH)
            clip_active = clipped_ratio * a < ratio * a
            low += clip_active and ratio < 1 - CLIP_LOW
            high += clip_active and ratio > 1 + CLIP_HIGH
            loss = -min(ratio * a, clipped_ratio * a)
            grad = 0.0 if clip_active else -a * ratio
            d = LOGP_REF[i][t] - new
            loss += kl_coef * (math.exp(d) - d - 1)
            grad += kl_coef * (-math.exp(d) + 1)
            row_losses.append(loss)
            row_grads.append(grad)
        losses.append(row_losses)
        grads.append(row_grads)
    return losses, grads, low, high


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sequence_sum_norm"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_loss_and_gradient_equal_the_hand_computation(aggregation, kl_coef):
    logp_new, logp_old, logp_ref, mask, adv = _tensors()
    config = PolicyLossConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_coef=kl_coef, aggregation=aggregation,
                              max_len=6 if aggregation == "sequence_sum_norm" else None)
    loss, metrics = policy_loss(logp_new, logp_old, adv, mask, config, logp_ref=logp_ref)
    loss.backward()
    losses, grads, low, high = _direct(kl_coef)
    num_tokens = sum(LENGTHS)
    weights = {  # d L / d loss_token of each token, by the docstring formulas
        "token_mean": [[1 / num_tokens] * n for n in LENGTHS],
        "sequence_mean": [[1 / (3 * n)] * n for n in LENGTHS],
        "sequence_sum_norm": [[1 / (3 * 6)] * n for n in LENGTHS],
    }[aggregation]
    expected = sum(w * x for ws, xs in zip(weights, losses) for w, x in zip(ws, xs))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    expected_grad = torch.zeros(3, 4, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            expected_grad[i, t] = weights[i][t] * grads[i][t]
    torch.testing.assert_close(logp_new.grad, expected_grad, rtol=1e-12, atol=1e-15)

    assert (low, high) == (1, 2)  # the hand-built batch exercises both bounds
    assert float(metrics["clip_fraction_low"]) == pytest.approx(low / num_tokens)
    assert float(metrics["clip_fraction_high"]) == pytest.approx(high / num_tokens)
    assert float(metrics["clip_fraction"]) == pytest.approx((low + high) / num_tokens)
    ratios = [math.exp(DELTA[i][t]) for i, n in enumerate(LENGTHS) for t in range(n)]
    assert float(metrics["ratio_mean"]) == pytest.approx(sum(ratios) / num_tokens)
    assert float(metrics["ratio_max"]) == pytest.approx(max(ratios))
    assert float(metrics["approx_kl"]) == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / num_tokens)
    if kl_coef:
        k3 = [math.exp(LOGP_REF[i][t] - LOGP_OLD[i][t] - DELTA[i][t]) - (LOGP_REF[i][t] - LOGP_OLD[i][t] - DELTA[i][t])
              - 1 for i, n in enumerate(LENGTHS) for t in range(n)]
        assert float(metrics["kl_ref"]) == pytest.approx(sum(k3) / num_tokens)
    else:
        assert "kl_ref" not in metrics


def test_padding_values_are_ignored_and_micro_batches_add_up():
    logp_new, logp_old, logp_ref, mask, adv = _tensors()
    config = PolicyLossConfig(clip_high=CLIP_HIGH, kl_coef=0.1)
    full, _ = policy_loss(logp_new, logp_old, adv, mask, config, logp_ref=logp_ref)
    poisoned_old = logp_old.masked_fill(~mask, float("nan"))
    poisoned_new = logp_new.detach().masked_fill(~mask, -float("inf")).requires_grad_()
    poisoned, _ = policy_loss(poisoned_new, poisoned_old, adv, mask, config,
                              logp_ref=logp_ref.masked_fill(~mask, float("nan")))
    poisoned.backward()
    assert poisoned.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.isfinite(poisoned_new.grad).all() and (poisoned_new.grad[~mask] == 0).all()
    # token_mean over the global batch: micro-batches normalised by the global token count add up.
    parts = [policy_loss(logp_new[rows], logp_old[rows], adv[rows], mask[rows], config, logp_ref=logp_ref[rows],
                         num_tokens=int(mask.sum()))[0] for rows in ([0], [1, 2])]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-12)


def test_a_ratio_past_float32_range_gives_a_finite_loss_and_gradient():
    """Found in review: log ρ = 94.5 (an old log-prob of -95) overflowed exp: with A > 0 the clipped term's gradient
    was NaN (0 * inf), with A < 0 the loss was inf; the run stopped blaming the learning rate."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = torch.tensor([[-95.0, -1.0]])
    for advantage, grad_of_the_clipped_token in ((1.0, 0.0), (-1.0, 0.0)):
        new = torch.tensor([[-0.5, -1.0]], requires_grad=True)
        loss, metrics = policy_loss(new, old, torch.tensor([advantage]), mask, PolicyLossConfig())
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(new.grad).all() and torch.isfinite(metrics["ratio_max"])
        assert new.grad[0, 0] == grad_of_the_clipped_token and new.grad[0, 1] == -advantage / 2
    new = torch.tensor([[-80.0, -1.0]], requires_grad=True)  # log ρ = 15: below the clamp, nothing changes
    loss, _ = policy_loss(new, old, torch.tensor([-1.0]), mask, PolicyLossConfig())
    assert loss.item() == pytest.approx((math.exp(15.0) + 1.0) / 2)


def test_bad_inputs_are_named():
    logp_new, logp_old, logp_ref, mask, adv = _tensors()
    with pytest.raises(ValueError, match="needs logp_ref"):
        policy_loss(logp_new, logp_old, adv, mask, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp_new, logp_old, adv[:2], mask)
    with pytest.raises(ValueError, match="at least one response token"):
        policy_loss(logp_new, logp_old, adv, mask & torch.tensor([True, True, False])[:, None])
    with pytest.raises(ValueError, match="loss.max_len"):
        PolicyLossConfig(aggregation="sequence_sum_norm")
    with pytest.raises(ValueError, match="loss.aggregation"):
        PolicyLossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="loss.clip_low"):
        PolicyLossConfig(clip_low=1.0)
