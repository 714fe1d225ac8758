"""role_attention's contract: validation, masking semantics, packed sequences, SDPA equality, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_avar.ops import role_attention
from role_attention_cases import Case, make, random_loss


def _sdpa(q, k, v, allowed):
    """torch SDPA on [B, S, H, D] tensors with a bool allowed mask [B, S, S]."""
    group = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2), v.repeat_interleave(group, 2).transpose(1, 2),
        attn_mask=allowed[:, None])
    return out.transpose(1, 2)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
@pytest.mark.parametrize("padding", ["none", "right"])
def test_out_equals_sdpa_without_edits(impl, padding):
    q, k, v, roles, kwargs = make(Case(batch=2, seq_len=45, num_q_heads=6, num_kv_heads=2, head_dim=32,
                                       padding=padding), torch.float32, requires_grad=False)
    out, mass = role_attention(q, k, v, roles, impl=impl, **kwargs)
    seq = q.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None] & (roles >= 0)[:, None, :]
    # fp32 with different summation orders: a few ulps of |out| <= ~3.
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=2e-6, rtol=2e-6)
    # Every row has at least one allowed key here (right padding keeps the prefix): masses sum to one.
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[..., 0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_rows_without_allowed_keys_give_zeros_and_finite_grads(impl):
    q, k, v, roles, kwargs = make(Case(batch=2, seq_len=20, padding="left"), torch.float32)
    roles[1] = -1  # the whole second sequence is padding
    out, mass = role_attention(q, k, v, roles, impl=impl, **kwargs)
    # Causal + left padding: row i of batch 0 sees nothing while i < first real token (20 // 5 = 4).
    assert out[0, :4].abs().max() == 0 and mass[0, :, :4].abs().max() == 0
    assert out[1].abs().max() == 0 and mass[1].abs().max() == 0
    torch.testing.assert_close(mass[0, :, 4:].sum(-1), torch.ones(4, 16), atol=1e-6, rtol=0)
    grads = torch.autograd.grad(random_loss(out, mass), (q, k, v))
    for g in grads:
        assert torch.isfinite(g).all()
    assert grads[0][1].abs().max() == 0 and grads[1][1].abs().max() == 0  # padding gets no gradient


def test_mass_counts_each_role():
    """Uniform attention (q = 0): mass of role r on row i = (#allowed keys of role r) / (#allowed keys)."""
    roles = torch.tensor([[0, 1, 1, -1, 2, 0, 2, 2]])
    q = torch.zeros(1, 8, 2, 4)
    k, v = torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4)
    for impl in ("reference", "blockwise"):
        _, mass = role_attention(q, k, v, roles, num_roles=3, impl=impl)
        counts = torch.nn.functional.one_hot(roles.clamp(min=0), 3).float() * (roles >= 0)[..., None]
        prefix = counts.cumsum(1)[0]
        torch.testing.assert_close(mass[0, 1], prefix / prefix.sum(-1, keepdim=True))


def test_logit_edits_follow_the_formula():
    """Multiplicative and additive edits equal attention on hand-edited logits, only on masked rows."""
    q, k, v, roles, _ = make(Case(batch=1, seq_len=12, num_q_heads=2, num_kv_heads=1, num_roles=3), torch.float64,
                             requires_grad=False)
    scale = torch.tensor([1.15, 0.6, 1.0])
    bias = torch.tensor([0.0, math.log(0.6), 0.3])
    query_mask = torch.arange(12)[None] >= 5
    out, mass = role_attention(q, k, v, roles, num_roles=3, query_mask=query_mask, role_logit_scale=scale,
                               role_logit_bias=bias, impl="blockwise")
    logits = torch.einsum("bihd,bjhd->bhij", q, k.expand(-1, -1, 2, -1)) / math.sqrt(q.shape[-1])
    edited = logits * scale[roles][:, None, None, :] + bias[roles][:, None, None, :]
    logits = torch.where(query_mask[:, None, :, None], edited, logits)
    logits = logits.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -math.inf)
    probs = logits.softmax(-1)
    torch.testing.assert_close(out, torch.einsum("bhij,bjhd->bihd", probs, v.expand(-1, -1, 2, -1)))
    torch.testing.assert_close(mass, probs @ F.one_hot(roles, 3).double()[:, None])


