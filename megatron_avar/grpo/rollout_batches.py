"""Rollouts as the policy's micro-batches: whole rollouts packed into rows, and the way back from a row's
per-position values to the [N, T] response-token layout of ``grpo.interfaces``.

A rollout is one sample of ``training.packing`` (prompt + response, one sequence, its own mrope positions and
block-diagonal attention); its labels are its response tokens, so the packed row's shifted labels mark
exactly the positions whose next-token log-prob is a response log-prob: position p of a row predicts the
token at p + 1, and the positions with a label are, row-major, the response tokens of the row's rollouts in
segment order and token order. Each micro-batch is ONE row of ``seq_length`` tokens (fixed shapes, as the
pipeline schedules need; the THD attention path costs nothing for the row's padding tail).

A prompt's n rollouts share its images. Rows keep a prompt's rollouts together where they fit
(:func:`pack_groups`), and a row holds each distinct image once, with ``image_sources`` telling the model which
one each image of the row is: the vision encoder runs once per image per row, not once per rollout (at n = 8 and
~1.5k image tokens a prompt, the encoder is ~15% of a Qwen2.5-VL-7B rollout's FLOPs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_avar.grpo.interfaces import Rollout
from megatron_avar.roles import IGNORE_INDEX, RenderedConversation, TokenRole
from megatron_avar.training.packing import PackedBatch, collate_rows, pack_row

__all__ = ["RolloutMicroBatch", "pack_rollouts", "pack_groups", "scatter_response_values"]


@dataclass
class RolloutMicroBatch:
    """One packed row of rollouts. batch: the ``PackedBatch`` (B = 1), whose ``pixel_values`` /
    ``image_grid_thw`` hold the row's distinct images. rollouts: the indexes (into the list given to
    :func:`pack_rollouts`) of the row's rollouts in segment order — the order of
    ``grpo.visual_reward.ResponseTokens`` and of the row's labelled positions. response_lengths: their
    response lengths (labelled positions per rollout). image_sources: for each image of the row in token order,
    the distinct image it is (the model's ``image_sources``)."""

    batch: PackedBatch
    rollouts: list[int]
    response_lengths: list[int]
    image_sources: list[int] = dataclasses.field(default_factory=list)

    def response_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rollout, column) of each labelled position of the row, in row order: int64 [N_t] each, on the host
        (where :func:`scatter_response_values` puts each value)."""
        lengths = torch.tensor(self.response_lengths)
        return (torch.repeat_interleave(torch.arange(len(lengths)), lengths),
                torch.cat([torch.arange(length) for length in self.response_lengths]))


def _as_sample(rollout: Rollout) -> RenderedConversation:
    labels = torch.where(rollout.roles == TokenRole.RESPONSE, rollout.input_ids, IGNORE_INDEX)
    return RenderedConversation(rollout.input_ids, rollout.roles, labels, rollout.pixel_values,
                                rollout.image_grid_thw, text="")


def pack_rollouts(rollouts: Sequence[Rollout], *, seq_length: int, pad_token_id: int, image_token_id: int,
                  spatial_merge_size: int) -> list[RolloutMicroBatch]:
    """Pack ``rollouts`` whole into rows of ``seq_length`` tokens (:func:`pack_groups`, a prompt's rollouts
    together; deterministic), one :class:`RolloutMicroBatch` per row, each distinct image of a row once. Raises
    ValueError naming the rollout when one is longer than ``seq_length`` or holds image tokens its image grid
    does not account for (e.g. a generated ``<|image_pad|>``)."""
    if not rollouts:
        raise ValueError("pack_rollouts needs at least one rollout")
    lengths = [int(r.input_ids.numel()) for r in rollouts]
    for rollout, length in zip(rollouts, lengths):
        if length > seq_length:
            raise ValueError(f"rollout {rollout.prompt_id}/{rollout.sample_index} has {length} tokens, more than "
                             f"the packed row's {seq_length}: raise train.seq_length (or lower "
                             "data.max_prompt_length / rollout.max_new_tokens)")
        generated_images = int((rollout.input_ids[rollout.prompt_length:] == image_token_id).sum())
        if generated_images:
            raise ValueError(f"rollout {rollout.prompt_id}/{rollout.sample_index} generated {generated_images} "
                             "<|image_pad|> tokens, which have no image features: the generation backend must "
                             "forbid vision special tokens")
    rows = pack_groups(lengths, [rollout.prompt_id for rollout in rollouts], seq_length)
    out = []
    for row in rows:
        samples = [_as_sample(rollouts[i]) for i in row]
        ids = [f"{rollouts[i].prompt_id}/{rollouts[i].sample_index}" for i in row]
        packed = pack_row(samples, ids, seq_length=seq_length, pad_token_id=pad_token_id,
                          image_token_id=image_token_id, spatial_merge_size=spatial_merge_size, with_pixels=False)
        pixels, grids, sources = _distinct_images([rollouts[i] for i in row])
        batch = dataclasses.replace(collate_rows([packed]), pixel_values=pixels, image_grid_thw=grids)
        out.append(RolloutMicroBatch(batch=batch, rollouts=list(row),
                                     response_lengths=[rollouts[i].response_length for i in row],
                                     image_sources=sources))
    return out


def pack_groups(lengths: Sequence[int], groups: Sequence[str], seq_length: int) -> list[list[int]]:
    """Rows (lists of indexes into ``lengths``) of at most ``seq_length`` tokens that keep each group (a prompt's
    rollouts) together where they fit: groups by total length, longest first (ties: first seen first), each
    group's members longest first; a member goes into the first row that holds its group and has room, else the
    first row with room, else a new one. Deterministic. Together, a prompt's images are encoded once per row
    (module docstring)."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = sorted(members, key=lambda group: -sum(lengths[i] for i in members[group]))  # stable: first seen first
    rows: list[list[int]] = []
    room: list[int] = []
    holds: list[set[str]] = []
    for group in order:
        for index in sorted(members[group], key=lambda i: -lengths[i]):
            fits = [r for r in range(len(rows)) if room[r] >= lengths[index]]
            target = next((r for r in fits if group in holds[r]), fits[0] if fits else None)
            if target is None:
                rows.append([])
                room.append(seq_length)
                holds.append(set())
                target = len(rows) - 1
            rows[target].append(index)
            room[target] -= lengths[index]
            holds[target].add(group)
    return rows


