"""The GRPO policy loss: clipped policy ratio (PPO-clip), optional KL to a reference, token aggregation.

Inputs, for N rollouts padded to T response tokens (column t = the t-th generated token of the rollout):
    logp_new  float [N, T]  log π_θ(token) under the policy being trained (differentiable)
    logp_old  float [N, T]  log π_old(token) of the policy that generated the rollouts (constant)
    logp_ref  float [N, T]  log π_ref(token) of the reference policy (constant; only when kl_coef > 0)
    mask      bool  [N, T]  True on real response tokens (values elsewhere are ignored, NaN included)
    advantages float [N]    one advantage per rollout (``grpo.advantages``), the same for all its tokens

Per token (i, t), with ρ = exp(logp_new − logp_old) and A = advantages[i]:
    ℓ_pg = −min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A)
    ℓ_kl = exp(logp_ref − logp_new) − (logp_ref − logp_new) − 1   (the "k3" estimator of KL(π_θ ‖ π_ref):
           unbiased for samples from π_θ, always >= 0; Schulman, "Approximating KL divergence", 2020)
    ℓ    = ℓ_pg + kl_coef·ℓ_kl
kl_coef = 0 by default (the paper trains without a KL term); then logp_ref is not needed.
Asymmetric clip_low / clip_high ("clip-higher", DAPO) are allowed; the default is 0.2 / 0.2.

Aggregation (``aggregation``), with |m_i| the number of response tokens of rollout i:
    "token_mean":        L = Σ_i Σ_t ℓ_it / Σ_i |m_i|            every token of the batch weighs the same
    "sequence_mean":     L = (1/N) Σ_i (Σ_t ℓ_it / |m_i|)        every rollout weighs the same (GRPO paper)
    "sequence_sum_norm": L = (1/N) Σ_i Σ_t ℓ_it / max_len         Dr. GRPO: a constant normaliser, so long and
                                                                  short responses are not weighted differently
Micro-batching: the denominators Σ_i |m_i| and N are those of THIS call unless ``num_tokens`` /
``num_sequences`` give the counts of the whole global batch (then the losses of the micro-batches add up
to the loss of the global batch; DP ranks pass global counts too and their gradients are summed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_avar.config import refuse_unused_setting

__all__ = ["AGGREGATIONS", "PolicyLossConfig", "policy_loss", "k3_kl"]

AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum_norm")


@dataclass(frozen=True)
class PolicyLossConfig:
    """clip_low / clip_high: ρ is clipped to [1 − clip_low, 1 + clip_high] (clip_low in [0, 1), clip_high >= 0).
    kl_coef: weight of the k3 KL to the reference policy (>= 0; 0 = off, the paper's setting).
    aggregation: one of AGGREGATIONS (module docstring). max_len: the constant normaliser of
    "sequence_sum_norm" (the generation budget in tokens); required for that mode, refused with the others (they
    would ignore it)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    aggregation: str = "token_mean"
    max_len: int | None = None

    def __post_init__(self):
        if not (isinstance(self.clip_low, (int, float)) and 0 <= self.clip_low < 1):
            raise ValueError(f"loss.clip_low must be in [0, 1), got {self.clip_low!r}")
        if not (isinstance(self.clip_high, (int, float)) and math.isfinite(self.clip_high) and self.clip_high >= 0):
            raise ValueError(f"loss.clip_high must be a finite number >= 0, got {self.clip_high!r}")
        if not (isinstance(self.kl_coef, (int, float)) and math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"loss.kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.aggregation == "sequence_sum_norm":
            if not (isinstance(self.max_len, int) and self.max_len > 0):
                raise ValueError(f"loss.max_len must be a positive integer (the response-length budget) with "
                                 f"aggregation='sequence_sum_norm', got {self.max_len!r}")
        refuse_unused_setting(self, "loss.max_len", used=self.aggregation == "sequence_sum_norm",
                              here=f"loss.aggregation={self.aggregation}",
                              only_with="loss.aggregation=sequence_sum_norm", why="its constant normaliser")


# ρ = exp(log ρ) overflows float32 past log ρ ≈ 88.7 (an old log-prob near -90, several updates per step): the
# taken clipped term then got a NaN gradient (0 * inf through exp) and a negative advantage an infinite loss. ρ is
# computed from log ρ clamped at 20 (as verl does): far outside any clip range, where a positive advantage gets no
# gradient anyway and a negative one a bounded loss without the token's (e^20-scaled) gradient.
MAX_LOG_RATIO = 20.0


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) from samples of π: exp(d) − d − 1 with d = logp_ref − logp."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                config: PolicyLossConfig = PolicyLossConfig(), *, logp_ref: torch.Tensor | None = None,
                num_tokens: int | None = None, num_sequences: int | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) by the module docstring; the loss is a 0-dim tensor differentiable w.r.t. logp_new.

    metrics (detached 0-dim tensors on the inputs' device, means over this call's response tokens):
    clip_fraction (tokens where the clipped term is the one taken and it differs from the unclipped, i.e.
    no gradient flows: ρ > 1 + clip_high with A > 0, or ρ < 1 − clip_low with A < 0), clip_fraction_low,
    clip_fraction_high, approx_kl (k3 estimate of KL(π_old ‖ π_θ): ρ − 1 − log ρ, >= 0), ratio_mean,
    ratio_max, kl_ref (mean ℓ_kl; only when kl_coef > 0), pg_loss, num_tokens (this call's count).

    Every rollout needs a response token in ``mask``: checked here when ``num_tokens`` is None; a caller that gives
    the counts has checked its mask on the host (the check would read the device).
    """
    n, t = logp_new.shape
    if logp_old.shape != (n, t) or mask.shape != (n, t) or (logp_ref is not None and logp_ref.shape != (n, t)):
        raise ValueError(f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)}, mask "
                         f"{tuple(mask.shape)}" + ("" if logp_ref is None else f", logp_ref {tuple(logp_ref.shape)}")
                         + " must all be [N, T]")
    if advantages.shape != (n,):
        raise ValueError(f"advantages must be [N] = [{n}] (one per rollout), got {tuple(advantages.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if config.kl_coef > 0 and logp_ref is None:
        raise ValueError("loss.kl_coef > 0 needs logp_ref (the reference policy's log-probs)")
    lengths = mask.sum(1)
    # Checked when this call counts the tokens itself; a caller that gives the counts (the trainer, whose mask is
    # on the GPU) checked its mask on the host: the check is a read of the device.
    if n == 0 or (num_tokens is None and int(lengths.min()) == 0):
        raise ValueError("every rollout needs at least one response token in mask (and N >= 1)")
    total_tokens = int(lengths.sum()) if num_tokens is None else int(num_tokens)
    total_sequences = n if num_sequences is None else int(num_sequences)

    # Padding may hold anything (NaN from an empty softmax, -inf): replace it by 0 BEFORE any arithmetic,
    # so no inf / NaN appears in the forward pass nor (as 0 * NaN) in the backward pass.
    logp_new = torch.where(mask, logp_new, 0.0)
    log_ratio = logp_new - torch.where(mask, logp_old.detach(), 0.0)
    ratio = torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))
    adv = advantages.detach().to(ratio.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high) * adv
    token_loss = -torch.minimum(unclipped, clipped)
    kl = None
    if config.kl_coef > 0 and logp_ref is not None:  # (logp_ref is given whenever kl_coef > 0: checked above)
        kl = k3_kl(logp_new, torch.where(mask, logp_ref.detach(), 0.0))
        token_loss = token_loss + config.kl_coef * kl
    token_loss = torch.where(mask, token_loss, 0.0)

    if config.aggregation == "token_mean":
        loss = token_loss.sum() / total_tokens
    elif config.aggregation == "sequence_mean":
        loss = (token_loss.sum(1) / lengths.to(token_loss.dtype)).sum() / total_sequences
    else:  # sequence_sum_norm
        assert config.max_len is not None  # PolicyLossConfig requires it with this aggregation
        loss = token_loss.sum() / (config.max_len * total_sequences)

    with torch.no_grad():
        count = lengths.sum().to(ratio.dtype)
        mean = lambda x: torch.where(mask, x, 0.0).sum() / count  # noqa: E731
        high = (ratio > 1.0 + config.clip_high) & (adv > 0) & mask
        low = (ratio < 1.0 - config.clip_low) & (adv < 0) & mask
        metrics = {
            "clip_fraction": (high | low).sum() / count,
            "clip_fraction_low": low.sum() / count,
            "clip_fraction_high": high.sum() / count,
            "approx_kl": mean(ratio - 1.0 - log_ratio),
            "ratio_mean": mean(ratio),
            "ratio_max": torch.where(mask, ratio, -torch.inf).max(),
            "pg_loss": mean(-torch.minimum(unclipped, clipped)),
            "num_tokens": count,
        }
        if kl is not None:
            metrics["kl_ref"] = mean(kl)
    return loss, {k: v.detach() for k, v in metrics.items()}
