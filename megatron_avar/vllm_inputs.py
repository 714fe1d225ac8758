"""What a vLLM 0.33 engine is given for a Qwen2.5-VL prompt this project rendered, so that it sees the same
tokens and pixels as the trainer and the HF path (`avar grpo`'s vLLM rollouts, `avar eval --backend vllm`).

vLLM 0.33 always applies Qwen2.5-VL's prompt update to token prompts (each single image pad becomes
prod(grid_thw)/4 pads), and its only pre-processed image input is ``image_embeds`` (model outputs, not
``pixel_values``). So each run of pads is collapsed to one pad (:func:`collapse_image_pads`) and each image is
rebuilt exactly from its ``pixel_values`` (:func:`images_from_pixel_values`: the processor's patchify and
normalisation inverted to the uint8 image the processor resized, sides multiples of 28). vLLM's processor, given
the same min/max pixels, leaves that size unchanged (its torchvision resize would otherwise give other pixels
than the PIL processor's) and re-derives the same grid; with ``mm_device_do_normalize=False`` it normalises on
the CPU in float32, as the processor does. Pure functions, no vLLM import: tested on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["collapse_image_pads", "images_from_pixel_values", "token_prompt", "MAX_IMAGES_PER_PROMPT"]

# the images one prompt may hold: vLLM engines are started with this limit (limit_mm_per_prompt) and profile their
# memory for it, so a prompt with more is refused by vLLM; the callers refuse it first, naming the sample
MAX_IMAGES_PER_PROMPT = 8


def collapse_image_pads(input_ids: Sequence[int], image_token_id: int, image_grid_thw: torch.Tensor | None,
                        merge_size: int) -> list[int]:
    """``input_ids`` with each run of image pads replaced by ONE pad (what vLLM expands back).

    Raises ValueError unless there is one run per image whose length is prod(image_grid_thw[k]) // merge_size**2.
    """
    ids = [int(i) for i in input_ids]
    runs: list[tuple[int, int]] = []  # (start, length)
    for pos, token in enumerate(ids):
        if token == image_token_id:
            if runs and runs[-1][0] + runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((pos, 1))
    expected = [] if image_grid_thw is None else [int(torch.prod(g)) // merge_size ** 2 for g in image_grid_thw]
    if [length for _, length in runs] != expected:
        raise ValueError(f"image pad runs of lengths {[length for _, length in runs]} do not match image_grid_thw "
                         f"(expected {expected}): the prompt's ids and images disagree")
    out, cursor = [], 0
    for start, length in runs:
        out += ids[cursor:start + 1]
        cursor = start + length
    return out + ids[cursor:]


def images_from_pixel_values(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, *, image_mean, image_std,
                             rescale_factor: float, patch_size: int, temporal_patch_size: int,
                             merge_size: int) -> list[np.ndarray]:
    """The uint8 RGB images [H, W, 3] (H = 14·grid_h, W = 14·grid_w) whose Qwen2-VL preprocessing is
    ``pixel_values`` [num_patches, 3·T·14·14] (float32), inverting the processor's rescale, normalisation and
    patch layout (patches ordered (h/m, w/m, m, m), each flattened as (C, T, P, P), T copies of the frame).

    Raises ValueError when the values are not those of a uint8 image (e.g. cast to bf16 on the way), since a
    rounded reconstruction would give vLLM different pixels from the trainer's.
    """
    mean = torch.tensor(image_mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float64).view(-1, 1, 1)
    channels = mean.shape[0]
    grids = image_grid_thw.view(-1, 3).tolist()
    if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw accounts for "
                         f"{sum(t * h * w for t, h, w in grids)}")
    images, offset = [], 0
    for t, h, w in grids:
        if t != 1 or h % merge_size or w % merge_size:
            raise ValueError(f"image grid {(t, h, w)} is not a single image with sides divisible by {merge_size}")
        patches = pixel_values[offset:offset + h * w].to(torch.float64)
        offset += h * w
        patches = patches.reshape(h // merge_size, w // merge_size, merge_size, merge_size, channels,
                                  temporal_patch_size, patch_size, patch_size)[:, :, :, :, :, 0]
        image = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * patch_size, w * patch_size)
        levels = (image * std + mean) / rescale_factor
        rounded = levels.round().clamp(0, 255)
        worst = float((levels - rounded).abs().max())
        if worst > 0.05:
            raise ValueError(f"pixel_values are {worst:.2f} grey levels away from a uint8 image: pass the processor's "
                             "float32 pixel values unchanged (not cast to bf16/fp16)")
        images.append(rounded.to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
    return images



def token_prompt(input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                 image_processor, image_token_id: int) -> dict:
    """A ``vllm.TokensPrompt`` dict for a rendered prompt (``roles.render_conversation`` with the generation
    header): its ids with collapsed pads and, when it has images, the images rebuilt from ``pixel_values``."""
    from PIL import Image

    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must both be given or both be None")
    request: dict = {"prompt_token_ids": collapse_image_pads(input_ids.tolist(), image_token_id, image_grid_thw,
                                                             image_processor.merge_size)}
    if pixel_values is not None and image_grid_thw is not None:
        images = images_from_pixel_values(
            pixel_values.float().cpu(), image_grid_thw.cpu(), image_mean=image_processor.image_mean,
            image_std=image_processor.image_std, rescale_factor=image_processor.rescale_factor,
            patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
            merge_size=image_processor.merge_size)
        request["multi_modal_data"] = {"image": [Image.fromarray(image) for image in images]}
    return request
