"""GRPO prompt data: conversations with ground-truth answers -> per-step `PromptBatch`es for one DP rank.

A record of the conversation format (`megatron_avar.data.conversations`) becomes a prompt as follows:
1. its messages up to, not including, the first assistant turn (an SFT record's answer is never shown);
2. ``system_prompt``, when given, replaces the record's system turn (or is added as one);
3. ``instruction``, when given, is appended to the last user turn: after a blank line to that turn's text
   when the turn ends with a text item, else as a new text item at the end of the turn (a turn ending
   with an image gets the instruction after the image, where a question is usually asked);
4. rendered with ``roles.render_conversation(..., add_generation_prompt=True)``.
The ground truth is ``str(record["answer"])`` as given (grading handles letters, numbers and LaTeX).

Order, deterministic in (the kept prompts, seed, shuffle, prompts_per_step):
- Epoch e is a permutation of the kept prompts drawn by numpy's generator seeded (seed, e). With
  shuffle=False it is the dataset order rotated to start where the previous epoch stopped (the prompts are
  one cyclic stream). It is cut into steps of ``prompts_per_step`` consecutive prompts; a tail that does
  not fill a step is left out of that epoch (counted in `summary`), so every step holds distinct prompts of
  one epoch. The tail is a new random draw each epoch, or (shuffle=False) where the next epoch starts, so
  no prompt is left out of every epoch.
- Global step s is step s % steps_per_epoch of epoch s // steps_per_epoch. Data-parallel rank r takes the
  step's prompts [r*P/dp, (r+1)*P/dp): whole prompts, so the n rollouts of a prompt (a GRPO group) are on
  one rank, and the union over ranks is the step whatever dp_size is.

Length check, once at construction and exact: every prompt's token count comes from the template text with
each image expanded to the tokens its size gives (`training.sample_plan.image_grid`, sizes read from the
image file headers: no pixels decoded), tokenized in one batched call: about 0.5 ms a prompt on one core
(1.1 s for 2,000 procedural 448x448 prompts, so ~10 s for an 18K-prompt set).
Rendering a step later re-checks the count. Images are decoded only when a step is rendered.

Resume: ``state_dict()`` holds the next step; ``load_state_dict`` on a fresh loader (any dp_size) continues
with exactly the batches an uninterrupted run would have given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_avar import roles as roles_module
from megatron_avar.config import refuse_unused_setting
from megatron_avar.grpo.interfaces import PromptBatch

__all__ = ["DEFAULT_INSTRUCTION", "GRPODataConfig", "PromptLoader", "prompt_messages", "build_prompt_processor"]

DEFAULT_INSTRUCTION = (
    "First think through the question step by step inside <think></think>, "
    "then give the final answer inside <answer></answer>."
)

_MAX_LISTED = 8  # bad records named in one error message
# The order scheme the resume state records: "cyclic" (shuffle=false epochs start where the last stopped).
# States without it come from the version whose shuffle=false order repeated the dataset order every epoch.
ORDER = "cyclic"


@dataclass(frozen=True)
class GRPODataConfig:
    """The prompts GRPO trains on. Validated on construction (ValueError naming the field)."""

    path: str
    """Conversation dataset (.jsonl/.json/.parquet file, a folder of them, or a saved canonical dataset);
    every record needs a non-empty "answer"."""
    processor_path: str | None = None
    """HF model directory whose tokenizer/image processor to use; None: the trainer fills in model.hf_path
    (`build_prompt_processor` with None gives the offline Qwen2.5-VL default)."""
    instruction: str | None = DEFAULT_INSTRUCTION
    """Appended to the last user turn (module docstring); None or "" leaves the prompt as it is."""
    system_prompt: str | None = None
    """Replaces (or adds) the system turn; None keeps the record's system turn / the template default."""
    max_prompt_length: int = 4096
    """Most tokens a rendered prompt may have (>= 1); longer ones are an error unless skip_long_prompts."""
    skip_long_prompts: bool = False
    """Drop prompts longer than max_prompt_length instead of failing (counted and named in `summary`)."""
    min_pixels: int | None = None
    """Lower pixel bound of the image processor (None: the processor's own)."""
    max_pixels: int | None = None
    """Upper pixel bound (None: the processor's own). Lower it to shorten image-heavy prompts."""
    shuffle: bool = True
    """Permute the prompts every epoch (seeded by (seed, epoch)); False: dataset order, as one cyclic stream (each
    epoch starts where the last stopped, so a tail that does not fill a step is trained in the next)."""
    seed: int = 0
    """Seed of the per-epoch permutations (>= 0); with shuffle false there are none, and another seed is refused."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path must be a non-empty path string, got {self.path!r}")
        if self.processor_path is not None and (not isinstance(self.processor_path, str) or not self.processor_path):
            raise ValueError(f"data.processor_path must be null or a path string, "
                             f"got {self.processor_path!r}")
        for name in ("instruction", "system_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"data.{name} must be null or a string, got {value!r}")
            if isinstance(value, str):
                try:
                    roles_module._check_text(value, f"data.{name}")
                except ValueError as error:
                    raise ValueError(f"{error}; write it as plain text") from None
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("data.system_prompt must be null (keep the record's) or a non-empty string")
        for name, low in (("max_prompt_length", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name} must be an int >= {low}, got {value!r}")
        for name in ("skip_long_prompts", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be true or false, got {getattr(self, name)!r}")
        from megatron_avar.processor import check_pixel_bounds

        check_pixel_bounds(self.min_pixels, self.max_pixels, prefix="data.")
        refuse_unused_setting(self, "data.seed", used=self.shuffle, here="data.shuffle=false",
                              only_with="data.shuffle=true", why="it seeds the per-epoch permutations")


def build_prompt_processor(config: GRPODataConfig, processor_path: str | None = None):
    """The processor for ``config`` (reasoning tokens added, the config's pixel bounds), from
    ``processor_path`` or else ``config.processor_path`` (None for both: the offline default)."""
    from megatron_avar.processor import load_processor

    return load_processor(processor_path or config.processor_path, min_pixels=config.min_pixels,
                          max_pixels=config.max_pixels, reasoning_tokens=True)


def prompt_messages(messages: list[dict], *, instruction: str | None, system_prompt: str | None,
                    record_id: str) -> list[dict]:
    """The prompt of a chat-format conversation (module docstring, steps 1-3); ``messages`` is not changed.

    Raises ValueError naming ``record_id`` when no user turn precedes the first assistant turn.
    """
    first_assistant = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    prompt = [{"role": m["role"], "content": _items(m["content"])} for m in messages[:first_assistant]]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(f"record {record_id!r} has no user turn before its first assistant turn; a GRPO prompt "
                         "needs a question: give it a user turn or drop the record")
    if system_prompt is not None:
        system = {"role": "system", "content": [{"type": "text", "text": system_prompt}]}
        prompt = [system] + (prompt[1:] if prompt[0]["role"] == "system" else prompt)
    if instruction:
        content = prompt[-1]["content"]
        if content and content[-1]["type"] == "text":
            text = content[-1]["text"]
            content[-1] = {"type": "text", "text": f"{text}\n\n{instruction}" if text.strip() else instruction}
        else:
            content.append({"type": "text", "text": instruction})
    return prompt


def _items(content: Any) -> list[dict]:
    """A message content as a fresh list of items (strings become one text item)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [dict(item) for item in content]


class PromptLoader:
    """Iterate ``(step, PromptBatch)`` for one data-parallel rank, forever (the trainer decides when to stop).

    Args:
        config: the data config. processor: a Qwen2.5-VL processor whose pixel bounds equal the config's
            where the config sets them (None: `build_prompt_processor(config)`).
        prompts_per_step: prompts per optimizer step over all ranks, a multiple of dp_size, at most the
            number of kept prompts. dp_rank, dp_size: this rank's data-parallel coordinates.
        dataset: the loaded canonical dataset (None: `load_conversations(config.path)`).
        max_images: the most images a prompt may have (the rollout backend's limit; vLLM's
            ``MAX_IMAGES_PER_PROMPT``); a record with more is refused by id here, not at its step.
    """

    def __init__(self, config: GRPODataConfig, processor=None, *, prompts_per_step: int, dp_rank: int = 0,
                 dp_size: int = 1, dataset=None, max_images: int | None = None):
        from megatron_avar.data.conversations import load_conversations

        for name, value in (("prompts_per_step", prompts_per_step), ("dp_size", dp_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank!r}")
        if prompts_per_step % dp_size:
            raise ValueError(f"prompts_per_step ({prompts_per_step}) must be a multiple of dp_size ({dp_size}): "
                             "every rank takes whole prompts (a GRPO group stays on one rank)")
        self.config, self.prompts_per_step, self.dp_rank, self.dp_size = config, prompts_per_step, dp_rank, dp_size
        self.max_images = max_images
        self.processor = build_prompt_processor(config) if processor is None else processor
        self._check_processor()
        self.dataset = load_conversations(config.path) if dataset is None else dataset
        self._lengths = self._prompt_lengths()  # all records, index-aligned with the dataset
        self._ids = list(self.dataset["id"])
        limit = config.max_prompt_length
        long = [i for i, n in enumerate(self._lengths) if n > limit]
        if long and not config.skip_long_prompts:
            listed = "\n  ".join(f"prompt {self._ids[i]!r}: {self._lengths[i]} tokens" for i in long[:_MAX_LISTED])
            more = f"\n  ... and {len(long) - _MAX_LISTED} more" if len(long) > _MAX_LISTED else ""
            raise ValueError(f"{len(long)} of {len(self._ids)} prompts are longer than max_prompt_length {limit}:"
                             f"\n  {listed}{more}\nraise data.max_prompt_length (to >= {max(self._lengths)}), lower "
                             "data.max_pixels, or set data.skip_long_prompts=true")
        self._skipped = [self._ids[i] for i in long]
        self._kept = [i for i, n in enumerate(self._lengths) if n <= limit]
        if prompts_per_step > len(self._kept):
            raise ValueError(f"prompts_per_step ({prompts_per_step}) exceeds the {len(self._kept)} usable prompts "
                             f"of {config.path}; lower prompts_per_step or add data")
        self.steps_per_epoch = len(self._kept) // prompts_per_step
        self.fingerprint = hashlib.sha256(json.dumps(
            [[self._ids[i] for i in self._kept], self._lengths]).encode()).hexdigest()[:32]
        self._orders: dict[int, list[int]] = {}
        self._step = 0

    @property
    def num_prompts(self) -> int:
        """Prompts used for training (records minus skipped long prompts)."""
        return len(self._kept)

    def _check_processor(self) -> None:
        size = self.processor.image_processor.size
        for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            wanted = getattr(self.config, name)
            if wanted is not None and size[key] != wanted:
                raise ValueError(f"the processor's {name} is {size[key]} but data.{name} is {wanted}; "
                                 "pass processor=None or a processor built with build_prompt_processor(config)")

    def _prompt(self, row: dict) -> list[dict]:
        from megatron_avar.data.conversations import to_chat_messages

        return prompt_messages(to_chat_messages(row), instruction=self.config.instruction,
                               system_prompt=self.config.system_prompt, record_id=row["id"])

    def _prompt_lengths(self) -> list[int]:
        """Exact rendered token count of every record's prompt (module docstring); ValueError listing every
        record without an answer or a user turn, with more images than ``max_images`` or with an image the
        processor refuses, with the fix."""
        from megatron_avar.data.conversations import dataset_rows, undecoded
        from megatron_avar.training.sample_plan import _image_size, image_grid

        processor, texts, errors = self.processor, [], []
        merge = processor.image_processor.merge_size
        for row in dataset_rows(undecoded(self.dataset)):
            answer = row["answer"]
            if answer is None or not str(answer).strip():
                errors.append(f"record {row['id']!r} has no answer: GRPO rewards need the ground truth; give it "
                              "an \"answer\" or drop it from the GRPO data")
                continue
            try:
                turns = roles_module.validate_messages(self._prompt(row), add_generation_prompt=True)
            except ValueError as error:
                errors.append(str(error) if repr(row["id"]) in str(error) else f"record {row['id']!r}: {error}")
                continue
            # the prompt's own images (not those of later turns, nor of a system turn system_prompt replaced)
            images = [item["image"] for _, items in turns for item in items if item["type"] == "image"]
            if self.max_images is not None and len(images) > self.max_images:
                errors.append(f"record {row['id']!r} has {len(images)} images in its prompt; the rollout backend "
                              f"takes at most {self.max_images} per prompt: drop it from the GRPO data or split it")
                continue
            try:  # transformers' resize refuses an extreme aspect ratio, naming no record
                grids = [image_grid(*_image_size(ref), processor.image_processor) for ref in images]
            except (ValueError, OSError, SyntaxError) as error:
                errors.append(f"record {row['id']!r}: its image cannot be a prompt image ({error})")
                continue
            counts = [t * h * w // merge**2 for t, h, w in grids]
            segments = roles_module._segments(turns, counts, processor.image_token)
            texts.append("".join(text for text, _ in segments) + roles_module.GENERATION_PROMPT)
        if errors:
            listed = "\n  ".join(errors[:_MAX_LISTED])
            more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
            raise ValueError(f"{len(errors)} of {len(self.dataset)} records of {self.config.path} cannot be GRPO "
                             f"prompts:\n  {listed}{more}")
        encoded = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def epoch_order(self, epoch: int) -> list[int]:
        """The dataset indexes of the kept prompts in epoch ``epoch``'s order (module docstring)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            if self.config.shuffle:
                permutation = np.random.default_rng((self.config.seed, epoch)).permutation(len(self._kept))
                self._orders[epoch] = [self._kept[k] for k in permutation.tolist()]
            else:  # start where epoch - 1 stopped: without the rotation its tail would never be trained
                start = epoch * self.steps_per_epoch * self.prompts_per_step % len(self._kept)
                self._orders[epoch] = self._kept[start:] + self._kept[:start]
        return self._orders[epoch]

    def step_indexes(self, step: int) -> list[int]:
        """The dataset indexes of global step ``step`` for this rank."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        start = in_epoch * self.prompts_per_step + self.dp_rank * (self.prompts_per_step // self.dp_size)
        return self.epoch_order(epoch)[start:start + self.prompts_per_step // self.dp_size]

    def summary(self) -> dict:
        """What to log at start-up."""
        kept = [self._lengths[i] for i in self._kept]
        return {"num_records": len(self._ids), "num_prompts": self.num_prompts,
                "num_skipped_long_prompts": len(self._skipped), "skipped_long_prompt_ids": list(self._skipped),
                "prompts_per_step": self.prompts_per_step, "steps_per_epoch": self.steps_per_epoch,
                "num_dropped_per_epoch": self.num_prompts - self.steps_per_epoch * self.prompts_per_step,
                "prompt_tokens_min": min(kept), "prompt_tokens_mean": float(np.mean(kept)),
                "prompt_tokens_max": max(kept), "fingerprint": self.fingerprint}

    # -------------------------------------------------------------------------------- resume state
    def state_dict(self) -> dict:
        """{"step": the next step, and what the order depends on}. The position is global, so a run may
        resume with another dp_size."""
        return {"step": self._step, "seed": self.config.seed, "shuffle": self.config.shuffle,
                "prompts_per_step": self.prompts_per_step, "fingerprint": self.fingerprint, "order": ORDER}

    def load_state_dict(self, state: dict, *, accept_data_change: bool = False) -> None:
        """Continue from a `state_dict()`; ValueError when it was made with other prompts (unless
        ``accept_data_change``: the step is then applied to these prompts) or order settings."""
        if state.get("fingerprint") != self.fingerprint and not accept_data_change:
            raise ValueError(f"the prompts of {self.config.path} differ from the checkpoint's (fingerprint "
                             f"{self.fingerprint[:12]}, the checkpoint's {str(state.get('fingerprint'))[:12]}: a "
                             "record, its prompt length, the processor or max_prompt_length changed). Resume with "
                             "the prompts the run was started with, or pass checkpoint.accept_data_change=true to "
                             "continue at the same step on these prompts")
        # the seed decides the order only with shuffle (and data.seed is refused without it, so a checkpoint of a
        # run with shuffle=false and another seed could not resume if it were compared)
        for key, mine in (("shuffle", self.config.shuffle), ("prompts_per_step", self.prompts_per_step),
                          ("seed", self.config.seed)):
            if key == "seed" and not self.config.shuffle:
                continue
            if state.get(key) != mine:
                raise ValueError(f"prompt data state has {key}={state.get(key)!r} but this loader has {mine!r}: the "
                                 "checkpoint was made with other prompts (dataset, processor, max_prompt_length) "
                                 "or order settings")
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError(f"prompt data state has step={state.get('step')!r}; expected an int >= 0")
        tail = self.num_prompts % self.prompts_per_step
        if state.get("order", "repeat") != ORDER and not self.config.shuffle and tail and not accept_data_change:
            raise ValueError(f"the checkpoint was written by a version that repeated the dataset order every epoch "
                             f"with data.shuffle=false, leaving out the same {tail} prompts each time; this version "
                             "starts each epoch where the last stopped, so resuming would repeat or skip prompts of "
                             "the current epoch. Pass checkpoint.accept_data_change=true to continue in the new "
                             "order, or start over")
        self._step = state["step"]

    # -------------------------------------------------------------------------------- iteration
    def render_step(self, step: int) -> PromptBatch:
        """This rank's prompts of global step ``step``, rendered (images decoded here)."""
        from megatron_avar.roles import render_conversation

        ids, input_ids, roles, pixels, grids, truths = [], [], [], [], [], []
        for index in self.step_indexes(step):
            try:  # the prompt's images decode here (OSError, SyntaxError: PIL decoding an image)
                row = self.dataset[index]
                rendered = render_conversation(self._prompt(row), self.processor, add_generation_prompt=True)
            except (OSError, SyntaxError, ValueError) as error:
                raise ValueError(f"prompt {self._ids[index]!r} of {self.config.path} cannot be rendered ({error}); "
                                 "fix or drop that record (`avar data validate` reads them all)") from error
            if len(rendered) != self._lengths[index]:
                raise ValueError(f"prompt {row['id']!r} renders to {len(rendered)} tokens but was counted as "
                                 f"{self._lengths[index]}; the processor changed after the loader was built")
            ids.append(row["id"])
            input_ids.append(rendered.input_ids)
            roles.append(rendered.roles)
            pixels.append(rendered.pixel_values)
            grids.append(rendered.image_grid_thw)
            truths.append(str(row["answer"]))
        return PromptBatch(prompt_ids=ids, input_ids=input_ids, roles=roles, pixel_values=pixels,
                           image_grid_thw=grids, ground_truths=truths)

    def __iter__(self) -> Iterator[tuple[int, PromptBatch]]:
        while True:
            step = self._step
            batch = self.render_step(step)
            # The position moves before the step is handed out: a checkpoint saved after training on it
            # resumes with the next step.
            self._step = step + 1
            yield step, batch
