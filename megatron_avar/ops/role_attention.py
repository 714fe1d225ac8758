"""Role-mass attention: softmax attention that also returns, per query and head, the attention
probability mass on each key role, without materialising the S x S probability matrix.

This module holds the functional API (:func:`role_attention`), input validation, the materialising
reference implementation (ground truth for tests) and the blockwise PyTorch implementation with its
recomputing ``autograd.Function`` (the CPU path). The Triton kernels live in
``role_attention_triton.py``.

Internally every call is reduced to one canonical problem (:class:`RoleAttentionProblem`): padded
``[B, S, ...]`` tensors plus, for packed (THD) input, a per-query window ``[row_start, row_end)`` of
the keys in that query's packed sample. A THD batch is the canonical problem with B = 1.

The quantities, for query i, key j, head h (kv head h // G with G = Hq / Hkv):
  allowed(i, j) = key_roles[j] >= 0  and  (j <= i if causal)  and  row_start[i] <= j < row_end[i]
  z_ij = (q_i . k_j) * softmax_scale, edited to z_ij * scale[h, role_j] + bias[h, role_j] on rows
         where query_mask[i] is True
  P_ij = softmax over allowed j of z_ij   (0 on rows with no allowed key)
  out_i = sum_j P_ij v_j,   mass[i, r] = sum_{j: role_j == r} P_ij
Backward (used by blockwise and Triton): with D_i = dout_i . out_i + sum_r g_ir mass_ir,
  dz_ij = P_ij * (dout_i . v_j + g[i, role_j] - D_i),   d(q_i . k_j) = dz_ij * c_ij,
where c_ij = softmax_scale * scale[h, role_j] on edited rows and softmax_scale elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_avar import platform
from megatron_avar.segments import packed_sample_windows

__all__ = ["role_attention", "build_problem", "reference_role_attention", "RoleAttentionProblem", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "reference", "blockwise", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tile sizes of the blockwise path. Per tile it holds a few [B, Hq, TILE_Q, TILE_K] fp32 tensors; 128
# keeps that near 2 MB per (batch, 28 heads) while the Python loop overhead stays small at S = 4k.
# Tests lower them to exercise many tiles on short sequences.
BLOCKWISE_TILE_Q = 128
BLOCKWISE_TILE_K = 128


@dataclass(frozen=True)
class RoleAttentionProblem:
    """A validated call in canonical padded form (THD input has batch size 1).

    q [B, S, Hq, D]; k, v [B, S, Hkv, D]; key_roles int [B, S] in [-1, num_roles);
    query_mask bool [B, S] or None; row_start / row_end int32 [B, S] or None (None: every query may
    see keys [0, S)), built on the device; logit_scale / logit_bias float32 [Hq, R] or None (only set
    together with query_mask; a missing one of the two means 1 / 0).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_roles: torch.Tensor
    num_roles: int
    causal: bool
    softmax_scale: float
    query_mask: torch.Tensor | None
    logit_scale: torch.Tensor | None
    logit_bias: torch.Tensor | None
    row_start: torch.Tensor | None
    row_end: torch.Tensor | None

    @property
    def has_edits(self) -> bool:
        return self.query_mask is not None and (self.logit_scale is not None or self.logit_bias is not None)

    @functools.cached_property
    def row_bounds_host(self) -> tuple[list[int], list[int]] | None:
        """(start, end) lists per token of the THD windows, for the blockwise path's tile skipping (one
        device-to-host copy, made only when that path asks)."""
        if self.row_start is None or self.row_end is None:  # (set together: THD problems have both)
            return None
        return self.row_start.reshape(-1).tolist(), self.row_end.reshape(-1).tolist()

    def key_range(self, i0: int, i1: int) -> tuple[int, int]:
        """Keys [lo, hi) that any query in [i0, i1) may attend to (a superset; masks do the rest)."""
        seq_len = self.q.shape[1]
        lo, hi = 0, seq_len
        if self.row_bounds_host is not None:
            starts, ends = self.row_bounds_host
            lo, hi = starts[i0], ends[i1 - 1]  # windows are contiguous and ordered: monotone in i
        if self.causal:
            hi = min(hi, i1)
        return lo, hi


