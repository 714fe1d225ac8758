"""The three narrow interfaces the GRPO loop is written against, and the data they exchange.

    prompts ──GenerationBackend.generate(prompts, n, sampling)──> rollouts (n per prompt, grouped)
    rollouts ──Policy.log_probs_with_masses──> old log-probs [N, T] and r_visual [N] (one forward pass)
    (response, ground truth, r_visual) ──Reward.score──> RewardParts ──grpo.advantages──> advantages [N]
    (rollouts, advantages) ──Policy.train_step──> metrics;  Policy weights ──GenerationBackend.update_weights

Layout conventions shared by every implementation:
- A rollout's tokens are the rendered prompt followed by the generated response, ONE sequence; ``roles``
  gives every token its TokenRole (prompt roles from ``roles.render_conversation``; every generated token
  RESPONSE), so the policy computes masses exactly as in SFT.
- Response-token tensors [N, T]: row i is rollout i, column t its t-th generated token (the token at
  sequence position ``prompt_length + t``), padded to T = the longest response of the batch; the mask
  ``response_token_mask`` marks real columns. ``logp[i, t]`` = log π(token_t | everything before it).
- Rollouts of one prompt are contiguous and in sample order: rollout ``p * n + k`` is sample k of prompt p.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from megatron_avar.grpo.rewards import RewardParts
from megatron_avar.roles import TokenRole

__all__ = ["SamplingParams", "PromptBatch", "Rollout", "PolicyLogProbs", "Policy", "GenerationBackend", "Reward",
           "response_token_mask", "pad_response_values"]


@dataclass(frozen=True)
class SamplingParams:
    """Rollout sampling: temperature > 0, top_p in (0, 1], top_k >= 0 (0 = off), max_new_tokens >= 1 (the
    response budget; also ``loss.max_len`` for Dr. GRPO), seed (a step's samples are reproducible from it)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 2048
    seed: int = 0

    def __post_init__(self):
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}, {self.max_new_tokens}")
        for name in ("temperature", "top_p"):  # an int (temperature=2) is a float here: HF's warpers take floats only
            object.__setattr__(self, name, float(getattr(self, name)))


@dataclass
class PromptBatch:
    """Prompts of one step, rendered once (``roles.render_conversation`` without an assistant turn, with the
    generation header appended).

    prompt_ids: dataset ids, [P]. input_ids / roles: per prompt int64 [L_p] token ids and TokenRoles (no
    RESPONSE tokens). pixel_values: per prompt float [num_patches_p, patch_dim] or None (text-only);
    image_grid_thw: per prompt int64 [num_images_p, 3] or None. ground_truths: the answer strings, [P].
    """

    prompt_ids: list[str]
    input_ids: list[torch.Tensor]
    roles: list[torch.Tensor]
    pixel_values: list[torch.Tensor | None]
    image_grid_thw: list[torch.Tensor | None]
    ground_truths: list[str]

    def __post_init__(self):
        sizes = {len(self.prompt_ids), len(self.input_ids), len(self.roles), len(self.pixel_values),
                 len(self.image_grid_thw), len(self.ground_truths)}
        if len(sizes) != 1:
            raise ValueError(f"PromptBatch fields must all have one entry per prompt, got lengths {sorted(sizes)}")
        for pid, ids, roles in zip(self.prompt_ids, self.input_ids, self.roles):
            if ids.shape != roles.shape or ids.dim() != 1:
                raise ValueError(f"prompt {pid}: input_ids {tuple(ids.shape)} and roles {tuple(roles.shape)} must "
                                 "be equal 1-D shapes")
            if bool((roles == TokenRole.RESPONSE).any()):
                raise ValueError(f"prompt {pid} already holds RESPONSE tokens; render prompts without the answer")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def subset(self, first: int, end: int) -> PromptBatch:
        """Prompts [first, end) (the tensors shared, not copied)."""
        return PromptBatch(prompt_ids=self.prompt_ids[first:end], input_ids=self.input_ids[first:end],
                           roles=self.roles[first:end], pixel_values=self.pixel_values[first:end],
                           image_grid_thw=self.image_grid_thw[first:end], ground_truths=self.ground_truths[first:end])


