"""The scalar reward of one GRPO rollout (docs/method.md, 'Visual-anchored reward (GRPO)'):

    r = r_acc + λ_v · v · 1[r_acc > 0] + λ_f · r_format

r_acc ∈ {0, 1}: the extracted final answer equals the ground truth by ``grading.math_equal`` (numbers,
then math-verify's symbolic equivalence, then case-folded text) — the comparison the evaluation uses too.
r_format ∈ {0, 1}: the response has the `<think>…</think>\\s*<answer>…</answer>` shape
(``grading.STRICT_FORMAT``: nothing else outside the two blocks, one of each, both non-empty).
v: the rollout's visual-attention score r_visual (``grpo.visual_reward``), optionally clipped and squashed
(:class:`RewardConfig`); it is added only to correct rollouts (``gate_visual_on_correct``), so a wrong
answer cannot be rewarded for looking at the image.

Answer extraction and comparison: ``grading.RL_REWARD`` (docs/grading.md), strict on purpose — the format is
part of what is rewarded. The last ``<answer>…</answer>`` block (its last ``\\boxed{…}`` when it holds one:
"<answer>\\boxed{5}</answer>" -> "5"); else the last ``\\boxed{…}`` after the last ``</think>`` (or anywhere
without a think block); else no answer (r_acc = 0). A response whose ``<think>`` is never closed (cut off at
the generation budget) has no answer, even if its reasoning contains a ``\\boxed{}``; bare text without a
tag or a box is not graded ("…</think> so the answer is 7" earns r_acc = 0; `avar intervene` would read 7).

The response text is what the policy generated, decoded with the `<think>` / `<answer>` tags kept and
without the closing end-of-turn token (`<|im_end|>`): a trailing special token fails the format check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_avar.config import refuse_unused_setting
from megatron_avar.grading import RL_REWARD, grade, is_strictly_formatted
from megatron_avar.models.layer_sets import check_layer_set, parse_layers

__all__ = ["RewardConfig", "RewardParts", "VisualAnchoredReward", "format_reward", "transform_visual",
           "score_rollout"]


@dataclass(frozen=True)
class RewardConfig:
    """How the reward parts are combined (docs/method.md, 'Visual-anchored reward (GRPO)'; defaults are the paper's).

    lambda_visual: λ_v, weight of r_visual (>= 0). lambda_format: λ_f, weight of r_format (>= 0).
    epsilon: ε in m̄_IMG / (m̄_SYS + ε) (> 0; used by ``grpo.visual_reward``).
    visual_clip: None (default, the paper does not clip) or an upper bound c > 0: v = min(r_visual, c).
    visual_normalise: [decision] False (default) or True: v = v / (1 + v), which maps [0, ∞) onto [0, 1)
        monotonically (after the clip when both are set). r_visual is an unbounded mean of ratios
        (≈ 7.5 for Qwen2.5-VL-7B on prompt queries), so unclipped and unnormalised λ_v·v can outweigh r_acc.
    gate_visual_on_correct: add the visual term only when r_acc > 0 (the paper's rule; False adds it to
        every rollout, an ablation; refused with lambda_visual = 0, where there is no visual term to add).
    visual_layers: the decoder layers r_visual averages over, a layer set (``models.layer_sets``): "all" (the
        spec's default), "middle", "A-B", "i,j,k" or a list of 0-based layer indexes (built as AVAR layers).
    """

    lambda_visual: float = 0.3
    lambda_format: float = 0.1
    epsilon: float = 1e-6
    visual_clip: float | None = None
    visual_normalise: bool = False
    gate_visual_on_correct: bool = True
    visual_layers: str | tuple[int, ...] = "all"

    def __post_init__(self):
        for name in ("lambda_visual", "lambda_format"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"reward.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"reward.epsilon must be a finite number > 0 (an infinite one makes every r_visual 0), "
                             f"got {self.epsilon!r}")
        if self.visual_clip is not None and not (isinstance(self.visual_clip, (int, float))
                                                 and math.isfinite(self.visual_clip) and self.visual_clip > 0):
            raise ValueError(f"reward.visual_clip must be null (no clipping) or a finite number > 0, "
                             f"got {self.visual_clip!r}")
        for name in ("visual_normalise", "gate_visual_on_correct"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"reward.{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "visual_layers", check_layer_set(self.visual_layers, field="reward.visual_layers"))
        refuse_unused_setting(self, "reward.gate_visual_on_correct", used=self.lambda_visual > 0,
                              here=f"reward.lambda_visual={self.lambda_visual}", only_with="reward.lambda_visual > 0",
                              why="it gates the visual term, which λ_v = 0 leaves out")

    def layer_indexes(self, num_layers: int) -> tuple[int, ...]:
        """visual_layers resolved for a model with ``num_layers`` decoder layers (sorted, distinct)."""
        return parse_layers(self.visual_layers, num_layers, field="reward.visual_layers")


@dataclass(frozen=True)
class RewardParts:
    """One rollout's reward and its parts. accuracy, format ∈ {0, 1}; visual: v, the rollout's r_visual
    after the configured clip / normalisation, reported even when the gate drops it from ``total``;
    visual_term: what the visual term added to ``total``, λ_v·visual·gate (0 for a gated-out rollout);
    total = accuracy + visual_term + λ_f·format. answer: the extracted answer (None: none found)."""

    accuracy: float
    format: float
    visual: float
    total: float
    answer: str | None = None
    visual_term: float = 0.0


def format_reward(response: str) -> float:
    """1.0 when the whole response has the strict `<think>/<answer>` shape (``grading.STRICT_FORMAT``, both
    blocks non-empty), else 0.0."""
    return 1.0 if is_strictly_formatted(response) else 0.0


def transform_visual(r_visual: float, config: RewardConfig) -> float:
    """v: r_visual clipped at ``visual_clip`` (when set), then squashed by v / (1 + v) (when
    ``visual_normalise``). r_visual must be finite and >= 0 (a mean of ratios of probabilities)."""
    if not (math.isfinite(r_visual) and r_visual >= 0):
        raise ValueError(f"r_visual must be a finite number >= 0 (a mean of attention-mass ratios), got "
                         f"{r_visual!r}; check the masses reaching the visual-reward sink")
    value = float(r_visual)
    if config.visual_clip is not None:
        value = min(value, float(config.visual_clip))
    if config.visual_normalise:
        value = value / (1.0 + value)
    return value


def score_rollout(response_text: str, ground_truth: str, r_visual: float,
                  config: RewardConfig = RewardConfig()) -> RewardParts:
    """The reward of one rollout (module docstring). ``r_visual``: from ``grpo.visual_reward`` for this
    rollout (a Python float; 0.0 when the prompt has no image)."""
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"ground_truth must be a non-empty string, got {ground_truth!r}")
    graded = grade(response_text, ground_truth, RL_REWARD)
    accuracy = 1.0 if graded.correct else 0.0
    form = format_reward(response_text)
    visual = transform_visual(r_visual, config)
    gate = (accuracy > 0) if config.gate_visual_on_correct else True
    visual_term = config.lambda_visual * visual * gate
    total = accuracy + visual_term + config.lambda_format * form
    return RewardParts(accuracy=accuracy, format=form, visual=visual, total=total, answer=graded.answer,
                       visual_term=visual_term)


class VisualAnchoredReward:
    """The default ``grpo.interfaces.Reward``: :func:`score_rollout` with one fixed :class:`RewardConfig`."""

    def __init__(self, config: RewardConfig = RewardConfig()):
        self.config = config

    def score(self, response: str, ground_truth: str, r_visual: float) -> RewardParts:
        return score_rollout(response, ground_truth, r_visual, self.config)