def role_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_roles: torch.Tensor,
    *,
    num_roles: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    query_mask: torch.Tensor | None = None,
    role_logit_scale: torch.Tensor | Sequence[float] | None = None,
    role_logit_bias: torch.Tensor | Sequence[float] | None = None,
    impl: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the per-role probability mass of every query row and head.

    Padded layout (``cu_seqlens`` is None):
      q [B, S, Hq, D]; k, v [B, S, Hkv, D] with Hq % Hkv == 0 (GQA: q head h reads kv head
      h // (Hq // Hkv), as Hugging Face's ``repeat_kv`` does); key_roles integer [B, S];
      query_mask bool [B, S]. Returns out [B, S, Hq, D] (dtype of q) and mass [B, Hq, S, R] float32.
    Packed THD layout (``cu_seqlens`` int [N + 1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = T, as
      in flash_attn_varlen): q [T, Hq, D]; k, v [T, Hkv, D]; key_roles [T]; query_mask [T].
      Attention is block-diagonal: token t of sample n (cu_seqlens[n] <= t < cu_seqlens[n+1]) sees
      only keys of sample n (and, if causal, only those at or before t), so neither outputs nor
      masses leak across packed samples. Returns out [T, Hq, D] and mass [Hq, T, R] float32.

    Masking: key_roles[j] in [0, R) is key j's role; -1 marks padding, never attended (left or right
    padding both work). Query rows with no allowed key get out 0 and mass 0 (never NaN), and no
    gradient. For every other row sum_r mass[..., i, r] == 1.

    Logits: z_ij = (q_i . k_j) * softmax_scale (default 1 / sqrt(D)). On query rows where query_mask
    is True, z_ij becomes z_ij * role_logit_scale[role_j] + role_logit_bias[role_j] (per head when
    given as [Hq, R]; either may be omitted: scale 1, bias 0). These are the training-free
    interventions (docs/method.md, 'Training-free intervention'); they are constants (no gradient). A bias of -inf
    removes that role from the edited rows' softmax.

    Differentiable w.r.t. q, k, v through out and mass (any loss of both; first order only).
    dtypes: float32, float16, bfloat16 (float64 too for reference / blockwise: then mass is float64);
    softmax statistics and masses always accumulate in float32 or wider.

    impl: "reference" materialises the [B, Hq, S, S] probabilities in fp32 (tests, small sizes only);
    "blockwise" tiles queries and keys with an online softmax (extra memory O(B*Hq*S*R) plus
    O(B*Hq*tile^2)); "triton" runs fused kernels (CUDA, or the Triton interpreter on CPU);
    "auto" picks triton for CUDA tensors when Triton's GPU backend is usable, blockwise otherwise.

    check_values: verify key_roles' range, the logit tables and cu_seqlens on the host (a device sync
    each). Callers that validated them once per batch (the AVAR layers) pass False: then building the
    problem waits for nothing on the device (the blockwise path still reads the packed windows once).
    """
    problem, thd = build_problem(
        q, k, v, key_roles, num_roles=num_roles, causal=causal, softmax_scale=softmax_scale,
        query_mask=query_mask, role_logit_scale=role_logit_scale, role_logit_bias=role_logit_bias,
        impl=impl, cu_seqlens=cu_seqlens, check_values=check_values,
    )
    impl = _resolve_impl(impl, problem.q)
    if problem.q.numel() == 0 or problem.q.shape[1] == 0:
        out, mass = _empty_result(problem)
    elif impl == "reference":
        with exact_precision(problem.q):
            out, mass = reference_role_attention(problem)
    elif impl == "blockwise":
        with exact_precision(problem.q):
            out, mass = _BlockwiseRoleAttention.apply(problem.q, problem.k, problem.v, problem)
    else:
        from megatron_avar.ops import role_attention_triton

        out, mass = role_attention_triton.triton_role_attention(problem)
    if thd:
        return out.squeeze(0), mass.squeeze(0)
    return out, mass


# ----------------------------------------------------------------------------------------------------
# Validation


def build_problem(q, k, v, key_roles, *, num_roles, causal=True, softmax_scale=None, query_mask=None,
                  role_logit_scale=None, role_logit_bias=None, impl="auto", cu_seqlens=None, check_values=True):
    """Validate :func:`role_attention`'s arguments (same meaning) and return (problem, is_thd).

    Raises TypeError / ValueError naming the bad argument and the fix. With ``check_values`` it also
    checks key_roles' value range, the logit tables and cu_seqlens on the host (one device sync each).
    """
    check_common_args(dict(q=q, k=k, v=v), dict(key_roles=key_roles), num_roles=num_roles, causal=causal,
                      impl=impl, implementations=IMPLEMENTATIONS)

    thd = cu_seqlens is not None
    layout = "[T, H, D] (THD, cu_seqlens given)" if thd else "[B, S, H, D]"
    want_dim = 3 if thd else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want_dim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}"
                             + ("" if thd else "; for packed sequences pass cu_seqlens"))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if thd:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    batch, seq_len, num_q_heads, head_dim = q.shape
    if k.shape[:2] != (batch, seq_len) or k.shape[3] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, sequence "
                         "or head_dim; only the head count may differ (GQA)")
    num_kv_heads = k.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})")

    tokens_shape = (seq_len,) if thd else (batch, seq_len)
    if key_roles.dtype.is_floating_point or key_roles.dtype.is_complex or key_roles.dtype == torch.bool:
        raise TypeError(f"key_roles must be an integer tensor of role ids, got {key_roles.dtype}")
    if tuple(key_roles.shape) != tokens_shape:
        raise ValueError(f"key_roles must have shape {tokens_shape} (one role per key), got {tuple(key_roles.shape)}")
    key_roles = key_roles.reshape(batch, seq_len)
    if check_values and key_roles.numel():
        lo, hi = (int(x) for x in torch.aminmax(key_roles))
        if lo < -1 or hi >= num_roles:
            raise ValueError(f"key_roles values must lie in [-1, num_roles={num_roles}) (-1 = padding), "
                             f"got min {lo}, max {hi}; raise num_roles or fix the role ids")

    if query_mask is not None:
        if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
            raise TypeError("query_mask must be a bool tensor (True = apply the role logit edits on that row)")
        if tuple(query_mask.shape) != tokens_shape:
            raise ValueError(f"query_mask must have shape {tokens_shape}, got {tuple(query_mask.shape)}")
        if query_mask.device != q.device:
            raise ValueError(f"query_mask is on {query_mask.device} but q is on {q.device}")
        query_mask = query_mask.reshape(batch, seq_len)
    logit_scale = _role_table("role_logit_scale", role_logit_scale, num_q_heads, num_roles, q.device)
    logit_bias = _role_table("role_logit_bias", role_logit_bias, num_q_heads, num_roles, q.device)
    if check_values and logit_scale is not None and not bool(torch.isfinite(logit_scale).all()):
        raise ValueError("role_logit_scale must be finite")
    if check_values and logit_bias is not None and bool((torch.isnan(logit_bias) | (logit_bias == math.inf)).any()):
        raise ValueError("role_logit_bias must not be NaN or +inf (-inf is allowed: it drops that role)")
    if (logit_scale is not None or logit_bias is not None) and query_mask is None:
        raise ValueError("role_logit_scale/role_logit_bias apply only on rows where query_mask is True, but "
                         "query_mask is None; pass query_mask (e.g. torch.ones_like(key_roles, dtype=torch.bool))")
    if query_mask is not None and logit_scale is None and logit_bias is None:
        query_mask = None  # nothing to edit

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
            or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None (1/sqrt(D)), got {softmax_scale!r}")

    row_start = row_end = None
    if thd:
        row_start, row_end = _packed_row_windows(cu_seqlens, seq_len, q.device, check_values)
    problem = RoleAttentionProblem(
        q=q, k=k, v=v, key_roles=key_roles, num_roles=num_roles, causal=causal,
        softmax_scale=float(softmax_scale), query_mask=query_mask, logit_scale=logit_scale,
        logit_bias=logit_bias, row_start=row_start, row_end=row_end,
    )
    return problem, thd


def check_common_args(floats: dict, integers: dict, *, num_roles, causal, impl, implementations) -> None:
    """The checks role_attention and role_mass share: ``impl`` one of ``implementations``; every tensor a
    tensor; num_roles a positive int; causal a bool; the ``floats`` (q first) one float dtype; every tensor on
    one device. Raises TypeError / ValueError naming the argument and the fix."""
    if impl not in implementations:
        raise ValueError(f"impl={impl!r} is not an implementation; use one of {implementations}")
    tensors = {**floats, **integers}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(num_roles, bool) or not isinstance(num_roles, int) or num_roles < 1:
        raise ValueError(f"num_roles must be a positive int (the number of key roles R), got {num_roles!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    q = floats["q"]
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; use float32, float16 or bfloat16")
    if any(t.dtype != q.dtype for t in floats.values()):
        others = ", ".join(name for name in floats if name != "q")
        raise TypeError(f"{', '.join(floats)} must share one dtype, got "
                        f"{', '.join(str(t.dtype) for t in floats.values())}; cast {others} to q's")
    if len({t.device for t in tensors.values()}) > 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device, got "
                         f"{', '.join(str(t.device) for t in tensors.values())}")


def _role_table(name, value, num_q_heads, num_roles, device):
    """[R] or [Hq, R] per-role values -> float32 [Hq, R] on `device`, or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(f"{name} requires grad, but the role logit edits are constants here; pass "
                             f"{name}.detach()")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        table = value.to(device=device, dtype=torch.float32)
    else:
        try:
            table = torch.as_tensor(value, dtype=torch.float32, device=device)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be a float tensor or a sequence of floats: {err}") from None
    if table.shape == (num_roles,):
        table = table.expand(num_q_heads, num_roles)
    elif table.shape != (num_q_heads, num_roles):
        raise ValueError(f"{name} must have shape [R]={[num_roles]} or [Hq, R]={[num_q_heads, num_roles]}, "
                         f"got {list(table.shape)}")
    return table.contiguous()