@dataclass
class Rollout:
    """One generated response to one prompt.

    prompt_id / sample_index: which prompt, and which of its n samples (0..n-1). ground_truth: the prompt's
    answer. input_ids / roles: int64 [L] — prompt then response (module docstring); prompt_length: the
    number of prompt tokens, so the response is ``input_ids[prompt_length:]`` (roles RESPONSE there).
    response_text: the response decoded with `<think>/<answer>` tags kept and without the closing
    `<|im_end|>` (what ``grpo.rewards.score_rollout`` expects). generator_logprobs: float32 [L - prompt_length],
    log-probs of the response tokens under the generation backend's weights (to compare with the trainer's
    old log-probs; the loss uses the trainer's). finish_reason: "stop" (end of turn) or "length" (cut off at
    max_new_tokens). pixel_values / image_grid_thw: the prompt's image inputs (shared between the n samples).
    """

    prompt_id: str
    sample_index: int
    ground_truth: str
    input_ids: torch.Tensor
    roles: torch.Tensor
    prompt_length: int
    response_text: str
    generator_logprobs: torch.Tensor
    finish_reason: str
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        length = int(self.input_ids.numel())
        if self.roles.shape != self.input_ids.shape or self.input_ids.dim() != 1:
            raise ValueError(f"rollout {self.prompt_id}/{self.sample_index}: input_ids and roles must be equal 1-D "
                             "shapes")
        if not 0 < self.prompt_length < length:
            raise ValueError(f"rollout {self.prompt_id}/{self.sample_index}: prompt_length {self.prompt_length} must "
                             f"leave at least one response token in {length} tokens")
        if not bool((self.roles[self.prompt_length:] == TokenRole.RESPONSE).all()):
            raise ValueError(f"rollout {self.prompt_id}/{self.sample_index}: every generated token must have role "
                             "RESPONSE")
        if self.generator_logprobs.shape != (length - self.prompt_length,):
            raise ValueError(f"rollout {self.prompt_id}/{self.sample_index}: generator_logprobs must be "
                             f"[{length - self.prompt_length}] (one per response token), got "
                             f"{tuple(self.generator_logprobs.shape)}")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")

    @property
    def response_length(self) -> int:
        return int(self.input_ids.numel()) - self.prompt_length


def response_token_mask(rollouts: Sequence[Rollout]) -> torch.Tensor:
    """bool [N, T]: True at column t < response_length of row i (T = the longest response)."""
    lengths = torch.tensor([r.response_length for r in rollouts])
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]


def pad_response_values(values: Sequence[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    """Per-rollout 1-D response values (e.g. ``generator_logprobs``) as one [N, T] tensor, ``fill`` beyond
    each rollout's length."""
    out = torch.full((len(values), max(int(v.numel()) for v in values)), fill, dtype=values[0].dtype)
    for i, v in enumerate(values):
        out[i, :v.numel()] = v
    return out


@dataclass
class PolicyLogProbs:
    """logp: float32 [N, T] response-token log-probs (module docstring layout; 0 beyond each response).
    r_visual: float32 [N], ``grpo.visual_reward`` from the masses of the same forward pass."""

    logp: torch.Tensor
    r_visual: torch.Tensor


class Policy(Protocol):
    """The trained model (Megatron actor: TP/PP/DP inside; every method is called on every rank)."""

    def log_probs_with_masses(self, rollouts: Sequence[Rollout]) -> PolicyLogProbs:
        """Old log-probs and r_visual of ``rollouts`` in ONE no-grad forward pass (the visual-reward sink
        rides along in the AVAR layers; heads reduced over TP). Shapes: :class:`PolicyLogProbs`."""
        ...

    def log_probs(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """The log-probs alone, float32 [N, T], with no masses computed (the frozen reference policy's)."""
        ...

    def train_step(self, rollouts: Sequence[Rollout], old_logp: torch.Tensor, advantages: torch.Tensor,
                   ref_logp: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on ``grpo.loss.policy_loss`` over the rollouts (old_logp [N, T] from
        :meth:`log_probs_with_masses`, advantages [N]; ref_logp [N, T]: the frozen reference policy's log-probs
        of the same tokens, given exactly when ``loss.kl_coef > 0``); returns the loss metrics (clip fraction,
        approx KL, ratio mean / max, grad norm, ...) as floats."""
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The full (TP-gathered) weights in Hugging Face naming, for ``GenerationBackend.update_weights``."""
        ...


class GenerationBackend(Protocol):
    """Samples responses (vLLM on GPU; a local KV-cache generator on CPU). Built by name through
    ``grpo.backends``; every rank holds one. The loop calls, on every rank: ``finish_generation`` once after
    building (before the trainer's model exists), then per step ``update_weights`` -> ``prepare_generation`` ->
    ``generate`` -> ``finish_generation``, and ``close`` at the end of the run."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (Hugging Face names, full tensors) before the next ``generate``; called while
        the backend is released (vLLM: it wakes its weights alone for the copy, not its KV cache)."""
        ...

    def prepare_generation(self) -> None:
        """Take back what :meth:`finish_generation` released, after the step's refit and before ``generate``
        (vLLM: wake its KV cache up). A backend that releases nothing does nothing."""
        ...

    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> list[Rollout]:
        """n rollouts per prompt, ``len(prompts) * n`` in all, grouped by prompt in prompt order and sample
        order (rollout p * n + k is sample k of prompt p)."""
        ...

    def finish_generation(self) -> None:
        """Release what the trainer's forward passes and update need until the next step (vLLM, colocated:
        sleep, moving its weights to CPU memory and dropping its KV cache). A backend that shares nothing
        does nothing."""
        ...

    def close(self) -> None:
        """Free the backend's resources at the end of the run (also after a failed step). Idempotent."""
        ...


class Reward(Protocol):
    """Scores one response (``grpo.rewards.score_rollout`` with a fixed RewardConfig is the default)."""

    def score(self, response: str, ground_truth: str, r_visual: float) -> RewardParts:
        ...
