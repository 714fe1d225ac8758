"""Sequence packing: whole samples laid back to back in rows of exactly ``seq_length`` tokens.

No compute goes to padding beyond the short tail of each row. Inside a row every sample keeps what it
would have alone: its Qwen2.5-VL mrope positions restart at 0, its labels never point into the next
sample, and attention must be restricted to the sample (``cu_seqlens`` / ``segment_ids`` tell the
attention kernel where samples begin; THD layout in megatron's terms).

Two pieces:
- `first_fit_decreasing`: which samples go into which row (lengths only; deterministic).
- `pack_row` / `collate_rows`: the tensors of one row, and of a micro-batch of rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_avar.models.qwen2_5_vl.positions import mrope_position_ids
from megatron_avar.roles import IGNORE_INDEX, RenderedConversation, TokenRole
from megatron_avar.segments import segment_ids_from_cu_seqlens

__all__ = ["PackedRow", "PackedBatch", "pack_row", "collate_rows", "shift_labels", "first_fit_decreasing"]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token labels of ONE sample: out[t] = labels[t + 1] (the id on RESPONSE tokens, else
    IGNORE_INDEX), and IGNORE_INDEX at the last token. labels: int64 [L] unshifted, as in
    `RenderedConversation.labels`."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    return shifted


@dataclass
class PackedRow:
    """One row of exactly ``seq_length`` tokens holding whole samples back to back, then padding.

    input_ids: int64 [S], ``pad_token_id`` in the tail.
    labels: int64 [S], ALREADY SHIFTED: labels[t] = input_ids[t + 1] when t + 1 is in the same sample and
        is a RESPONSE token, else IGNORE_INDEX (-100). Never crosses a sample boundary; -100 in the tail.
    roles: int64 [S], `TokenRole` of each token (unshifted: token t's own role), PAD (-1) in the tail.
    position_ids: int64 [3, S], Qwen2.5-VL mrope positions (t, h, w) computed per sample (each sample
        starts at 0), 0 in the tail.
    cu_seqlens: int32 [num_samples + 1], sample boundaries over the real tokens: sample k is
        [cu_seqlens[k], cu_seqlens[k + 1]); cu_seqlens[-1] = num_real_tokens. The tail is not a sample.
    pixel_values: float [num_patches, patch_dim] of the row's images in token order, or None.
    image_grid_thw: int64 [num_images, 3] in the same order, or None.
    sample_ids: the dataset ``id`` of each sample, in row order (for error messages).
    has_image: per sample, whether it has at least one image (samples without one get no AGTO term).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    roles: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    sample_ids: list[str]
    has_image: list[bool]

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def num_loss_tokens(self) -> int:
        """Positions whose (shifted) label is a real token."""
        return int((self.labels != IGNORE_INDEX).sum())

    def segment_ids(self) -> torch.Tensor:
        """int64 [S]: the index of the sample each token belongs to (0..num_samples-1), -1 in the tail."""
        return segment_ids_from_cu_seqlens(self.cu_seqlens, self.seq_length)

    def cu_seqlens_padded(self) -> torch.Tensor:
        """int32 boundaries covering the whole row: `cu_seqlens`, plus the tail as one more segment when the
        row is not full (its tokens have PAD roles and IGNORE labels, so they affect nothing)."""
        if self.num_real_tokens == self.seq_length:
            return self.cu_seqlens.clone()
        return torch.cat([self.cu_seqlens, torch.tensor([self.seq_length], dtype=torch.int32)])


def pack_row(
    samples: Sequence[RenderedConversation],
    sample_ids: Sequence[str],
    *,
    seq_length: int,
    pad_token_id: int,
    image_token_id: int,
    spatial_merge_size: int,
    with_pixels: bool = True,
) -> PackedRow:
    """Lay rendered samples back to back in one row of ``seq_length`` tokens (see `PackedRow`).

    Each sample must already fit (truncate before packing); raises ValueError naming the sample ids when
    the samples do not fit together, and when a sample's image tokens disagree with its image grid.
    ``with_pixels=False``: the row's ``pixel_values`` stay None (the caller gives the images, e.g. each distinct
    one once); its ``image_grid_thw`` is the samples' as always.
    """
    if len(samples) != len(sample_ids) or not samples:
        raise ValueError(f"pack_row needs one id per sample and at least one sample, got {len(samples)} "
                         f"samples and {len(sample_ids)} ids")
    total = sum(len(sample) for sample in samples)
    if total > seq_length:
        raise ValueError(f"samples {list(sample_ids)} have {total} tokens together, more than seq_length "
                         f"{seq_length}; the packing plan is stale or wrong (delete its cache file)")
    input_ids = torch.full((seq_length,), pad_token_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    roles = torch.full((seq_length,), int(TokenRole.PAD), dtype=torch.long)
    position_ids = torch.zeros(3, seq_length, dtype=torch.long)
    boundaries, pixels, grids, has_image = [0], [], [], []
    for sample, sample_id in zip(samples, sample_ids):
        start, end = boundaries[-1], boundaries[-1] + len(sample)
        _check_image_features(sample, sample_id, image_token_id, spatial_merge_size)
        input_ids[start:end] = sample.input_ids
        labels[start:end] = shift_labels(sample.labels)
        roles[start:end] = sample.roles
        positions, _ = mrope_position_ids(sample.input_ids[None], sample.image_grid_thw,
                                          image_token_id=image_token_id, spatial_merge_size=spatial_merge_size)
        position_ids[:, start:end] = positions[:, 0]
        boundaries.append(end)
        has_image.append(sample.num_images > 0)
        if sample.num_images:
            if with_pixels:
                pixels.append(sample.pixel_values)
            grids.append(sample.image_grid_thw)
    return PackedRow(
        input_ids=input_ids,
        labels=labels,
        roles=roles,
        position_ids=position_ids,
        cu_seqlens=torch.tensor(boundaries, dtype=torch.int32),
        pixel_values=_concatenated(pixels),
        image_grid_thw=None if not grids else torch.cat(grids).long(),
        sample_ids=list(sample_ids),
        has_image=has_image,
    )


def _check_image_features(sample: RenderedConversation, sample_id: str, image_token_id: int, merge: int) -> None:
    """The image tokens must equal the vision-encoder features implied by image_grid_thw, and the patches
    must equal the grid's patch count."""
    num_tokens = int((sample.input_ids == image_token_id).sum())
    num_role_tokens = int((sample.roles == TokenRole.IMAGE).sum())
    grid = sample.image_grid_thw
    num_features = 0 if grid is None else int(grid.prod(-1).sum()) // merge**2
    num_patches = 0 if grid is None else int(grid.prod(-1).sum())
    have_patches = 0 if sample.pixel_values is None else int(sample.pixel_values.shape[0])
    if not num_tokens == num_role_tokens == num_features or have_patches != num_patches:
        raise ValueError(
            f"sample {sample_id!r}: {num_tokens} image tokens ({num_role_tokens} with the IMAGE role) but "
            f"image_grid_thw implies {num_features} features ({num_patches} patches, {have_patches} given); "
            "render it with the same processor the plan used (its merge_size and pixel bounds)"
        )


@dataclass
class PackedBatch:
    """A micro-batch of B packed rows of S tokens (what `collate_rows` returns).

    input_ids, labels, roles: int64 [B, S] (labels shifted, as in `PackedRow`).
    position_ids: int64 [3, B, S] (mrope axes first, as `mrope_position_ids` and megatron expect).
    segment_ids: int64 [B, S], the sample index within its row, -1 in the tails.
    cu_seqlens: list of B int32 tensors, row b's `PackedRow.cu_seqlens` (boundaries within the row).
    cu_seqlens_flat: int32 [N + 1], boundaries over the B*S tokens flattened row-major (THD with one
        "sequence" of B*S tokens): row b's real samples at offset b*S, each row's padding tail as one more
        segment, so cu_seqlens_flat[-1] = B*S. Use it for varlen attention over the flattened batch.
    pixel_values: [sum num_patches, patch_dim], rows' images concatenated in row order, or None.
    image_grid_thw: int64 [num_images, 3] in the same order, or None.
    sample_ids, has_image: per row, per sample (nested lists).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    roles: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: list[torch.Tensor]
    cu_seqlens_flat: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    sample_ids: list[list[str]]
    has_image: list[list[bool]]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def pin_memory(self) -> PackedBatch:
        """The batch with its tensor fields in page-locked memory (what `torch.utils.data.DataLoader`'s
        ``pin_memory=True`` calls), so their copies to the GPU can run asynchronously."""
        return dataclasses.replace(self, **{field.name: value.pin_memory() for field in dataclasses.fields(self)
                                            if isinstance(value := getattr(self, field.name), torch.Tensor)})

    @property
    def num_real_tokens(self) -> int:
        return sum(int(c[-1]) for c in self.cu_seqlens)

    @property
    def num_samples_with_image(self) -> int:
        return sum(sum(row) for row in self.has_image)


def _concatenated(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor of ``tensors`` (None for none), without copying a single one (a micro-batch of one row: its
    pixels are often hundreds of MB)."""
    return None if not tensors else tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def collate_rows(rows: Sequence[PackedRow]) -> PackedBatch:
    """Stack packed rows of equal length into a `PackedBatch` (see its docstring for shapes)."""
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    seq_length = rows[0].seq_length
    if any(row.seq_length != seq_length for row in rows):
        raise ValueError(f"rows of different lengths {[row.seq_length for row in rows]} cannot be stacked")
    flat = [torch.zeros(1, dtype=torch.int32)]
    for b, row in enumerate(rows):
        flat.append(row.cu_seqlens_padded()[1:] + b * seq_length)
    pixels = [row.pixel_values for row in rows if row.pixel_values is not None]
    grids = [row.image_grid_thw for row in rows if row.image_grid_thw is not None]
    return PackedBatch(
        input_ids=torch.stack([row.input_ids for row in rows]),
        labels=torch.stack([row.labels for row in rows]),
        roles=torch.stack([row.roles for row in rows]),
        position_ids=torch.stack([row.position_ids for row in rows], dim=1),
        segment_ids=torch.stack([row.segment_ids() for row in rows]),
        cu_seqlens=[row.cu_seqlens for row in rows],
        cu_seqlens_flat=torch.cat(flat).to(torch.int32),
        pixel_values=_concatenated(pixels),
        image_grid_thw=_concatenated(grids),
        sample_ids=[list(row.sample_ids) for row in rows],
        has_image=[list(row.has_image) for row in rows],
    )


def first_fit_decreasing(lengths: Sequence[int], order: Sequence[int], seq_length: int,
                         buffer_size: int) -> list[list[int]]:
    """Pack samples into rows of at most ``seq_length`` tokens; return rows as lists of sample indexes.

    ``order`` (a permutation of sample indexes, e.g. shuffled per epoch) is cut into consecutive buffers
    of ``buffer_size`` samples; within a buffer, samples are taken longest first (ties: earlier in
    ``order`` first) and each goes into the first open row of that buffer with room, else a new row. Rows
    are closed at the end of each buffer, so a row never mixes buffers. Every index of ``order`` lands in
    exactly one row; within a row, samples are listed in the order they were placed. Deterministic.
    Raises ValueError when a sample is longer than ``seq_length`` (truncate it first).
    """
    if seq_length < 1 or buffer_size < 1:
        raise ValueError(f"seq_length ({seq_length}) and buffer_size ({buffer_size}) must be >= 1")
    rows: list[list[int]] = []
    for begin in range(0, len(order), buffer_size):
        buffer = list(order[begin:begin + buffer_size])
        ranked = sorted(range(len(buffer)), key=lambda k: (-lengths[buffer[k]], k))
        open_rows: list[list[int]] = []
        free: list[int] = []
        for k in ranked:
            index = buffer[k]
            length = lengths[index]
            if length > seq_length:
                raise ValueError(f"sample {index} has {length} tokens, more than seq_length {seq_length}")
            for slot, room in enumerate(free):
                if length <= room:
                    open_rows[slot].append(index)
                    free[slot] -= length
                    break
            else:
                open_rows.append([index])
                free.append(seq_length - length)
        rows.extend(open_rows)
    return rows
