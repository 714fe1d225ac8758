"""GRPO group normalisation equals the definition computed with Python's statistics module, group by group;
groups whose rewards are all equal get exactly zero advantage, never NaN."""

import statistics

import pytest
import torch

from megatron_avar.grpo.advantages import group_advantages

REWARDS = [1.3, 0.1, 0.1, 1.0,   0.0, 0.0, 1.1, 0.0,   0.7, 0.7, 0.7, 0.7,   2.0, 1.0, 0.0, 1.6]


def _direct(rewards, n, mode, unbiased, eps=1e-6):
    out = []
    for p in range(len(rewards) // n):
        group = rewards[p * n:(p + 1) * n]
        mean = statistics.fmean(group)
        std = statistics.stdev(group) if unbiased else statistics.pstdev(group)
        out += [(r - mean) / (std + eps) if mode == "grpo" else r - mean for r in group]
    return out


@pytest.mark.parametrize("mode,unbiased", [("grpo", True), ("grpo", False), ("dr_grpo", True)])
def test_advantages_equal_the_definition(mode, unbiased):
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), 4, mode=mode, unbiased_std=unbiased)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(_direct(REWARDS, 4, mode, unbiased), dtype=torch.float32))
    assert got[8:12].tolist() == [0.0] * 4  # the all-equal group


def test_all_equal_groups_are_exactly_zero_without_nan():
    # 0.1 (and 1e8 + 0.1) repeated: the float mean differs from the values by rounding, yet the advantage is 0.
    for value in (0.1, 1e8 + 0.1, 0.0, 1.7, -3.3):
        rewards = torch.full((8,), value, dtype=torch.float32)
        for mode in ("grpo", "dr_grpo"):
            got = group_advantages(rewards, 8, mode=mode)
            assert not torch.isnan(got).any() and got.tolist() == [0.0] * 8
    # group_size 1 without Bessel's correction: every group is constant.
    assert group_advantages(torch.tensor([0.3, 1.0]), 1, unbiased_std=False).tolist() == [0.0, 0.0]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_prompts \\* group_size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="advantage mode"):
        group_advantages(torch.zeros(4), 2, mode="ppo")