def _packed_row_windows(cu_seqlens, total, device, check_values=True):
    """Per-token key windows [start, end) of its packed sample, int32 [1, T] tensors built on the device
    (``segments.packed_sample_windows``: no host copy of cu_seqlens unless ``check_values``)."""
    start, end = packed_sample_windows(cu_seqlens, torch.arange(total, device=device), total,
                                       check_values=check_values)
    return start.to(torch.int32).reshape(1, total), end.to(torch.int32).reshape(1, total)


def _resolve_impl(impl: str, q: torch.Tensor) -> str:
    if impl == "auto":
        use_triton = platform.triton_gpu_available() and q.is_cuda and q.dtype != torch.float64
        return "triton" if use_triton else "blockwise"
    if impl == "triton" and q.dtype == torch.float64:
        raise TypeError("impl='triton' supports float32/float16/bfloat16; use impl='blockwise' for float64")
    return impl


def exact_precision(tensor: torch.Tensor):
    """Autocast off around this module's PyTorch paths (reference, blockwise): their softmax statistics and
    masses are float32 or wider by design, which an enclosing ``torch.autocast`` would silently lower to
    bf16/fp16 in their matmuls. The Triton kernels choose their own precisions."""
    if tensor.device.type not in ("cpu", "cuda", "xpu", "mps", "hpu", "xla"):
        return contextlib.nullcontext()  # meta tensors: nothing is computed
    return torch.autocast(tensor.device.type, enabled=False)


