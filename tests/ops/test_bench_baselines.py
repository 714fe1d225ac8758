"""The benchmark's public-alternative baseline computes what it claims: tools/bench_role_attention.py's
FlexAttention route to role masses (one log-sum-exp per role, mass_r = exp(lse_r - lse)) gives role_attention's
output and masses, with GQA and padding keys (uncompiled flex_attention on the CPU; the GPU benchmark compiles
the same function). fp32: both are exact softmax sums, bound 1e-5."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_role_masses_equal_role_attention():
    from bench_role_attention import flex_role_attention, make_inputs

    from megatron_avar.ops import role_attention

    q, k, v, roles = make_inputs(2, 128, 4, 2, 16, torch.float32, "cpu")
    roles[1, :5] = -1  # padding keys: never attended
    out, mass = flex_role_attention(q, k, v, roles, 5, compiled=False)()
    expected_out, expected_mass = role_attention(q, k, v, roles, num_roles=5, impl="reference")
    rows = (roles >= 0).cumsum(-1) > 0  # rows after the padding see at least one key
    torch.testing.assert_close(out[rows], expected_out[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.transpose(1, 2)[rows], expected_mass.transpose(1, 2)[rows], rtol=1e-5,
                               atol=1e-6)
