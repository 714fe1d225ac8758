"""causal_attention (the out of a probe-mode AVAR layer) equals role_attention's out on every real row, in
values and in gradients w.r.t. q, k, v; padding rows give 0.

Truth: role_attention's float64 reference. sdpa / blockwise run in float64 too (1e-10); Triton runs under
the interpreter in float32 (IEEE dots): float32 accumulation noise, 1e-5 of the largest magnitude.
"""

import importlib

import pytest
import torch

from megatron_avar.ops import causal_attention as causal_attention_module
from megatron_avar.ops import role_attention
from megatron_avar.ops.causal_attention import SDPA_MAX_SPANS, AttentionSpans, attention_spans, causal_attention
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


@pytest.mark.parametrize("impl", ["sdpa", "sdpa with spans", "blockwise"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_out_equals_role_attention_on_real_rows(case, impl):
    q, k, v, roles, kwargs = make(case, torch.float64, seed=41)
    cu = {"cu_seqlens": kwargs["cu_seqlens"]} if "cu_seqlens" in kwargs else {}
    if impl == "sdpa with spans":  # worked out once per batch, as the AVAR layers and the HF hook do
        impl, cu = "sdpa", dict(cu, spans=attention_spans(roles, cu.get("cu_seqlens")))
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


def test_bad_roles_and_boundaries_are_named():
    q, k, v, roles, _ = make(Case(), torch.float32, seed=44)
    with pytest.raises(ValueError, match="key_roles must be >= -1 \\(-1 marks padding"):
        causal_attention(q, k, v, roles.masked_fill(roles == 0, -2))
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer tensor"):
        attention_spans(torch.arange(4), [0, 2, 4])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cu_seqlens"):
        attention_spans(torch.arange(4), torch.tensor([0, 2, 5]))


def test_all_padding_through_sdpa_keeps_the_graph():
    """Zero output and zero gradients, as the other paths give (SDPA's zeros used to be cut from the graph)."""
    q, k, v, roles, _ = make(Case(padding="all", num_q_heads=2, num_kv_heads=1), torch.float64, seed=48)
    roles = torch.full_like(roles, -1)
    for t in (q, k, v):
        t.requires_grad_()
    out = causal_attention(q, k, v, roles, impl="sdpa")
    out.sum().backward()
    assert not out.any() and not q.grad.any() and not k.grad.any() and not v.grad.any()


def test_attention_spans_are_the_runs_of_real_tokens():
    """Padded rows: each row's real tokens; THD: each sample's (an empty sample holds none); a sample with padding
    between real tokens is flagged (SDPA per run would not be exact). Spans are (row, start, end) on the grid."""
    roles = torch.tensor([[-1, -1, 0, 1, 2], [3, 4, -1, -1, -1], [-1, -1, -1, -1, -1]])
    assert attention_spans(roles) == AttentionSpans((3, 5), ((0, 2, 5), (1, 0, 2)), True)
    flat = torch.tensor([0, 1, 2, -1, 0, 0, -1, -1, 1])
    assert attention_spans(flat, torch.tensor([0, 4, 8, 9])) == AttentionSpans(
        (1, 9), ((0, 0, 3), (0, 4, 6), (0, 8, 9)), True)
    assert attention_spans(torch.arange(5), torch.tensor([0, 3, 3, 5])) == AttentionSpans(
        (1, 5), ((0, 0, 3), (0, 3, 5)), True)
    assert not attention_spans(torch.tensor([[0, -1, 1, 2]])).contiguous
    assert attention_spans(torch.zeros(0, 7, dtype=torch.long)) == AttentionSpans((0, 7), (), True)


def test_spans_of_another_call_and_empty_calls():
    """Spans worked out for another token grid are refused by name (they would attend the wrong tokens); a call
    with no tokens gives an empty output."""
    q, k, v, roles, _ = make(Case(padding="left"), torch.float64, seed=47)
    with pytest.raises(ValueError, match="spans were worked out for a \\[2, 30\\] token grid but this call has "
                                         "\\[2, 37\\]"):
        causal_attention(q, k, v, roles, impl="sdpa", spans=attention_spans(roles[:, :30]))
    empty = causal_attention(q[:, :0], k[:, :0], v[:, :0], roles[:, :0], impl="sdpa")
    assert empty.shape == q[:, :0].shape


def test_sdpa_with_spans_reads_nothing_on_the_host(monkeypatch):
    """Given the batch's spans (and check_values=False, as the layers call it), the SDPA path never reads a
    device value on the host, forward or backward: no Tensor.item / tolist / cpu / bool / int inside."""
    q, k, v, roles, kwargs = make(Case(packed=(13, 1, 24, 0, 9), num_q_heads=4, num_kv_heads=2), torch.float32,
                                  seed=45)
    spans = attention_spans(roles, kwargs["cu_seqlens"])
    for t in (q, k, v):
        t.requires_grad_()
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, _refuse(name))
    out = causal_attention(q, k, v, roles, impl="sdpa", cu_seqlens=kwargs["cu_seqlens"], check_values=False,
                           spans=spans)
    out.square().sum().backward()
    monkeypatch.undo()
    assert q.grad is not None and q.grad.abs().sum() > 0


def _refuse(name):
    def method(*_args, **_kwargs):
        raise AssertionError(f"host read: Tensor.{name}")
    return method


def test_auto_takes_sdpa_on_gpus_only_where_it_is_flash_and_costs_no_host_read():
    """On CUDA "auto" runs SDPA (FlashAttention-2: 2-byte inputs, a GPU of compute capability 8.0+) when the call's
    spans were given, contiguous and at most SDPA_MAX_SPANS, and bitwise reproducibility was not asked for;
    otherwise the Triton kernel (one launch for all samples, no host read, deterministic). CPU: SDPA."""
    choose = causal_attention_module._auto_impl
    few = AttentionSpans((1, 9), ((0, 0, 5), (0, 5, 9)), True)
    many = AttentionSpans((1, 99), tuple((0, i, i + 1) for i in range(SDPA_MAX_SPANS + 1)), True)
    assert choose(True, torch.bfloat16, few) == choose(True, torch.float16, few) == "sdpa"
    assert choose(True, torch.float32, few) == "triton"                     # SDPA's fp32 kernel has no GQA
    assert choose(True, torch.bfloat16, few, flash=False) == "triton"       # a V100 / T4: no FlashAttention
    assert choose(True, torch.bfloat16, few, deterministic=True) == "triton"
    assert choose(True, torch.bfloat16, None) == "triton"                   # spans would cost a host read here
    assert choose(True, torch.bfloat16, many) == "triton"
    assert choose(True, torch.bfloat16, AttentionSpans((1, 9), ((0, 0, 2), (0, 3, 9)), False)) == "triton"
    assert choose(False, torch.float32, None) == choose(False, torch.bfloat16, many) == "sdpa"
    assert choose(True, torch.float64, None) == "sdpa"                      # no Triton kernel takes float64


@pytest.mark.gpu
def test_sdpa_and_triton_routes_agree_at_qwen_scale_on_gpu():
    """Both routes "auto" takes on a GPU, on an 8k packed bf16 row at Qwen2.5-VL-7B heads (28 query / 4 kv,
    D=128; samples of 3000, 1, 2500 and 2691 tokens with padded tails): out and the q/k/v gradients of a loss of
    the real rows are within bf16 error of the same attention in fp32 (where SDPA runs its memory-efficient
    kernel): 5% of the largest magnitude (the CPU flash kernel at a tenth of this length: up to 1.6% on dK). The
    bf16 SDPA route runs with FlashAttention as the only allowed backend: GQA keeps it there.
    A wrong span, window or causal offset gives errors of order 1."""
    case = Case(packed=(3000, 1, 2500, 2691), padding="tail", num_q_heads=28, num_kv_heads=4, head_dim=128)
    q, k, v, roles, kwargs = make(case, torch.float32, seed=46)
    q, k, v, roles = (t.detach().cuda() for t in (q, k, v, roles))
    cu_seqlens = kwargs["cu_seqlens"].cuda()
    spans = attention_spans(roles, cu_seqlens)
    assert causal_attention_module._auto_impl(True, torch.bfloat16, spans) == "sdpa"
    truth = _values_and_grads(q, k, v, roles, kwargs, lambda a, b, c: causal_attention(
        a, b, c, roles, impl="sdpa", cu_seqlens=cu_seqlens, spans=spans))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for impl in ("sdpa", "triton"):
        # SDPA restricted to FlashAttention: grouped-query heads must not send it to the S x S math kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            got = _values_and_grads(q.bfloat16(), k.bfloat16(), v.bfloat16(), roles, kwargs,
                                    lambda a, b, c, impl=impl: causal_attention(
                                        a, b, c, roles, impl=impl, cu_seqlens=cu_seqlens, spans=spans,
                                        check_values=False))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, truth):
            scale = b.abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= 5e-2 * max(scale, 1e-6), (impl, name)