def _empty_result(problem: RoleAttentionProblem):
    batch, seq_len, num_q_heads, head_dim = problem.q.shape
    out = problem.q.new_zeros(problem.q.shape) + 0 * problem.q  # keeps the autograd graph
    mass = torch.zeros(batch, num_q_heads, seq_len, problem.num_roles, dtype=_mass_dtype(problem.q.dtype),
                       device=problem.q.device)
    return out, mass


def _mass_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Shared pieces: masks and edited logits of a (query tile, key tile)


def _allowed(problem: RoleAttentionProblem, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
    """bool [B, TQ, TK]: may query i attend to key j (padding, causality, packed-sample window)."""
    device = problem.q.device
    allowed = (problem.key_roles[:, j0:j1] >= 0)[:, None, :]
    cols = torch.arange(j0, j1, device=device)
    if problem.causal:
        rows = torch.arange(i0, i1, device=device)
        allowed = allowed & (cols[None, None, :] <= rows[None, :, None])
    if problem.row_start is not None and problem.row_end is not None:  # (set together: THD problems have both)
        allowed = allowed & (cols[None, None, :] >= problem.row_start[:, i0:i1, None]) \
            & (cols[None, None, :] < problem.row_end[:, i0:i1, None])
    return allowed


def _logit_multiplier_and_bias(problem, i0, i1, j0, j1, dtype):
    """Per-element factor c and offset b with z = (q.k) * c + b, shaped [B, Hq, TQ, TK]; None if no edits."""
    if not problem.has_edits:
        return None, None
    roles = problem.key_roles[:, j0:j1].clamp(min=0)                 # padding keys are masked anyway
    edited_rows = problem.query_mask[:, None, i0:i1, None]            # [B, 1, TQ, 1]
    scale = problem.softmax_scale
    mult = bias = None
    if problem.logit_scale is not None:
        per_key = problem.logit_scale[:, roles].permute(1, 0, 2)[:, :, None, :].to(dtype)  # [B, Hq, 1, TK]
        mult = torch.where(edited_rows, per_key * scale, torch.full_like(per_key, scale))
    else:
        mult = torch.full((1, 1, 1, 1), scale, dtype=dtype, device=problem.q.device)
    if problem.logit_bias is not None:
        per_key = problem.logit_bias[:, roles].permute(1, 0, 2)[:, :, None, :].to(dtype)
        bias = torch.where(edited_rows, per_key, torch.zeros_like(per_key))
    return mult, bias


def _role_one_hot(problem, j0, j1, dtype):
    """[B, TK, R] one-hot of key roles; padding keys (-1) map to an all-zero row."""
    roles = problem.key_roles[:, j0:j1].long()
    return torch.nn.functional.one_hot(roles + 1, problem.num_roles + 1)[..., 1:].to(dtype)


# ----------------------------------------------------------------------------------------------------
# Reference: materialises the probabilities (ground truth for tests)


def reference_role_attention(problem: RoleAttentionProblem, compute_dtype: torch.dtype | None = None):
    """Materialise logits and probabilities [B, Hq, S, S]; differentiable through plain autograd.

    compute_dtype: dtype of the matmuls (default: float32, or float64 for float64 inputs). The softmax
    runs in at least float32 and its probabilities are cast to compute_dtype before P @ V, exactly as
    plain PyTorch eager attention does; tests run it in bf16/fp16 to measure PyTorch's own
    low-precision error. Returns out [B, S, Hq, D] in q's dtype and mass [B, Hq, S, R].
    """
    q, k, v = problem.q, problem.k, problem.v
    batch, seq_len, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[2]
    if compute_dtype is None:
        compute_dtype = _mass_dtype(q.dtype)
    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
    q_ = q.to(compute_dtype).transpose(1, 2)                                 # [B, Hq, S, D]
    k_ = k.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    v_ = v.to(compute_dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    qk = q_ @ k_.transpose(-1, -2)                                            # [B, Hq, S, S]
    mult, bias = _logit_multiplier_and_bias(problem, 0, seq_len, 0, seq_len, compute_dtype)
    logits = qk * (problem.softmax_scale if mult is None else mult)
    if bias is not None:
        logits = logits + bias
    allowed = _allowed(problem, 0, seq_len, 0, seq_len)[:, None]             # [B, 1, S, S]
    logits = logits.to(softmax_dtype).masked_fill(~allowed, -math.inf)
    # Rows where nothing is allowed (or every allowed logit is -inf) would softmax to NaN: zero them.
    empty_row = torch.isneginf(logits).all(dim=-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(empty_row, 0.0), dim=-1).masked_fill(empty_row, 0.0)
    probs = probs.to(compute_dtype)
    out = (probs @ v_).transpose(1, 2).to(q.dtype)
    mass_dtype = torch.promote_types(compute_dtype, torch.float32)
    mass = probs.to(mass_dtype) @ _role_one_hot(problem, 0, seq_len, mass_dtype)[:, None]
    return out, mass


# ----------------------------------------------------------------------------------------------------
# Blockwise PyTorch: online softmax over key tiles, recomputing backward


def _tile_logits(problem, qt, kt, i0, i1, j0, j1):
    """Edited, masked logits of one tile [B, Hkv, G, TQ, TK] and the multiplier c of q.k (or None)."""
    batch, num_kv_heads, group = qt.shape[:3]
    qk = qt @ kt.unsqueeze(2).transpose(-1, -2)                              # [B, Hkv, G, TQ, TK]
    mult, bias = _logit_multiplier_and_bias(problem, i0, i1, j0, j1, qt.dtype)
    if mult is None:
        logits = qk * problem.softmax_scale
    else:
        mult = mult.reshape(mult.shape[0], -1, group, *mult.shape[2:]) if mult.shape[1] > 1 else mult.unsqueeze(1)
        logits = qk * mult
    if bias is not None:
        logits = logits + bias.reshape(batch, num_kv_heads, group, *bias.shape[2:])
    allowed = _allowed(problem, i0, i1, j0, j1)[:, None, None]               # [B, 1, 1, TQ, TK]
    return logits.masked_fill(~allowed, -math.inf), mult


def _grouped(x: torch.Tensor, num_kv_heads: int, dtype) -> torch.Tensor:
    """[B, T, Hq, X] -> [B, Hkv, G, T, X] in `dtype` (q head h = kv head h // G, group member h % G)."""
    batch, tokens, num_q_heads, width = x.shape
    return x.to(dtype).reshape(batch, tokens, num_kv_heads, num_q_heads // num_kv_heads, width).permute(0, 2, 3, 1, 4)


def _blockwise_forward(problem: RoleAttentionProblem):
    q, k, v = problem.q, problem.k, problem.v
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads, group = k.shape[2], num_q_heads // k.shape[2]
    cdt = _mass_dtype(q.dtype)
    out = torch.empty_like(q)
    mass = torch.empty(batch, num_q_heads, seq_len, problem.num_roles, dtype=cdt, device=q.device)
    lse = torch.empty(batch, num_q_heads, seq_len, dtype=cdt, device=q.device)
    for i0 in range(0, seq_len, BLOCKWISE_TILE_Q):
        i1 = min(i0 + BLOCKWISE_TILE_Q, seq_len)
        qt = _grouped(q[:, i0:i1], num_kv_heads, cdt)                         # [B, Hkv, G, TQ, D]
        stat_shape = (batch, num_kv_heads, group, i1 - i0)
        row_max = torch.full(stat_shape, -math.inf, dtype=cdt, device=q.device)
        row_sum = torch.zeros(stat_shape, dtype=cdt, device=q.device)
        acc = torch.zeros(*stat_shape, head_dim, dtype=cdt, device=q.device)
        mass_acc = torch.zeros(*stat_shape, problem.num_roles, dtype=cdt, device=q.device)
        lo, hi = problem.key_range(i0, i1)
        for j0 in range(lo - lo % BLOCKWISE_TILE_K, hi, BLOCKWISE_TILE_K):
            j0, j1 = max(j0, lo), min(j0 + BLOCKWISE_TILE_K, hi)
            kt = k[:, j0:j1].to(cdt).transpose(1, 2)                         # [B, Hkv, TK, D]
            vt = v[:, j0:j1].to(cdt).transpose(1, 2)
            logits, _ = _tile_logits(problem, qt, kt, i0, i1, j0, j1)
            new_max = torch.maximum(row_max, logits.amax(dim=-1))
            # A row with nothing allowed so far keeps max -inf; shift by 0 then so exp gives 0, not NaN.
            shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(row_max - shift)
            probs = torch.exp(logits - shift.unsqueeze(-1))                   # unnormalised P of the tile
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale.unsqueeze(-1) + probs @ vt.unsqueeze(2)
            mass_acc = mass_acc * rescale.unsqueeze(-1) + probs @ _role_one_hot(problem, j0, j1, cdt)[:, None, None]
            row_max = new_max
        nonempty = row_sum > 0
        inv = torch.where(nonempty, 1.0 / torch.where(nonempty, row_sum, torch.ones_like(row_sum)), 0.0)
        out_t = (acc * inv.unsqueeze(-1)).permute(0, 3, 1, 2, 4).reshape(batch, i1 - i0, num_q_heads, head_dim)
        out[:, i0:i1] = out_t.to(q.dtype)
        mass[:, :, i0:i1] = (mass_acc * inv.unsqueeze(-1)).reshape(batch, num_q_heads, i1 - i0, -1)
        # +inf log-sum-exp on empty rows makes the backward's exp(z - lse) exactly 0 there.
        tile_lse = torch.where(nonempty, row_max + torch.log(torch.where(nonempty, row_sum, 1.0)), math.inf)
        lse[:, :, i0:i1] = tile_lse.reshape(batch, num_q_heads, i1 - i0)
    return out, mass, lse


def _blockwise_backward(problem, out, mass, lse, grad_out, grad_mass):
    q, k, v = problem.q, problem.k, problem.v
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads, group = k.shape[2], num_q_heads // k.shape[2]
    cdt = _mass_dtype(q.dtype)
    dq = torch.zeros(batch, seq_len, num_q_heads, head_dim, dtype=cdt, device=q.device)
    dk = torch.zeros(batch, seq_len, num_kv_heads, head_dim, dtype=cdt, device=q.device)
    dv = torch.zeros_like(dk)
    # D_i = dout_i . out_i + sum_r g_ir mass_ir: the softmax-backward row term of both outputs.
    delta = torch.zeros(batch, num_q_heads, seq_len, dtype=cdt, device=q.device)
    if grad_out is not None:
        delta += (grad_out.to(cdt) * out.to(cdt)).sum(-1).transpose(1, 2)
    if grad_mass is not None:
        delta += (grad_mass.to(cdt) * mass.to(cdt)).sum(-1)
    def grouped_stat(x, i0, i1):
        return x[:, :, i0:i1].reshape(batch, num_kv_heads, group, i1 - i0, *x.shape[3:])

    for i0 in range(0, seq_len, BLOCKWISE_TILE_Q):
        i1 = min(i0 + BLOCKWISE_TILE_Q, seq_len)
        qt = _grouped(q[:, i0:i1], num_kv_heads, cdt)
        dot_ = _grouped(grad_out[:, i0:i1], num_kv_heads, cdt) if grad_out is not None else None
        lse_t, delta_t = grouped_stat(lse, i0, i1).unsqueeze(-1), grouped_stat(delta, i0, i1).unsqueeze(-1)
        g_t = grouped_stat(grad_mass.to(cdt), i0, i1) if grad_mass is not None else None
        dq_t = torch.zeros_like(qt)
        lo, hi = problem.key_range(i0, i1)
        for j0 in range(lo - lo % BLOCKWISE_TILE_K, hi, BLOCKWISE_TILE_K):
            j0, j1 = max(j0, lo), min(j0 + BLOCKWISE_TILE_K, hi)
            kt = k[:, j0:j1].to(cdt).transpose(1, 2)
            vt = v[:, j0:j1].to(cdt).transpose(1, 2)
            logits, mult = _tile_logits(problem, qt, kt, i0, i1, j0, j1)
            probs = torch.exp(logits - lse_t)                                # normalised P, 0 where masked
            dprobs = torch.zeros_like(probs) if dot_ is None else dot_ @ vt.unsqueeze(2).transpose(-1, -2)
            if g_t is not None:                                              # g[i, role_j]
                dprobs = dprobs + g_t @ _role_one_hot(problem, j0, j1, cdt)[:, None, None].transpose(-1, -2)
            dlogits = probs * (dprobs - delta_t)
            dqk = dlogits * (problem.softmax_scale if mult is None else mult)
            dq_t += dqk @ kt.unsqueeze(2)
            dk[:, j0:j1] += (dqk.transpose(-1, -2) @ qt).sum(2).transpose(1, 2)
            if dot_ is not None:
                dv[:, j0:j1] += (probs.transpose(-1, -2) @ dot_).sum(2).transpose(1, 2)
        dq[:, i0:i1] = dq_t.permute(0, 3, 1, 2, 4).reshape(batch, i1 - i0, num_q_heads, head_dim)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockwiseRoleAttention(torch.autograd.Function):
    """Blockwise forward storing only out, mass and the row log-sum-exp; backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, v, problem):
        out, mass, lse = _blockwise_forward(problem)
        # q, k, v go through save_for_backward (autograd then catches in-place edits before backward);
        # the rest of the problem (roles, masks, tables) is constant.
        ctx.problem = dataclasses.replace(problem, q=None, k=None, v=None)
        ctx.save_for_backward(q, k, v, out, mass, lse)
        ctx.set_materialize_grads(False)
        return out, mass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_mass):
        q, k, v, out, mass, lse = ctx.saved_tensors
        if grad_out is None and grad_mass is None:
            return None, None, None, None
        problem = dataclasses.replace(ctx.problem, q=q, k=k, v=v)
        with exact_precision(q):  # a backward() called inside autocast runs this under it
            dq, dk, dv = _blockwise_backward(problem, out, mass, lse, grad_out, grad_mass)
        return dq, dk, dv, None
