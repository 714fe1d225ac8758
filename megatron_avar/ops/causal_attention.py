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
  "auto"    on CUDA with Triton's GPU backend: "sdpa" for 2-byte inputs on a GPU with FlashAttention (compute
            capability 8.0+) given the call's spans, at most SDPA_MAX_SPANS of them (over all rows of the call),
            all contiguous, unless torch.use_deterministic_algorithms is on; "triton" otherwise. Elsewhere "sdpa".
Transformer Engine's fused attention is not used yet (not verified in this project's environments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_avar import platform
from megatron_avar.ops.role_attention import build_problem, role_attention
from megatron_avar.segments import check_cu_seqlens

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
    """The runs of real tokens SDPA attends over, one call each. ``shape``: the call's token grid, (B, S) padded
    or (1, T) packed THD; ``spans`` ((row, start, end), ...) in order, positions within the row; ``contiguous``
    False when some sample has padding between real tokens (SDPA per run would not be exact there)."""

    shape: tuple[int, int]
    spans: tuple[tuple[int, int, int], ...]
    contiguous: bool


def attention_spans(key_roles: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> AttentionSpans:
    """The spans of a batch: key_roles int [B, S] (or [T] with cu_seqlens, as causal_attention's). Reads
    key_roles (and cu_seqlens) on the host: call once per batch, not per layer."""
    if not isinstance(key_roles, torch.Tensor):
        raise TypeError(f"key_roles must be a torch.Tensor, got {type(key_roles).__name__}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, key_roles.numel())  # read on the host here anyway
    grid = key_roles.reshape(1, -1) if cu_seqlens is not None else key_roles
    if grid.dim() != 2:
        raise ValueError(f"key_roles must be [B, S] (or [T] with cu_seqlens), got {tuple(key_roles.shape)}")
    rows, length = grid.shape
    real = (grid >= 0).reshape(-1).cpu()
    tokens = real.numel()
    bounds = (torch.arange(0, tokens + 1, max(length, 1)) if cu_seqlens is None
              else cu_seqlens.detach().cpu().long())                         # samples: [bounds[i], bounds[i + 1])
    edge = torch.zeros(tokens + 1, dtype=torch.bool)
    edge[bounds.clamp(max=tokens)] = True                                  # a sample starts (or the stream ends)
    before = torch.cat([torch.zeros(1, dtype=torch.bool), real])           # real[p - 1], False at p = 0
    after = torch.cat([real, torch.zeros(1, dtype=torch.bool)])            # real[p], False at p = T
    starts = torch.nonzero(after & (edge | ~before)).flatten()             # a real token opening a run
    ends = torch.nonzero(before & (edge | ~after)).flatten()               # one past a real token closing it
    sample = torch.searchsorted(bounds, starts, right=True) - 1
    contiguous = sample.unique().numel() == sample.numel()                 # one run per sample at most
    row, offset = starts // max(length, 1), starts % max(length, 1)
    spans = tuple(zip(row.tolist(), offset.tolist(), (ends - starts + offset).tolist()))
    return AttentionSpans((rows, length), spans, contiguous)


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
        on_gpu = q.is_cuda and platform.triton_gpu_available()
        impl = _auto_impl(on_gpu, q.dtype, spans, flash=on_gpu and platform.flash_attention_capable(q.device.index),
                          deterministic=torch.are_deterministic_algorithms_enabled())
    lowest = int(key_roles.min()) if check_values and key_roles.numel() else -1
    if lowest < -1:
        raise ValueError(f"key_roles must be >= -1 (-1 marks padding, any role >= 0 a real key), got {lowest}")
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
        grid = (1, q.shape[0]) if cu_seqlens is not None else tuple(q.shape[:2])
        if spans.shape != grid:
            raise ValueError(f"spans were worked out for a {list(spans.shape)} token grid but this call has "
                             f"{list(grid)}: pass attention_spans of this call's key_roles")
        if not spans.contiguous:  # padding inside a sample: the masked blockwise path
            return causal_attention(q, k, v, padding, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                                    impl="blockwise", check_values=False)
        out = _sdpa(q, k, v, spans, softmax_scale, thd=cu_seqlens is not None)
    else:
        out, _ = role_attention(q, k, v, padding, num_roles=1, causal=True, softmax_scale=softmax_scale,
                                impl="blockwise", cu_seqlens=cu_seqlens, check_values=check_values)
    return out * (key_roles >= 0).unsqueeze(-1).unsqueeze(-1).to(out.dtype)


def _auto_impl(on_gpu: bool, dtype: torch.dtype, spans: AttentionSpans | None, *, flash: bool = True,
               deterministic: bool = False) -> str:
    """"auto"'s choice (module docstring): SDPA where it is FlashAttention-2 (``flash``: the device has it) and its
    spans cost no host read; the Triton kernel, bitwise reproducible, under torch.use_deterministic_algorithms
    (FlashAttention's backward accumulates in a varying order)."""
    if not on_gpu:
        return "sdpa"
    if dtype == torch.float64:  # no Triton kernel takes it
        return "sdpa"
    few_spans = spans is not None and spans.contiguous and len(spans.spans) <= SDPA_MAX_SPANS
    two_bytes = dtype in (torch.float16, torch.bfloat16)
    return "sdpa" if few_spans and two_bytes and flash and not deterministic else "triton"


def _sdpa(q, k, v, spans: AttentionSpans, softmax_scale, *, thd: bool):
    """SDPA over each span of real tokens, row by row (views, no copies of q, k, v); 0 between spans."""
    if thd:
        q, k, v = q[None], k[None], v[None]                                  # one row: [1, T, H, D]
    rows, length = q.shape[:2]
    if rows == 0 or length == 0:
        return q.new_zeros(q.shape[1:] if thd else q.shape)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[-2] // k.shape[-2]
    # GQA in SDPA's kernel (no repeated keys), except on CUDA in fp32: there the memory-efficient kernel, which
    # takes no GQA, is the one that keeps memory O(S).
    repeat = group > 1 and q.is_cuda and q.dtype == torch.float32
    if repeat:
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    by_row: dict[int, list[tuple[int, int]]] = {}
    for row, start, end in spans.spans:
        by_row.setdefault(row, []).append((start, end))
    out_rows = []
    for row in range(rows):
        pieces, done = [], 0
        for start, end in by_row.get(row, ()):
            if start > done:
                pieces.append(q.new_zeros(start - done, *q.shape[2:]))
            attended = F.scaled_dot_product_attention(
                q[row, start:end].transpose(0, 1)[None], k[row, start:end].transpose(0, 1)[None],
                v[row, start:end].transpose(0, 1)[None], is_causal=True, scale=scale,
                enable_gqa=group > 1 and not repeat)
            pieces.append(attended[0].transpose(0, 1))
            done = end
        if done < length:
            pieces.append(q.new_zeros(length - done, *q.shape[2:]))
        out_rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    out = torch.stack(out_rows)
    if not any(spans.spans):  # all padding: zeros that still belong to the graph (zero gradients, as elsewhere)
        out = out + 0 * (q.sum() + k.sum() + v.sum())
    return out[0] if thd else out
