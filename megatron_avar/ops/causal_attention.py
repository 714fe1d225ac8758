"""Plain causal attention with AVAR's masking rules, from the fastest kernel the platform has: the output of an
AVAR layer whose masses come from the probe (:func:`megatron_avar.ops.role_mass`) instead of the fused kernel.

Same inputs and masks as :func:`megatron_avar.ops.role_attention` (causal, no logit edits): padded [B, S] or
packed THD with ``cu_seqlens``; keys of role -1 are never attended; GQA. One difference, by definition:
rows whose own role is -1 (padding queries) get out 0 — no real query ever attends to them, and no loss reads
them, so the layer's real rows are exactly role_attention's.

Implementations:
  "triton"  role_attention's Triton kernels with the mass accumulation compiled out (on one H200 within
            ±5% of SDPA's FlashAttention-2 from 8k tokens, 1.6-3.4x slower forward+backward at 1k-4k:
            tools/results/role_attention_gpu_*), on CUDA; one launch for any number of packed samples, windows
            built on the device, no host synchronisation.
  "sdpa"    torch's scaled_dot_product_attention (FlashAttention-2 on CUDA for 2-byte inputs, the flash CPU
            kernel on CPU; GQA without repeating keys) once per span of real tokens, memory O(S). The spans
            (:class:`AttentionSpans`) come from the host: pass them, worked out once per batch by
            :func:`attention_spans`, and nothing here waits for the device; without them they are read here.
            A sample whose padding is not at its ends runs "blockwise" instead.
  "blockwise" role_attention's blockwise path (masses computed and dropped): tests and that fallback.
  "auto"    on CUDA with Triton's GPU backend: "sdpa" for 2-byte inputs given spans, at most SDPA_MAX_SPANS of
            them, all contiguous; "triton" otherwise. Elsewhere "sdpa".
Transformer Engine's fused attention is not used yet (not verified in this project's environments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_avar import platform
from megatron_avar.ops.role_attention import build_problem, role_attention

__all__ = ["causal_attention", "attention_spans", "AttentionSpans", "ATTENTION_IMPLEMENTATIONS", "PLAIN_ATTENTION_FOR",
           "SDPA_MAX_SPANS"]

ATTENTION_IMPLEMENTATIONS = ("auto", "triton", "sdpa", "blockwise")
# The plain attention beside each role_attention implementation (what a caller that chose a kernel family for
# its masses uses for ``out``): the CPU family's is SDPA; the reference family stays exact (blockwise) for tests.
PLAIN_ATTENTION_FOR = {"auto": "auto", "triton": "triton", "blockwise": "sdpa", "reference": "blockwise"}
# "auto" on CUDA runs SDPA per span up to this many spans per call; past it, the host's cost of launching one
# attention per span (forward and backward, every layer) would sit on the step's path, and the Triton kernel
# (one launch for every sample) runs instead.
SDPA_MAX_SPANS = 64


@dataclass(frozen=True)
class AttentionSpans:
    """The runs of real tokens SDPA attends over, one call each, in the flattened token stream (padded [B, S]:
    index b * S + i; THD: the token index): ``spans`` ((start, end), ...) in order. ``contiguous`` is False when
    some sample has padding between real tokens (SDPA per run would not be exact there)."""

    spans: tuple[tuple[int, int], ...]
    contiguous: bool


def attention_spans(key_roles: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> AttentionSpans:
    """The spans of a batch: key_roles int [B, S] (or [T] with cu_seqlens, as causal_attention's). Reads
    key_roles (and cu_seqlens) on the host: call once per batch, not per layer."""
    real = (key_roles >= 0).reshape(-1).cpu()
    if cu_seqlens is None:
        seq = key_roles.shape[-1]
        bounds = list(range(0, real.numel() + 1, seq)) if seq else [0]
    else:
        bounds = [int(x) for x in cu_seqlens.cpu().tolist()]
    spans, contiguous = [], True
    for start, end in zip(bounds[:-1], bounds[1:]):
        index = torch.nonzero(real[start:end], as_tuple=True)[0]
        if index.numel() == 0:
            continue
        first, last = start + int(index[0]), start + int(index[-1]) + 1
        contiguous &= int(index.numel()) == last - first
        spans.append((first, last))
    return AttentionSpans(tuple(spans), contiguous)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_roles: torch.Tensor, *,
                     softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                     impl: str = "auto", check_values: bool = True,
                     spans: AttentionSpans | None = None) -> torch.Tensor:
    """out [B, S, Hq, D] (or [T, Hq, D] with cu_seqlens) in q's dtype; differentiable w.r.t. q, k, v.

    Shapes, masks and ``check_values`` as :func:`megatron_avar.ops.role_attention`; rows of role -1 give 0.
    spans: ``attention_spans(key_roles, cu_seqlens)`` of this batch, worked out once per batch (module docstring).
    """
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r} is not an attention implementation; use one of {ATTENTION_IMPLEMENTATIONS}")
    if not isinstance(key_roles, torch.Tensor):
        raise TypeError(f"key_roles must be a torch.Tensor, got {type(key_roles).__name__}")
    if impl == "auto":
        impl = _auto_impl(q.is_cuda and platform.triton_gpu_available(), q.dtype, spans)
    padding = key_roles.clamp(max=0)  # only padding (-1) matters here: one role, 0, for every real key
    if impl == "triton":
        from megatron_avar.ops import role_attention_triton

        problem, thd = build_problem(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale,
                                     impl="triton", cu_seqlens=cu_seqlens, check_values=check_values)
        out = role_attention_triton.triton_role_attention(problem, compute_mass=False)[0]
        out = out.squeeze(0) if thd else out
    elif impl == "sdpa":
        # role_attention's checks (shapes, dtypes, roles, cu_seqlens), without computing anything
        build_problem(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                      check_values=check_values)
        spans = spans if spans is not None else attention_spans(key_roles, cu_seqlens)
        if not spans.contiguous:  # padding inside a sample: the masked blockwise path
            return causal_attention(q, k, v, padding, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                                    impl="blockwise", check_values=False)
        out = _sdpa(q, k, v, spans, softmax_scale)
    else:
        out, _ = role_attention(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale,
                                impl="blockwise", cu_seqlens=cu_seqlens, check_values=check_values)
    return out * (key_roles >= 0).unsqueeze(-1).unsqueeze(-1).to(out.dtype)


def _auto_impl(on_gpu: bool, dtype: torch.dtype, spans: AttentionSpans | None) -> str:
    """"auto"'s choice (module docstring): SDPA where it is FlashAttention-2 and its spans cost no host read."""
    if not on_gpu:
        return "sdpa"
    few_spans = spans is not None and spans.contiguous and len(spans.spans) <= SDPA_MAX_SPANS
    return "sdpa" if few_spans and dtype in (torch.float16, torch.bfloat16) else "triton"


def _sdpa(q, k, v, spans: AttentionSpans, softmax_scale):
    """SDPA over each span of real tokens; 0 on the tokens between spans (padding)."""
    shape = q.shape
    q, k, v = (x.reshape(-1, *x.shape[-2:]) for x in (q, k, v))  # the flattened token stream [T, H, D]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[-2] // k.shape[-2]
    # GQA in SDPA's kernel (no repeated keys), except on CUDA in fp32: there the memory-efficient kernel, which
    # takes no GQA, is the one that keeps memory O(S).
    repeat = group > 1 and q.is_cuda and q.dtype == torch.float32
    if repeat:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pieces, done = [], 0
    for start, end in spans.spans:
        if start > done:
            pieces.append(q.new_zeros(start - done, *q.shape[1:]))
        attended = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
            v[start:end].transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=group > 1 and not repeat)
        pieces.append(attended[0].transpose(0, 1))
        done = end
    if done < q.shape[0]:
        pieces.append(q.new_zeros(q.shape[0] - done, *q.shape[1:]))
    return torch.cat(pieces).view(shape)