@pytest.mark.parametrize("impl", ["reference", "blockwise"])
def test_packed_samples_equal_separate_calls(impl):
    """THD: each packed sample's out and mass equal the same sample run alone (nothing leaks)."""
    lengths = (9, 1, 14, 6)
    q, k, v, roles, kwargs = make(Case(packed=lengths, edits="head_scale_bias", num_roles=4), torch.float64,
                                  requires_grad=False)
    out, mass = role_attention(q, k, v, roles, impl=impl, **kwargs)
    assert out.shape == q.shape and mass.shape == (q.shape[1], q.shape[0], 4)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        one_out, one_mass = role_attention(
            q[None, part], k[None, part], v[None, part], roles[None, part], num_roles=4,
            query_mask=kwargs["query_mask"][None, part], role_logit_scale=kwargs["role_logit_scale"],
            role_logit_bias=kwargs["role_logit_bias"], impl=impl)
        torch.testing.assert_close(out[part], one_out[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(mass[:, part], one_mass[0], atol=1e-12, rtol=1e-12)
        start += n


def test_blockwise_is_deterministic():
    q, k, v, roles, kwargs = make(Case(seq_len=150, head_dim=32, edits="bias", padding="left"), torch.float32)
    runs = []
    for _ in range(2):
        out, mass = role_attention(q, k, v, roles, impl="blockwise", **kwargs)
        runs.append((out, mass, *torch.autograd.grad(random_loss(out, mass), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_auto_uses_blockwise_on_cpu():
    q, k, v, roles, kwargs = make(Case(), torch.float32, requires_grad=False)
    auto = role_attention(q, k, v, roles, **kwargs)
    blockwise = role_attention(q, k, v, roles, impl="blockwise", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(auto, blockwise))


def _args(**overrides):
    q, k, v, roles, _ = make(Case(batch=2, seq_len=8, num_q_heads=4, num_kv_heads=2, num_roles=3), torch.float32,
                             requires_grad=False)
    args = dict(q=q, k=k, v=v, key_roles=roles, num_roles=3)
    args.update(overrides)
    return args


def _call(**overrides):
    args = _args(**overrides)
    return role_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("key_roles"), **args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(impl="flash"), ValueError, "impl='flash'"),
    (dict(num_roles=0), ValueError, "num_roles"),
    (dict(num_roles=2, key_roles=torch.arange(8).remainder(3).repeat(2, 1)), ValueError,
     r"key_roles values must lie in \[-1, num_roles=2\)"),
    (dict(key_roles=torch.full((2, 8), -2)), ValueError, "key_roles values"),
    (dict(key_roles=torch.zeros(2, 8)), TypeError, "integer tensor"),
    (dict(key_roles=torch.zeros(2, 7, dtype=torch.long)), ValueError, r"key_roles must have shape \(2, 8\)"),
    (dict(q=torch.randn(2, 8, 3, 16)), ValueError, "multiple of key/value heads"),
    (dict(q=torch.randn(2, 8, 4, 8)), ValueError, "head_dim"),
    (dict(q=torch.randn(8, 4, 16)), ValueError, "for packed sequences pass cu_seqlens"),
    (dict(k=torch.randn(2, 8, 2, 16, dtype=torch.float16)), TypeError, "share one dtype"),
    (dict(q=torch.randn(2, 8, 4, 16).int()), TypeError, "float32, float16 or bfloat16"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
    (dict(role_logit_scale=torch.ones(3)), ValueError, "query_mask is None"),
    (dict(role_logit_scale=torch.ones(4), query_mask=torch.ones(2, 8, dtype=torch.bool)), ValueError,
     r"shape \[R\]=\[3\] or \[Hq, R\]=\[4, 3\]"),
    (dict(role_logit_scale=torch.ones(3, requires_grad=True), query_mask=torch.ones(2, 8, dtype=torch.bool)),
     ValueError, "detach"),
    (dict(role_logit_bias=torch.tensor([0.0, math.inf, 0.0]), query_mask=torch.ones(2, 8, dtype=torch.bool)),
     ValueError, r"\+inf"),
    (dict(role_logit_scale=torch.ones(3), query_mask=torch.ones(2, 8)), TypeError, "query_mask must be a bool"),
    (dict(q=torch.randn(16, 4, 16), k=torch.randn(16, 2, 16), v=torch.randn(16, 2, 16),
          key_roles=torch.zeros(16, dtype=torch.long), cu_seqlens=torch.tensor([0, 5, 12])), ValueError,
     "end at T=16"),
    (dict(q=torch.randn(16, 4, 16), k=torch.randn(16, 2, 16), v=torch.randn(16, 2, 16),
          key_roles=torch.zeros(16, dtype=torch.long), cu_seqlens=torch.tensor([0, 9, 5, 16])), ValueError,
     "non-decreasing"),
    (dict(q=torch.randn(16, 4, 16), k=torch.randn(16, 2, 16), v=torch.randn(16, 2, 16),
          key_roles=torch.zeros(16, dtype=torch.long), cu_seqlens=torch.tensor([0.0, 16.0])), TypeError,
     "integer tensor"),
    (dict(q=torch.randn(2, 8, 4, 16, dtype=torch.float64), impl="triton"), TypeError, "float64"),
])
def test_bad_input_is_rejected_with_an_actionable_message(overrides, error, match):
    if "k" not in overrides and "q" in overrides and isinstance(overrides["q"], torch.Tensor) \
            and overrides["q"].dtype == torch.float64:
        overrides = dict(overrides, k=torch.randn(2, 8, 2, 16, dtype=torch.float64),
                         v=torch.randn(2, 8, 2, 16, dtype=torch.float64))
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_empty_sequence_returns_empty_outputs():
    q, k, v = torch.randn(2, 0, 4, 16), torch.randn(2, 0, 2, 16), torch.randn(2, 0, 2, 16)
    out, mass = role_attention(q, k, v, torch.zeros(2, 0, dtype=torch.long), num_roles=3)
    assert out.shape == (2, 0, 4, 16) and mass.shape == (2, 4, 0, 3) and mass.dtype == torch.float32
