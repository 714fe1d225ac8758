"""The blockwise PyTorch path agrees with the materialising reference, in values and gradients.

The broad shape/mask sweep runs here (fp64, so any disagreement is a bug, not rounding); the
low-precision tests compare against PyTorch's own error in that precision.
"""

import importlib
import zlib

import pytest
import torch

from role_attention_cases import (
    NAMES,
    Case,
    assert_within_low_precision_budget,
    detached64,
    make,
    plain_low_precision,
    values_and_grads,
)

# The package re-exports the function under the module's name, so `import ... as` would give the
# function; the module itself is reached through the import system.
ra = importlib.import_module("megatron_avar.ops.role_attention")

SWEEP = [
    Case(),
    Case(causal=False),
    Case(num_q_heads=3, num_kv_heads=3),                                  # GQA ratio 1
    Case(num_q_heads=4, num_kv_heads=2, padding="left"),                  # ratio 2, left padding
    Case(num_q_heads=7, num_kv_heads=1, head_dim=32, padding="right"),    # ratio 7 (Qwen2.5-VL: 28/4)
    Case(num_q_heads=14, num_kv_heads=2, seq_len=29, causal=False, padding="left"),
    Case(causal=False, padding="right"),
    Case(roles="scattered", num_roles=6),
    Case(roles="scattered", num_roles=2, causal=False),
    Case(num_roles=5, roles="scattered", padding="right"),
    Case(num_roles=4, padding="left", edits="scale"),
    Case(head_dim=128, seq_len=23, batch=1),
    Case(head_dim=80, seq_len=53),                                        # non power of two (ViT's 80)
    Case(head_dim=64, seq_len=1),
    Case(seq_len=17, batch=3),
    Case(edits="scale"),
    Case(edits="bias", causal=False),
    Case(edits="head_scale_bias", padding="left"),
    Case(edits="head_scale_bias", num_q_heads=7, num_kv_heads=1, causal=False, roles="scattered"),
    Case(edits="drop_role", padding="left"),                             # bias -inf empties some rows
    Case(padding="all"),                                                  # batch row 0: no allowed key
    Case(padding="all", causal=False, edits="bias"),
    Case(packed=(13, 1, 24, 9)),
    Case(packed=(20, 17), causal=False, padding="tail"),
    Case(packed=(11, 30, 6), edits="head_scale_bias", roles="scattered", num_roles=5),
    Case(packed=(16, 16, 5), num_q_heads=7, num_kv_heads=1, padding="tail"),  # samples on tile edges
]


@pytest.fixture
def small_tiles(monkeypatch):
    # Tiles smaller than the sequences (and q/k tiles of different sizes) exercise the online
    # softmax across many tiles, partial last tiles and tile skipping.
    monkeypatch.setattr(ra, "BLOCKWISE_TILE_Q", 16)
    monkeypatch.setattr(ra, "BLOCKWISE_TILE_K", 8)


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_blockwise_matches_reference_fp64(case, small_tiles):
    q, k, v, roles, kwargs = make(case, torch.float64, seed=zlib.crc32(str(case).encode()) % 1000)
    got = values_and_grads(q, k, v, roles, kwargs, "blockwise")
    want = values_and_grads(q, k, v, roles, kwargs, "reference")
    # Both compute in fp64; they differ only in summation order (~1e-15 relative).
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, name=name: f"{name} ({case}): {m}")


LOW_PRECISION_CASES = [
    Case(),
    Case(head_dim=128, seq_len=70, padding="left", edits="head_scale_bias"),
    Case(packed=(13, 1, 24, 9), num_q_heads=7, num_kv_heads=1),
    Case(roles="scattered", num_roles=6, causal=False, padding="right"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_blockwise_low_precision_error_budget(case, dtype, small_tiles):
    q, k, v, roles, kwargs = make(case, dtype, seed=7)
    got = values_and_grads(q, k, v, roles, kwargs, "blockwise")
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    plain = plain_low_precision(q, k, v, roles, kwargs)
    truth = values_and_grads(*detached64(q, k, v), roles, kwargs, "reference")
    assert_within_low_precision_budget(got, plain, truth, f"{case} {dtype}")


def test_blockwise_gradcheck_fp64(small_tiles):
    """Finite differences validate the hand-written backward directly (not only agreement)."""
    case = Case(batch=1, seq_len=19, num_q_heads=2, num_kv_heads=1, head_dim=4, padding="left", edits="head_scale_bias")
    q, k, v, roles, kwargs = make(case, torch.float64, seed=3)
    # fast_mode checks random projections of the Jacobian (a few evaluations instead of one per element).
    assert torch.autograd.gradcheck(lambda *qkv: ra.role_attention(*qkv, roles, impl="blockwise", **kwargs),
                                    (q, k, v), fast_mode=True)


def test_blockwise_mass_only_and_out_only_losses(small_tiles):
    """Backward with only one of the two outputs used (the other's grad arrives as None)."""
    q, k, v, roles, kwargs = make(Case(padding="left"), torch.float64, seed=5)
    for pick in (0, 1):
        grads = {}
        for impl in ("blockwise", "reference"):
            outputs = ra.role_attention(q, k, v, roles, impl=impl, **kwargs)
            grads[impl] = torch.autograd.grad(outputs[pick].square().sum(), (q, k, v), allow_unused=True)
        for a, b in zip(grads["blockwise"], grads["reference"]):
            if b is None:  # mass does not depend on v
                assert a is None or a.abs().max() == 0
            else:
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
