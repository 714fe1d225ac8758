"""Per-step rollout statistics of a GRPO step, summed on each data-parallel rank and reduced over DP.

Every quantity is a sum (or a max) over this rank's rollouts; :func:`reduce_rollout_stats` adds them up
over the data-parallel group (ranks of one model-parallel group hold the same rollouts and count them
once per DP rank) and turns them into means over the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_avar.grpo.interfaces import Rollout, pad_response_values, response_token_mask
from megatron_avar.grpo.rewards import RewardParts

__all__ = ["rollout_stats", "reduce_rollout_stats"]

_SUMS = ("reward/total", "reward/accuracy", "reward/format", "reward/visual", "reward/visual_term", "reward/r_visual",
         "response/length_mean", "response/truncated_fraction", "advantage/zero_fraction",
         "logprob/generator_mean_abs_diff")
_MAXES = ("response/length_max", "logprob/generator_max_abs_diff")


def rollout_stats(rollouts: Sequence[Rollout], rewards: Sequence[RewardParts], r_visual: torch.Tensor,
                  advantages: torch.Tensor, trainer_logp: torch.Tensor) -> dict[str, tuple[str, float]]:
    """name -> (kind, value) for this rank's rollouts; kind "sum" (per rollout, except the log-prob
    difference, which is summed per response token) or "max". The generator/trainer log-prob difference is
    |generator_logprobs − trainer log-probs| on the same response tokens (the rollout engine's numerics
    against the trainer's, after the refit)."""
    mask = response_token_mask(rollouts)
    generator = pad_response_values([r.generator_logprobs.float() for r in rollouts])
    diff = torch.where(mask, (generator - trainer_logp.float()).abs(), 0.0)
    lengths = torch.tensor([r.response_length for r in rollouts], dtype=torch.float64)
    stats = {
        "reward/total": sum(r.total for r in rewards), "reward/accuracy": sum(r.accuracy for r in rewards),
        "reward/format": sum(r.format for r in rewards), "reward/visual": sum(r.visual for r in rewards),
        "reward/visual_term": sum(r.visual_term for r in rewards),
        "reward/r_visual": float(r_visual.double().sum()), "response/length_mean": float(lengths.sum()),
        "response/truncated_fraction": float(sum(r.finish_reason == "length" for r in rollouts)),
        "advantage/zero_fraction": float((advantages == 0).sum()),
        "logprob/generator_mean_abs_diff": float(diff.double().sum()),
    }
    out = {name: ("sum", value) for name, value in stats.items()}
    out["response/length_max"] = ("max", float(lengths.max()))
    out["logprob/generator_max_abs_diff"] = ("max", float(diff.max()))
    out["_rollouts"] = ("sum", float(len(rollouts)))
    out["_tokens"] = ("sum", float(mask.sum()))
    return out


def reduce_rollout_stats(stats: dict[str, tuple[str, float]], *, group=None, device=None) -> dict[str, float]:
    """Means over the global batch (per rollout; per token for the mean log-prob difference) and maxima,
    reduced over ``group`` (the data-parallel group; None = no reduction)."""
    sums = torch.tensor([stats[name][1] for name in (*_SUMS, "_rollouts", "_tokens")], dtype=torch.float64,
                        device=device)
    maxes = torch.tensor([stats[name][1] for name in _MAXES], dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    sums, maxes = sums.cpu(), maxes.cpu()
    rollouts, tokens = float(sums[-2]), float(sums[-1])
    out = {name: float(sums[k]) / (tokens if name == "logprob/generator_mean_abs_diff" else rollouts)
           for k, name in enumerate(_SUMS)}
    out.update({name: float(maxes[k]) for k, name in enumerate(_MAXES)})
    out["data/rollouts"] = rollouts
    return out
