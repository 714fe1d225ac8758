"""GRPO advantages: each rollout's reward compared with the other rollouts of the same prompt.

Rewards come as one flat vector [num_prompts * group_size], the rollouts of prompt p at positions
p * group_size … (p + 1) * group_size - 1 (the order ``GenerationBackend.generate`` returns them in).
With μ_p and σ_p the mean and standard deviation of prompt p's rewards:

    "grpo"     (default; DeepSeekMath):  A_i = (r_i − μ_p) / (σ_p + eps)
    "dr_grpo"  (Dr. GRPO, Liu et al. 2025): A_i = r_i − μ_p
               (no division by σ_p, which up-weights prompts that are nearly always or nearly never
               solved; pair it with the "sequence_sum_norm" loss aggregation of ``grpo.loss``.)

σ_p is the sample standard deviation (Bessel-corrected, divides by n − 1), as ``torch.std`` and the
common GRPO implementations compute it; ``unbiased_std=False`` divides by n. A group whose rewards are all
equal (every rollout right, or every one wrong) carries no signal: its advantages are exactly 0 — set,
not computed, so float rounding in μ_p cannot leave a tiny non-zero value — and never NaN. Computed in
float64, returned as float32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ADVANTAGE_MODES", "group_advantages"]

ADVANTAGE_MODES = ("grpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, *, mode: str = "grpo", eps: float = 1e-6,
                     unbiased_std: bool = True) -> torch.Tensor:
    """float32 [num_prompts * group_size] advantages for ``rewards`` [num_prompts * group_size] (module
    docstring). Raises ValueError on a length that is not a multiple of ``group_size``, non-finite
    rewards, an unknown mode, or group_size < 2 with the Bessel-corrected std (undefined for one sample)."""
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGE_MODES}, got {mode!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size (rollouts per prompt) must be an integer >= 1, got {group_size!r}")
    if mode == "grpo" and unbiased_std and group_size < 2:
        raise ValueError("GRPO's std normalisation needs at least 2 rollouts per prompt (group_size >= 2); "
                         "use mode='dr_grpo' or unbiased_std=False for group_size = 1")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be a 1-D tensor of num_prompts * group_size values; got shape "
                         f"{tuple(rewards.shape)} with group_size={group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; check the reward function (r_visual must be finite)")
    grouped = rewards.detach().to(torch.float64).view(-1, group_size)          # [num_prompts, n]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if mode == "grpo":
        std = grouped.std(dim=1, keepdim=True, unbiased=unbiased_std) if group_size > 1 else torch.zeros_like(
            grouped[:, :1])
        centred = centred / (std + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, centred).reshape(-1).to(torch.float32)
