"""Samples inside rows: where each sample starts and ends, which sample a token belongs to, and which token is a
sample's attention sink. The one home of these facts for packing (``training.packing``), the AVAR layers
(``models.role_mass_attention``), the AGTO query sets (``training.objective``), the GRPO visual reward
(``grpo.visual_reward``), SFT's ``exclude_sink`` and VAS / intervention (``analysis``).

A row holds one sample (a padded batch: ``segment_ids`` None, PAD roles -1 mark the padding, left or right) or
several packed back to back (``segment_ids`` int [B, S]: the sample index of each token within its row, -1 on
padding; from a packed row's ``cu_seqlens`` by :func:`segment_ids_from_cu_seqlens`). Samples never span rows.

The attention sink ([decision] one policy everywhere): the first token of each sample — the first non-PAD token
of a padded row, the first token of each segment of a packed row — when it is a SYSTEM token (the chat template
always opens with the system turn, so it is). Every analysis that keeps it out of K_sys removes exactly these
tokens: SFT's ``avar.exclude_sink`` gives them the TEMPLATE role in the AVAR layers, VAS / intervention give
them their own key role (``analysis.vas.SINK_ROLE``); GRPO's r_visual keeps them in K_sys (the spec's rule).
"""

from __future__ import annotations

import torch

from megatron_avar.roles import TokenRole

__all__ = ["segment_ids_from_cu_seqlens", "unpacked_segment_ids", "segment_starts", "segment_cu_seqlens",
           "sample_index", "attention_sink_mask", "check_cu_seqlens", "packed_sample_windows"]


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """int64 [seq_length]: the index of the sample each token belongs to (sample k holds tokens
    [cu_seqlens[k], cu_seqlens[k + 1])), -1 in the tail after ``cu_seqlens[-1]``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segments = torch.full((seq_length,), -1, dtype=torch.long)
    segments[: int(cu_seqlens[-1])] = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return segments


def unpacked_segment_ids(roles: torch.Tensor) -> torch.Tensor:
    """The ``segment_ids`` of a padded batch (one sample per row): 0 on real tokens, -1 where roles are PAD."""
    return torch.where(roles >= 0, 0, -1)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: True at the first token of each run of equal segment id in its row (padding runs too)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 [N + 1] boundaries of the runs of equal segment id in each row of ``segment_ids`` [B, S], over
    the flattened B * S stream (a run never spans two rows)."""
    batch, seq = segment_ids.shape
    positions = torch.nonzero(segment_starts(segment_ids).reshape(-1), as_tuple=True)[0]
    end = torch.tensor([batch * seq], device=segment_ids.device)
    return torch.cat([positions, end]).to(torch.int32)


def sample_index(roles: torch.Tensor, segment_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(int64 [B * S], per_row): the row-major number of each token's sample, ``row * per_row + segment``,
    -1 on padding, with ``per_row`` = the largest segment id + 1 (0 when there is no real token). ``roles``
    int [B, S] gives the padding when ``segment_ids`` is None (one sample per row)."""
    if segment_ids is None:
        segment_ids = unpacked_segment_ids(roles)
    segment_ids = segment_ids.long()
    per_row = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    rows = torch.arange(segment_ids.shape[0], device=segment_ids.device)[:, None]
    return torch.where(segment_ids >= 0, segment_ids + per_row * rows, -1).reshape(-1), per_row


def attention_sink_mask(roles: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, S]: the attention sink of every sample (module docstring): its first token, when a SYSTEM one.
    ``roles`` int [B, S] (TokenRole, PAD = -1); ``segment_ids`` as in the module docstring (None: padded rows)."""
    if segment_ids is None:
        segment_ids = unpacked_segment_ids(roles)
    first = segment_starts(segment_ids) & (segment_ids >= 0)
    return first & (roles == TokenRole.SYSTEM)


def _check_cu_seqlens_type(cu_seqlens) -> None:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype == torch.bool or cu_seqlens.numel() < 2:
        raise TypeError("cu_seqlens must be a 1-D integer tensor [N + 1] of cumulative sample lengths")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """TypeError unless ``cu_seqlens`` is a 1-D integer tensor of at least two boundaries; ValueError unless they
    start at 0, end at ``total`` (the packed length T) and never decrease (reads them on the host: a sync)."""
    _check_cu_seqlens_type(cu_seqlens)
    host = cu_seqlens.tolist()
    if host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host[:-1], host[1:])):
        shown = f"{host[:3]}...{host[-2:]}" if len(host) > 6 else f"{host}"
        raise ValueError(f"cu_seqlens must start at 0, end at T={total} (the packed length) and be non-decreasing "
                         f"(sample lengths >= 0), got {shown}")


def packed_sample_windows(cu_seqlens: torch.Tensor, positions: torch.Tensor, total: int, *,
                          check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end), int64 like ``positions``: the window [start, end) of the packed sample holding each of
    ``positions`` (int [P], token positions in the packed stream of ``total`` tokens), looked up on
    ``positions``' device (no host copy of ``cu_seqlens`` unless ``check_values``: :func:`check_cu_seqlens`)."""
    _check_cu_seqlens_type(cu_seqlens)
    if check_values:
        check_cu_seqlens(cu_seqlens, total)
    bounds = cu_seqlens.to(device=positions.device, dtype=torch.long)
    sample = torch.searchsorted(bounds[1:], positions, right=True)
    return bounds[sample], bounds[sample + 1]
