"""Plain causal attention with AVAR's masking rules, from the fastest kernel the platform has: the output of an
AVAR layer whose masses come from the probe (:func:`megatron_avar.ops.role_mass`) instead of the fused kernel.

Same inputs and masks as :func:`megatron_avar.ops.role_attention` (causal, no logit edits): padded [B, S] or
packed THD with ``cu_seqlens``; keys of role -1 are never attended; GQA. One difference, by definition:
rows whose own role is -1 (padding queries) get out 0 — no real query ever attends to them, and no loss reads
them, so the layer's real rows are exactly role_attention's.

Implementations:
  "triton"  role_attention's Triton kernels with the mass accumulation compiled out (on one H200 within
            ±5% of SDPA's FlashAttention-2 from 8k tokens: tools/results/role_attention_gpu_*), on CUDA;
            packed windows built on the device, no host synchronisation.
  "sdpa"    torch's scaled_dot_product_attention (its flash kernel on CPU) per sample and per contiguous span
            of real tokens, memory O(S); the boundaries are read on the host, so this is the CPU path. A row
            whose padding is not at its ends falls back to "blockwise".
  "blockwise" role_attention's blockwise path (masses computed and dropped): tests and that fallback.
  "auto"    triton on CUDA with Triton's GPU backend, sdpa otherwise.
Transformer Engine's fused attention is not used yet (not verified in this project's environments).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_avar import platform
from megatron_avar.ops.role_attention import build_problem, role_attention

__all__ = ["causal_attention", "ATTENTION_IMPLEMENTATIONS", "PLAIN_ATTENTION_FOR"]

ATTENTION_IMPLEMENTATIONS = ("auto", "triton", "sdpa", "blockwise")
# The plain attention beside each role_attention implementation (what a caller that chose a kernel family for
# its masses uses for ``out``): the CPU family's is SDPA; the reference family stays exact (blockwise) for tests.
PLAIN_ATTENTION_FOR = {"auto": "auto", "triton": "triton", "blockwise": "sdpa", "reference": "blockwise"}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_roles: torch.Tensor, *,
                     softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                     impl: str = "auto", check_values: bool = True) -> torch.Tensor:
    """out [B, S, Hq, D] (or [T, Hq, D] with cu_seqlens) in q's dtype; differentiable w.r.t. q, k, v.

    Shapes, masks and ``check_values`` as :func:`megatron_avar.ops.role_attention`; rows of role -1 give 0.
    """
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is not an attention implementation; use one of {ATTENTION_IMPLEMENTATIONS}")
    if impl == "auto":
        impl = "triton" if platform.triton_gpu_available() and q.is_cuda else "sdpa"
    if not isinstance(key_roles, torch.Tensor):
        raise TypeError(f"key_roles must be a torch.Tensor, got {type(key_roles).__name__}")
    padding = key_roles.clamp(max=0)  # only padding (-1) matters here: one role, 0, for every real key
    if impl == "triton":
        from megatron_avar.ops import role_attention_triton

        problem, thd = build_problem(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale,
                                     impl="triton", cu_seqlens=cu_seqlens, check_values=check_values)
        out = role_attention_triton.triton_role_attention(problem, compute_mass=False)[0]
        out = out.squeeze(0) if thd else out
    elif impl == "sdpa":
        out = _sdpa(q, k, v, padding, softmax_scale, cu_seqlens, check_values)
    else:
        out, _ = role_attention(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale,
                                impl="blockwise", cu_seqlens=cu_seqlens, check_values=check_values)
    return out * (key_roles >= 0).unsqueeze(-1).unsqueeze(-1).to(out.dtype)


def _sdpa(q, k, v, padding, softmax_scale, cu_seqlens, check_values):
    """SDPA over each sample's contiguous span of real tokens (host boundaries; the CPU path)."""
    thd = cu_seqlens is not None
    # role_attention's checks (shapes, dtypes, roles, cu_seqlens), without computing anything
    build_problem(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                  check_values=check_values)
    if not thd:
        rows = [(b, 0, q.shape[1]) for b in range(q.shape[0])]
        q_, k_, v_, roles = q, k, v, padding
    else:
        bounds = cu_seqlens.tolist()
        rows = [(0, a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        q_, k_, v_, roles = q[None], k[None], v[None], padding[None]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[-2] // k.shape[-2]
    real = (roles >= 0).cpu()
    out = torch.zeros_like(q_)
    for b, a, e in rows:
        index = torch.nonzero(real[b, a:e], as_tuple=True)[0]
        if index.numel() == 0:
            continue
        first, last = a + int(index[0]), a + int(index[-1]) + 1
        if int(index.numel()) != last - first:  # padding inside the span: the masked blockwise path
            return causal_attention(q, k, v, padding, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                                    impl="blockwise", check_values=False)
        span = slice(first, last)
        attended = F.scaled_dot_product_attention(
            q_[b, span].transpose(0, 1)[None], k_[b, span].repeat_interleave(group, 1).transpose(0, 1)[None],
            v_[b, span].repeat_interleave(group, 1).transpose(0, 1)[None], is_causal=True, scale=scale)
        out[b, span] = attended[0].transpose(0, 1)
    return out[0] if thd else out