def _distinct_images(rollouts: Sequence[Rollout]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
    """(pixel_values, image_grid_thw) of the distinct images of a row's rollouts (the n samples of a prompt share
    its image tensors: each is kept once), and for each image of the row in token order the index of the distinct
    image it is (the model's ``image_sources``)."""
    pixels, grids, sources = [], [], []
    first_image: dict[int, int] = {}  # id of a rollout's pixel tensor -> index of its first image among distinct
    for rollout in rollouts:
        if rollout.pixel_values is None or rollout.image_grid_thw is None:
            continue
        key = id(rollout.pixel_values)
        if key not in first_image:
            first_image[key] = len(grids)
            pixels.append(rollout.pixel_values)
            grids.extend(rollout.image_grid_thw.long())
        sources.extend(range(first_image[key], first_image[key] + rollout.image_grid_thw.shape[0]))
    if not grids:
        return None, None, []
    return (pixels[0] if len(pixels) == 1 else torch.cat(pixels)), torch.stack(grids), sources


def scatter_response_values(values: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor], num_rollouts: int,
                            num_columns: int) -> torch.Tensor:
    """[num_rollouts, num_columns]: ``values`` [N_t], one per labelled position of a row in row order (e.g.
    next-token log-probs), laid out as response tokens (row j = the micro-batch's j-th rollout, column t = its
    t-th response token, 0 beyond its length). ``positions``: the micro-batch's
    :meth:`RolloutMicroBatch.response_positions`, on ``values``' device. Differentiable (index_put); reads
    nothing from the device."""
    rows, cols = positions
    if values.dim() != 1 or values.shape[0] != rows.shape[0]:
        raise RuntimeError(f"{tuple(values.shape)} values for {rows.shape[0]} response tokens: the packed row and "
                           "its rollouts disagree")
    return values.new_zeros(num_rollouts, num_columns).index_put((rows, cols), values)
