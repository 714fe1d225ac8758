"""causal_attention (the out of a probe-mode AVAR layer) equals role_attention's out on every real row, in
values and in gradients w.r.t. q, k, v; padding rows give 0.

Truth: role_attention's float64 reference. sdpa / blockwise run in float64 too (1e-10); Triton runs under
the interpreter in float32 (IEEE dots): float32 accumulation noise, 1e-5 of the largest magnitude.
"""

import importlib

import pytest
import torch

from megatron_avar.ops import role_attention
from megatron_avar.ops.causal_attention import causal_attention
from role_attention_cases import Case, make

role_attention_triton = importlib.import_module("megatron_avar.ops.role_attention_triton")

CASES = [
    Case(),
    Case(padding="left", num_q_heads=4, num_kv_heads=1),
    Case(padding="right", num_q_heads=2, num_kv_heads=2, head_dim=32),
    Case(padding="all", num_q_heads=2, num_kv_heads=1),
    Case(packed=(13, 1, 24, 0, 9), num_q_heads=4, num_kv_heads=2),
    Case(packed=(20, 17), padding="tail", num_q_heads=2, num_kv_heads=1),
    Case(roles="scattered", num_roles=5),
]


def _values_and_grads(q, k, v, roles, kwargs, fn):
    q_, k_, v_ = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q_, k_, v_)
    real = (roles >= 0).to(out.device)
    weights = torch.randn(tuple(out.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = weights.to(out.device) * real.unsqueeze(-1).unsqueeze(-1)          # a loss of the real rows only
    grads = torch.autograd.grad((out.double() * weights).sum(), (q_, k_, v_))
    return (out.detach(), *grads)


def _truth(q, k, v, roles, kwargs):
    cu = {"cu_seqlens": kwargs["cu_seqlens"]} if "cu_seqlens" in kwargs else {}
    return _values_and_grads(q.double(), k.double(), v.double(), roles, kwargs, lambda a, b, c: role_attention(
        a, b, c, roles, num_roles=kwargs["num_roles"], impl="reference", **cu)[0])


@pytest.mark.parametrize("impl", ["sdpa", "blockwise"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_out_equals_role_attention_on_real_rows(case, impl):
    q, k, v, roles, kwargs = make(case, torch.float64, seed=41)
    cu = {"cu_seqlens": kwargs["cu_seqlens"]} if "cu_seqlens" in kwargs else {}
    got = _values_and_grads(q, k, v, roles, kwargs, lambda a, b, c: causal_attention(a, b, c, roles, impl=impl, **cu))
    want = _truth(q, k, v, roles, kwargs)
    real = (roles >= 0).unsqueeze(-1).unsqueeze(-1)
    torch.testing.assert_close(got[0], want[0] * real, atol=1e-10, rtol=0)      # padding rows: exactly 0
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES[:2] + CASES[4:6], ids=str)
def test_triton_out_equals_role_attention_on_real_rows(case):
    if not role_attention_triton.INTERPRETING and not torch.cuda.is_available():
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    device = torch.device("cpu" if role_attention_triton.INTERPRETING else "cuda")
    q, k, v, roles, kwargs = make(case, torch.float32, seed=42)
    q, k, v, roles = q.to(device), k.to(device), v.to(device), roles.to(device)
    cu = {"cu_seqlens": kwargs["cu_seqlens"].to(device)} if "cu_seqlens" in kwargs else {}
    got = _values_and_grads(q, k, v, roles, kwargs, lambda a, b, c: causal_attention(a, b, c, roles, impl="triton",
                                                                                      **cu))
    want = _truth(q, k, v, roles, {**kwargs, **cu})
    real = (roles >= 0).unsqueeze(-1).unsqueeze(-1)
    for a, b in zip(got, (want[0] * real, *want[1:])):
        torch.testing.assert_close(a.double(), b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=0)


def test_padding_inside_a_row_falls_back_and_stays_exact():
    case = Case(batch=1, seq_len=30, num_q_heads=2, num_kv_heads=1)
    q, k, v, roles, kwargs = make(case, torch.float64, seed=43)
    roles[0, 10:14] = -1                                                         # a hole, not an end
    got = causal_attention(q, k, v, roles, impl="sdpa")
    want = role_attention(q, k, v, roles, num_roles=3, impl="reference")[0] * (roles >= 0)[..., None, None]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_unknown_implementation_is_refused():
    q, k, v, roles, _ = make(Case(), torch.float32, seed=44)
    with pytest.raises(ValueError, match="impl='flash' is not an attention implementation"):
        causal_attention(q, k, v, roles, impl="flash")
