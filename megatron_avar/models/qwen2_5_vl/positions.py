"""Multimodal rotary positions of the language model: 3-D (t, h, w) position ids for a batch of token ids.

Qwen2.5-VL's rule (what `Qwen2_5_VLModel.get_rope_index` computes for images): text tokens take one
position, repeated on the t/h/w axes, each one more than the previous token's; the merged tokens of an
image with grid (T, H, W) patches (h = H / merge, w = W / merge tokens per frame) take
``start + (frame, row, column)`` on the three axes, where ``start`` is the position the next text token
would have had; after the image, positions continue at ``start + max(h, w)``. Padding (``attention_mask``
0) takes position 0 on every axis and is skipped when counting.
"""

from __future__ import annotations

import torch

__all__ = ["mrope_position_ids", "image_token_counts", "check_image_grids"]


def check_image_grids(image_grid_thw: torch.Tensor, spatial_merge_size: int) -> list[tuple[int, int, int]]:
    """The grids as (t, h, w) tuples; ValueError unless ``image_grid_thw`` is an integer [num_images, 3] of
    patch counts >= 1 whose h and w are multiples of ``spatial_merge_size`` (what the processor gives)."""
    if not isinstance(image_grid_thw, torch.Tensor) or image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3 \
            or image_grid_thw.dtype.is_floating_point:
        got = (f"{image_grid_thw.dtype} {tuple(image_grid_thw.shape)}" if isinstance(image_grid_thw, torch.Tensor)
               else type(image_grid_thw).__name__)
        raise ValueError(f"image_grid_thw must be an integer tensor [num_images, 3] (t, h, w in patches), got {got}")
    grids = [(int(t), int(h), int(w)) for t, h, w in image_grid_thw.tolist()]
    for t, h, w in grids:
        if min(t, h, w) < 1 or h % spatial_merge_size or w % spatial_merge_size:
            raise ValueError(f"image grid {t}x{h}x{w} is not an image the processor gives: t, h, w must be >= 1 "
                             f"and h, w multiples of spatial_merge_size={spatial_merge_size}")
    return grids


def image_token_counts(image_grid_thw: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """Number of image tokens (merged patches) per image: T * H * W / merge**2."""
    return (image_grid_thw.prod(-1) // spatial_merge_size**2).tolist()


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids for the language model's multimodal rope.

    input_ids: int [B, S]; image_grid_thw: int [num_images, 3] in patches, images in the order their tokens
    appear (sample 0 first); attention_mask: [B, S], nonzero = real token (None: no padding).
    Returns ``position_ids`` int64 [3, B, S] (axes t, h, w) and ``deltas`` int64 [B, 1] = max position + 1
    - number of real tokens (what generation adds to 1-D positions after the prompt).

    Each image's tokens must be consecutive. Raises ValueError when the image tokens and the grids disagree,
    naming the counts.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    grids = [] if image_grid_thw is None else check_image_grids(image_grid_thw, spatial_merge_size)
    counts = [t * h * w // spatial_merge_size**2 for t, h, w in grids]
    num_image_tokens = int((input_ids == image_token_id).sum())
    if attention_mask is not None:
        num_image_tokens = int(((input_ids == image_token_id) & attention_mask.bool()).sum())
    if num_image_tokens != sum(counts):
        raise ValueError(f"the batch has {num_image_tokens} image tokens but image_grid_thw describes "
                         f"{len(grids)} images with {sum(counts)} tokens in total")

    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    next_image = 0
    for b in range(batch):
        real = torch.ones(seq, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[real]
        positions, next_image = _sample_positions(ids, grids, counts, next_image, image_token_id,
                                                  spatial_merge_size, sample=b)
        position_ids[:, b, real] = positions
        deltas[b, 0] = (positions.max() + 1 - ids.numel()) if ids.numel() else 0
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def _sample_positions(ids, grids, counts, next_image, image_token_id, merge, *, sample):
    """Positions [3, n] of one sample's real tokens; consumes images from ``next_image`` on."""
    n = ids.numel()
    positions = torch.empty(3, n, dtype=torch.long)
    is_image = ids == image_token_id
    cursor, start = 0, 0  # index into ids; position the next text token takes
    while cursor < n:
        image_at = torch.nonzero(is_image[cursor:])
        text_end = cursor + int(image_at[0]) if image_at.numel() else n
        positions[:, cursor:text_end] = torch.arange(start, start + text_end - cursor)
        start += text_end - cursor
        cursor = text_end
        if cursor == n:
            break
        t, h, w = grids[next_image]
        count = counts[next_image]
        if not bool(is_image[cursor:cursor + count].all()) or cursor + count > n:
            raise ValueError(f"sample {sample}: image {next_image} (grid {t}x{h}x{w}) needs {count} consecutive "
                             f"image tokens from token {cursor}, the sample has fewer there")
        h, w = h // merge, w // merge
        frame, row, column = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        positions[:, cursor:cursor + count] = start + torch.stack([frame, row, column]).reshape(3, -1)
        start += max(h, w)
        cursor += count
        next_image += 1
    return positions, next_image
