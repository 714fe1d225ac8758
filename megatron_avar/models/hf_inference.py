"""Hugging Face Qwen2.5-VL inference, the pieces every HF caller shares: `avar eval`'s HF generation
(``eval/generation.py``), the GRPO local rollout backend (``grpo/local_backend.py``; its stop set is also the
vLLM backend's) and `avar vas` / `avar intervene` (``analysis/``).

* :func:`resolve_dtype` and :func:`load_model`: the weights' dtype ("auto" = bfloat16 on CUDA, float32 on the
  CPU) and ``Qwen2_5_VLForConditionalGeneration`` loaded in eval mode on a device (or spread by a device map),
  after its weight files are checked whole (``models.hf_weights``).
* :func:`stop_token_ids`: a response ends at the first of the checkpoint's generation eos ids, the tokenizer's
  eos and ``<|im_end|>`` (the end of a chat turn, which a checkpoint's generation config may not list).
  :func:`cut_at_stop` keeps what comes before it.
* :func:`pad_token_id`: the generation config's pad id, else the tokenizer's, else the first stop id.
* :func:`decoding_config`: a ``GenerationConfig`` that decodes exactly as asked, whatever the checkpoint's
  generation_config.json holds.
* :func:`left_padded_inputs` / :func:`collate_left_padded`: prompts of different lengths left-padded (what
  ``generate`` needs), with ``mm_token_type_ids`` (:func:`mm_token_type_ids`): without it Qwen2.5-VL silently
  uses 1-D positions for the image tokens (docs/installation.md, 'Known dependency quirks').

Imports torch and transformers only; nothing here imports megatron.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_avar.models.hf_weights import check_weights_readable
from megatron_avar.roles import TokenRole

__all__ = ["DTYPES", "END_OF_TURN", "resolve_dtype", "load_model", "token_id", "stop_token_ids", "pad_token_id",
           "decoding_config", "cut_at_stop", "mm_token_type_ids", "left_padded_inputs", "collate_left_padded"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
END_OF_TURN = "<|im_end|>"


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype named by ``name`` (one of DTYPES); "auto" is bfloat16 on a CUDA ``device``, float32
    elsewhere. ValueError for another name."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {DTYPES}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(path: str | Path, *, device: str | torch.device, dtype: torch.dtype, device_map: str | None = None):
    """``Qwen2_5_VLForConditionalGeneration`` of the HF directory ``path`` in ``dtype``, in eval mode, on
    ``device``; with ``device_map`` (e.g. "auto") spread over the visible GPUs by accelerate instead (a one-line
    ValueError first when accelerate is missing). A truncated or damaged weight file is a one-line ValueError naming
    it and the fix (``hf_weights.check_weights_readable``, the safetensors headers only), checked first:
    safetensors' own error out of ``from_pretrained`` names no file."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import import_utils

    if device_map is not None and not import_utils.is_accelerate_available():
        raise ValueError(f"--device-map {device_map} needs accelerate>={import_utils.ACCELERATE_MIN_VERSION}, which is "
                         "not installed: pip install accelerate (the gpu extra has it), or leave --device-map out "
                         "to load the model on one device")
    check_weights_readable(path)
    kwargs: dict[str, Any] = {} if device_map is None else {"device_map": device_map}
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=dtype, **kwargs)
    if device_map is None:
        # transformers defines `to` through functools.wraps(Module.to), whose static type is no longer a bound method
        model.to(device)  # pyright: ignore[reportArgumentType]
    return model.eval()


def token_id(tokenizer, token: str) -> int:
    """The id of the special token ``token``; ValueError when the tokenizer lacks it (not a Qwen2.5-VL one)."""
    found = tokenizer.convert_tokens_to_ids(token)
    if found is None or found == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: not a Qwen2.5-VL processor")
    return int(found)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Sorted ids that end a response: ``generation_config.eos_token_id`` (an id or a list; a
    ``transformers.GenerationConfig``, None for none), the tokenizer's eos and ``<|im_end|>``."""
    eos = None if generation_config is None else generation_config.eos_token_id
    ids = {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids | {token_id(tokenizer, END_OF_TURN)})


def pad_token_id(tokenizer, generation_config=None) -> int:
    """The id that fills padding: the generation config's pad id, else the tokenizer's, else the first stop id.
    Padding is masked (attention_mask 0), so the value never changes a result; ``generate`` also fills
    finished rows with it."""
    pad = None if generation_config is None else generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = stop_token_ids(tokenizer, generation_config)[0]
    return int(pad)


def decoding_config(*, max_new_tokens: int, pad_token_id: int, stop_ids: Collection[int], do_sample: bool = False,
                    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None):
    """A fresh ``transformers.GenerationConfig`` for ``generate(generation_config=...)``: greedy unless
    ``do_sample``, no repetition penalty. Built from scratch and with every sampling field given, because
    transformers fills a field left unset from the checkpoint's generation_config.json (Qwen2.5-VL-Instruct ships
    do_sample, top_k=1, top_p=0.001, repetition_penalty=1.05). top_k 0 = off."""
    from transformers import GenerationConfig

    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample \
        else dict(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=1.0,
                            pad_token_id=pad_token_id, eos_token_id=sorted(stop_ids), **sampling)


def cut_at_stop(ids: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    """The tokens of a generated response before its first stop token (all of them when none)."""
    ids = list(ids)
    return next((ids[:k] for k, token in enumerate(ids) if token in stop_ids), ids)


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, S]: 1 at image tokens, 0 elsewhere and on padding (``attention_mask`` 0)."""
    types = (input_ids == image_token_id).long()
    return types if attention_mask is None else types * attention_mask.long()


def left_padded_inputs(rows: Sequence[torch.Tensor], *, pad_token_id: int, image_token_id: int) -> dict:
    """``input_ids`` (padding ``pad_token_id``), ``attention_mask`` (0 on padding) and ``mm_token_type_ids``,
    each int64 [B, S], S the longest row, of token-id rows [S_b] left-padded."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row):] = row
        attention_mask[b, length - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "mm_token_type_ids": mm_token_type_ids(input_ids, image_token_id, attention_mask)}


def collate_left_padded(rendered: Sequence, *, pad_token_id: int, image_token_id: int) -> tuple[dict, torch.Tensor]:
    """(the model's keyword arguments, roles) of rendered prompts (``roles.RenderedConversation``), left-padded:
    :func:`left_padded_inputs`, plus ``pixel_values`` / ``image_grid_thw`` of the rows with images
    concatenated in row order (when any row has one); roles int64 [B, S], ``TokenRole.PAD`` (-1) on padding."""
    if not rendered:
        raise ValueError("no prompts to collate")
    inputs = left_padded_inputs([r.input_ids for r in rendered], pad_token_id=pad_token_id,
                                image_token_id=image_token_id)
    roles = torch.full(inputs["input_ids"].shape, int(TokenRole.PAD), dtype=torch.long)
    for b, r in enumerate(rendered):
        roles[b, roles.shape[1] - len(r.roles):] = r.roles
    with_images = [r for r in rendered if r.pixel_values is not None]
    if with_images:
        inputs["pixel_values"] = torch.cat([r.pixel_values for r in with_images])
        inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in with_images])
    return inputs, roles
