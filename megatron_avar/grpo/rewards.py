"""The scalar reward of one GRPO rollout (AVAR_SPEC.md §6, visual-anchored reward shaping):

    r = r_acc + λ_v · v · 1[r_acc > 0] + λ_f · r_format

r_acc ∈ {0, 1}: the extracted final answer equals the ground truth by ``eval.answers.math_equal`` (numbers,
then math-verify's symbolic equivalence, then case-folded text) — the same grader as the evaluation.
r_format ∈ {0, 1}: the response has the `<think>…</think>\\s*<answer>…</answer>` shape (:data:`FORMAT_PATTERN`).
v: the rollout's visual-attention score r_visual (``grpo.visual_reward``), optionally clipped and squashed
(:class:`RewardConfig`); it is added only to correct rollouts (``gate_visual_on_correct``), so a wrong
answer cannot be rewarded for looking at the image.

Answer extraction (:func:`extract_answer`), in order:
1. the response has an ``<answer>…</answer>`` block: the inner text of the LAST one, and inside it the
   content of the last ``\\boxed{…}`` when there is one ("<answer>\\boxed{5}</answer>" -> "5");
2. otherwise the last ``\\boxed{…}`` of the final-answer text of ``eval.answers.final_answer_text``: the
   text after the last ``</think>``, or the whole response when it has no think block;
3. otherwise no answer (r_acc = 0). A response whose ``<think>`` is never closed (cut off at the
   generation budget) has no answer, even if its reasoning contains a ``\\boxed{}``; bare text without a
   tag or a box is not graded (the policy is asked for one of the two).

The response text is what the policy generated, decoded with the `<think>` / `<answer>` tags kept and
without the closing end-of-turn token (`<|im_end|>`): a trailing special token fails the format check.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from megatron_avar.eval.answers import final_answer_text, last_boxed, math_equal

__all__ = ["RewardConfig", "RewardParts", "VisualAnchoredReward", "FORMAT_PATTERN", "format_reward", "extract_answer",
           "transform_visual", "score_rollout"]

_TAG = r"</?(?:think|answer)>"
# [decision] The format rule, matched against the WHOLE response (re.fullmatch, DOTALL):
# - optional whitespace before `<think>` and after `</answer>`, any whitespace (newlines included) between
#   `</think>` and `<answer>`, nothing else outside the two blocks;
# - exactly one think block and one answer block: neither block's content may contain another
#   `<think>`, `</think>`, `<answer>` or `</answer>` tag (so "…</answer><answer>…</answer>" fails);
# - both blocks non-empty: at least one non-whitespace character inside each (checked on the two groups,
#   which keeps the pattern free of backtracking: the tempered `.` cannot step over a tag).
FORMAT_PATTERN = re.compile(
    rf"\s*<think>((?:(?!{_TAG}).)*)</think>\s*<answer>((?:(?!{_TAG}).)*)</answer>\s*", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class RewardConfig:
    """How the reward parts are combined (AVAR_SPEC.md §6; defaults are the paper's).

    lambda_visual: λ_v, weight of r_visual (>= 0). lambda_format: λ_f, weight of r_format (>= 0).
    epsilon: ε in m̄_IMG / (m̄_SYS + ε) (> 0; used by ``grpo.visual_reward``).
    visual_clip: None (default, the paper does not clip) or an upper bound c > 0: v = min(r_visual, c).
    visual_normalise: [decision] False (default) or True: v = v / (1 + v), which maps [0, ∞) onto [0, 1)
        monotonically (after the clip when both are set). r_visual is an unbounded mean of ratios
        (≈ 7.5 for Qwen2.5-VL-7B on prompt queries), so unclipped and unnormalised λ_v·v can outweigh r_acc.
    gate_visual_on_correct: add the visual term only when r_acc > 0 (the paper's rule; False adds it to
        every rollout, an ablation).
    visual_layers: the decoder layers r_visual averages over: "all" (the spec's default) or a list of
        0-based layer indexes (they must be AVAR layers of the model).
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
        if not (isinstance(self.epsilon, (int, float)) and self.epsilon > 0):
            raise ValueError(f"reward.epsilon must be a number > 0, got {self.epsilon!r}")
        if self.visual_clip is not None and not (isinstance(self.visual_clip, (int, float))
                                                 and math.isfinite(self.visual_clip) and self.visual_clip > 0):
            raise ValueError(f"reward.visual_clip must be null (no clipping) or a finite number > 0, "
                             f"got {self.visual_clip!r}")
        for name in ("visual_normalise", "gate_visual_on_correct"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"reward.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.visual_layers, str):
            if self.visual_layers != "all":
                raise ValueError(f"reward.visual_layers must be 'all' or a list of layer indexes, got "
                                 f"{self.visual_layers!r}")
        else:
            object.__setattr__(self, "visual_layers", tuple(int(i) for i in self.visual_layers))

    def layer_indexes(self, num_layers: int) -> tuple[int, ...]:
        """visual_layers resolved for a model with ``num_layers`` decoder layers (sorted, distinct)."""
        if self.visual_layers == "all":
            return tuple(range(num_layers))
        bad = [i for i in self.visual_layers if not 0 <= i < num_layers]
        if bad or not self.visual_layers:
            raise ValueError(f"reward.visual_layers {list(self.visual_layers)}: the model has layers "
                             f"0..{num_layers - 1}")
        return tuple(sorted(set(self.visual_layers)))


@dataclass(frozen=True)
class RewardParts:
    """One rollout's reward and its parts. accuracy, format ∈ {0, 1}; visual: v, the rollout's r_visual
    after the configured clip / normalisation, reported even when the gate drops it from ``total``;
    total = accuracy + λ_v·visual·gate + λ_f·format. answer: the extracted answer (None: none found)."""

    accuracy: float
    format: float
    visual: float
    total: float
    answer: str | None = None


def format_reward(response: str) -> float:
    """1.0 when the whole response matches :data:`FORMAT_PATTERN` with both blocks non-empty, else 0.0."""
    match = FORMAT_PATTERN.fullmatch(response)
    return 1.0 if match and match.group(1).strip() and match.group(2).strip() else 0.0


def extract_answer(response: str) -> str | None:
    """The final answer of a response by the module docstring's rules; None when there is none."""
    blocks = _ANSWER_BLOCK.findall(response)
    if blocks:
        inner = blocks[-1]
        boxed = last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    final = final_answer_text(response)
    if final.text is None:  # unclosed <think>: cut off before any answer
        return None
    return last_boxed(final.text)


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
    answer = extract_answer(response_text)
    accuracy = 1.0 if answer is not None and math_equal(ground_truth, answer) else 0.0
    form = format_reward(response_text)
    visual = transform_visual(r_visual, config)
    gate = (accuracy > 0) if config.gate_visual_on_correct else True
    total = accuracy + config.lambda_visual * visual * gate + config.lambda_format * form
    return RewardParts(accuracy=accuracy, format=form, visual=visual, total=total, answer=answer)


class VisualAnchoredReward:
    """The default ``grpo.interfaces.Reward``: :func:`score_rollout` with one fixed :class:`RewardConfig`."""

    def __init__(self, config: RewardConfig = RewardConfig()):
        self.config = config

    def score(self, response: str, ground_truth: str, r_visual: float) -> RewardParts:
        return score_rollout(response, ground_truth, r_visual, self.config)
