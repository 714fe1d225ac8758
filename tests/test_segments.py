"""megatron_avar.segments: packed-sample boundaries and the attention-sink policy, and that every user takes them
from there (packing, the AVAR layers, AGTO query sets, SFT's exclude_sink, the visual reward, VAS)."""

import pytest
import torch

from megatron_avar.roles import TokenRole
from megatron_avar.segments import (
    attention_sink_mask,
    check_cu_seqlens,
    packed_sample_windows,
    sample_index,
    segment_cu_seqlens,
    segment_ids_from_cu_seqlens,
)

# One letter per role, for the role tables below (I: IMAGE).
S, I, U, R, T, P = (  # noqa: E741
    int(TokenRole.SYSTEM), int(TokenRole.IMAGE), int(TokenRole.USER_TEXT), int(TokenRole.RESPONSE),
    int(TokenRole.TEMPLATE), int(TokenRole.PAD))


def test_segment_ids_and_flat_boundaries_from_cu_seqlens():
    segments = segment_ids_from_cu_seqlens(torch.tensor([0, 3, 5], dtype=torch.int32), 7)
    assert segments.tolist() == [0, 0, 0, 1, 1, -1, -1]
    rows = torch.stack([segments, torch.tensor([0, 0, 0, 0, 0, 0, 0])])
    # runs of equal id per row over the flattened stream; the tail is a run of its own; rows never merge
    assert segment_cu_seqlens(rows).tolist() == [0, 3, 5, 7, 14]


def test_sample_index_numbers_samples_row_major():
    roles = torch.tensor([[S, U, S, U, P], [S, I, U, P, P]])
    segments = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, -1, -1]])
    index, per_row = sample_index(roles, segments)
    assert per_row == 2 and index.tolist() == [0, 0, 1, 1, -1, 2, 2, 2, -1, -1]
    index, per_row = sample_index(roles)  # padded rows: one sample each
    assert per_row == 1 and index.tolist() == [0, 0, 0, 0, -1, 1, 1, 1, -1, -1]
    assert sample_index(torch.full((2, 3), P))[1] == 0


def test_attention_sink_is_the_first_token_of_each_sample_when_it_is_a_system_token():
    left_padded = torch.tensor([[P, P, S, S, U], [S, S, I, U, R], [P, T, S, U, U]])
    assert attention_sink_mask(left_padded).nonzero().tolist() == [[0, 2], [1, 0]]  # row 2 opens with TEMPLATE
    packed = torch.tensor([[S, U, S, S, U, P]])
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    assert attention_sink_mask(packed, segments).nonzero().tolist() == [[0, 0], [0, 2]]


def test_every_sink_user_removes_the_same_tokens():
    from megatron_avar.analysis.vas import SINK_ROLE, mass_key_roles
    from megatron_avar.sft.trainer import _sink_key_roles
    from megatron_avar.training.objective import QuerySets

    roles = torch.tensor([[S, S, I, U, S, I, U, P]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]])
    sink = attention_sink_mask(roles, segments)
    assert torch.equal(_sink_key_roles(roles, segments) == T, sink)  # SFT exclude_sink: TEMPLATE in the layers
    kept = QuerySets(roles, segments, exclude_sink=True).system_count.tolist()
    assert kept == [1, 0]  # K_sys counted without exactly those tokens
    assert torch.equal(mass_key_roles(roles[:, :4]) == SINK_ROLE, attention_sink_mask(roles[:, :4]))  # VAS


def test_packed_sample_windows_and_their_checks():
    cu = torch.tensor([0, 2, 2, 5])
    start, end = packed_sample_windows(cu, torch.arange(5), 5)
    assert start.tolist() == [0, 0, 2, 2, 2] and end.tolist() == [2, 2, 5, 5, 5]
    with pytest.raises(ValueError, match=r"start at 0, end at T=6 .* non-decreasing"):
        check_cu_seqlens(cu, 6)
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(torch.tensor([0, 3, 2, 5]), 5)
    with pytest.raises(TypeError, match="integer tensor"):
        packed_sample_windows(torch.tensor([0.0, 5.0]), torch.arange(5), 5, check_values=False)
