"""Prompt-only batches of a conversation dataset for analysis (VAS prefill, intervention generate).

Each record is rendered without its final assistant turn and with the generation prompt
(`<|im_start|>assistant\\n`), so roles come from the renderer, exactly. Rows are left-padded (what
generate needs; VAS does not care), padding has role PAD (-1) and attention_mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_avar.models.hf_inference import collate_left_padded
from megatron_avar.roles import render_conversation

__all__ = ["PromptSample", "PromptBatch", "prompt_samples", "collate_prompts"]


@dataclass
class PromptSample:
    """One rendered prompt: id, the RenderedConversation (prompt only) and the ground-truth answer (or None)."""

    id: str
    rendered: object
    answer: str | None


@dataclass
class PromptBatch:
    """Left-padded batch. inputs: the model's keyword arguments (input_ids, attention_mask,
    mm_token_type_ids [B, S]; pixel_values, image_grid_thw when any image); roles int64 [B, S] (PAD = -1)."""

    ids: list[str]
    answers: list[str | None]
    inputs: dict
    roles: torch.Tensor

    def to(self, device) -> PromptBatch:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return PromptBatch(self.ids, self.answers, inputs, self.roles)


def prompt_samples(path: str | Path, processor, *, num_samples: int | None = None,
                   shard: tuple[int, int] | None = None) -> list[PromptSample]:
    """Load ``path`` (the conversation record format) and render the first ``num_samples`` records as prompts;
    ``shard=(i, n)`` keeps records i, i + n, ... of those."""
    from megatron_avar.data.conversations import load_conversations, to_chat_messages

    dataset = load_conversations(path)
    count = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    samples = []
    for index in range(count) if shard is None else range(shard[0], count, shard[1]):
        row = dataset[index]
        messages = to_chat_messages(row)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError(f"record {row['id']!r}: a prompt must end with a user turn (after dropping the final "
                             "assistant turn)")
        rendered = render_conversation(messages, processor, add_generation_prompt=True)
        samples.append(PromptSample(id=row["id"], rendered=rendered, answer=row["answer"]))
    return samples


def collate_prompts(samples: list[PromptSample], *, pad_token_id: int, image_token_id: int) -> PromptBatch:
    """Left-pad rendered prompts into one batch (see PromptBatch; ``models.hf_inference.collate_left_padded``)."""
    if not samples:
        raise ValueError("no samples to collate")
    inputs, roles = collate_left_padded([s.rendered for s in samples], pad_token_id=pad_token_id,
                                        image_token_id=image_token_id)
    return PromptBatch(ids=[s.id for s in samples], answers=[s.answer for s in samples], inputs=inputs, roles=roles)
