"""The role-mass probe: per-role attention mass of selected query rows, with no output and no V.

AVAR reads attention masses of few rows: AGTO and the VAS meter read the user-text queries after the image,
the GRPO visual reward the response rows. :func:`role_mass` computes exactly
:func:`megatron_avar.ops.role_attention`'s ``mass`` at those rows, so a layer can take ``out`` from the
fastest attention of the platform and pay for masses only where they are read: the work is
N x (keys those rows see), not S x S.

For selected row n (flat query index t_n), head h (kv head h // G), allowed keys j (role >= 0, inside the
row's sample window, j <= t_n if causal):
  z_nj = (q_{t_n} . k_j) * softmax_scale,   P_nj = softmax_j z_nj,   mass[n, h, r] = sum_{j: role_j = r} P_nj
Backward, with g = dL/dmass and D_n = sum_r g_nr mass_nr:
  dz_nj = P_nj * (g[n, role_j] - D_n),   dq_{t_n} += scale * sum_j dz_nj k_j,   dk_j += scale * sum_n dz_nj q_{t_n}
Rows with no allowed key get mass 0 and no gradient. Role logit edits (interventions) are not offered here:
they change ``out``, which only the fused :func:`role_attention` computes.

Implementations: "reference" materialises [N, Hq, T] logits (tests); "blockwise" is the PyTorch path (CPU):
sorted rows in tiles that never span two samples, each tile over its own keys only, online softmax,
recomputing backward; "triton" (``role_mass_triton``) runs fused kernels on CUDA (or the interpreter).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from megatron_avar.ops.role_attention import _mass_dtype, _resolve_impl, check_common_args, exact_precision
from megatron_avar.segments import packed_sample_windows

__all__ = ["role_mass", "masses_at_rows", "build_mass_problem", "reference_role_mass", "RoleMassProblem",
           "MASS_IMPLEMENTATIONS"]

MASS_IMPLEMENTATIONS = ("auto", "reference", "blockwise", "triton")

# Blockwise tiles: rows per tile (never across a sample boundary) and keys per tile. Tests lower them.
BLOCKWISE_ROWS = 64
BLOCKWISE_KEYS = 512


@dataclasses.dataclass(frozen=True)
class RoleMassProblem:
    """A validated call in flat form.

    q [M, Hq, D] and k [T, Hkv, D] (a padded [B, S] batch flattened to T = B*S tokens); key_roles int [T] in
    [-1, R); rows int64 [N] flat query indices; q_index int64 [N]: the row of q holding row n's query (``rows``
    itself when q has k's tokens, M = T); key_lo / key_hi int64 [N]: the keys [lo, hi) row n may see (its batch
    row or packed sample, cut at the row itself when causal); num_windows: how many batch rows or packed samples
    there are (a bound on the distinct key_lo values). Built on the inputs' device with no host synchronisation.
    """

    q: torch.Tensor
    k: torch.Tensor
    key_roles: torch.Tensor
    rows: torch.Tensor
    q_index: torch.Tensor
    key_lo: torch.Tensor
    key_hi: torch.Tensor
    num_roles: int
    softmax_scale: float
    num_windows: int


def masses_at_rows(mass: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """role_attention's padded masses [B, H, S, R] at flat query rows ``rows`` (b * S + i): [N, H, R], what
    :func:`role_mass` returns for those rows."""
    return mass.permute(0, 2, 1, 3).reshape(-1, *mass.shape[1::2])[rows]


def role_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    key_roles: torch.Tensor,
    query_rows: torch.Tensor,
    *,
    num_roles: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    impl: str = "auto",
    check_values: bool = True,
    q_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-role attention mass of the query rows ``query_rows``: float32 [N, Hq, R] (float64 for float64 q).

    Layouts, masks and GQA as :func:`megatron_avar.ops.role_attention`:
      padded: q [B, S, Hq, D], k [B, S, Hkv, D], key_roles [B, S]; query_rows are flat indices b*S + i;
      packed THD (``cu_seqlens`` int [M + 1], 0 = cu[0] <= ... <= cu[M] = T): q [T, Hq, D], k [T, Hkv, D],
      key_roles [T]; query_rows are token indices, and row t sees only keys of its own sample.
    key_roles -1 marks padding (never attended). query_rows: int64 [N], any order, repeats allowed; the
    result's row n belongs to query_rows[n]. Equal to role_attention's mass at those rows (mass[b, h, i, :]
    padded, mass[h, t, :] THD).

    Differentiable w.r.t. q and k through any loss of the masses (first order). dtypes float32, float16,
    bfloat16 (float64 for reference / blockwise); logits and masses accumulate in float32 or wider.
    Extra memory O(N * Hq * R) plus tiles.

    check_values: verify key_roles' range, cu_seqlens and query_rows' range on the host (one device sync
    each). Callers that validated them once per batch (the AVAR layers) pass False: then nothing here waits
    for the device.

    q_index: int64 [N] or None. Given, q holds only queries, q [M, Hq, D] in any order, and row n's query is
    q[q_index[n]] while its keys and mask are those of token query_rows[n] in k's layout (context parallelism:
    a rank's own queries against the whole row's keys). None: q has k's tokens and row n's query is its own.
    """
    problem = build_mass_problem(q, k, key_roles, query_rows, num_roles=num_roles, causal=causal,
                                 softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, impl=impl,
                                 check_values=check_values, q_index=q_index)
    impl = _resolve_impl(impl, problem.q)
    if problem.rows.numel() == 0:
        return problem.q.new_zeros(0, problem.q.shape[1], num_roles, dtype=_mass_dtype(problem.q.dtype)) \
            + 0 * problem.q.sum() + 0 * problem.k.sum()  # keeps the autograd graph
    if impl == "reference":
        with exact_precision(problem.q):
            return reference_role_mass(problem)
    if impl == "blockwise":
        with exact_precision(problem.q):
            return _BlockwiseRoleMass.apply(problem.q, problem.k, problem)
    from megatron_avar.ops import role_mass_triton

    return role_mass_triton.triton_role_mass(problem)


# ----------------------------------------------------------------------------------------------------
# Validation


def build_mass_problem(q, k, key_roles, query_rows, *, num_roles, causal=True, softmax_scale=None,
                       cu_seqlens=None, impl="auto", check_values=True, q_index=None) -> RoleMassProblem:
    """Validate :func:`role_mass`'s arguments (same meaning) into a :class:`RoleMassProblem`.

    Raises TypeError / ValueError naming the bad argument and the fix.
    """
    indices = dict(key_roles=key_roles, query_rows=query_rows) | ({} if q_index is None else dict(q_index=q_index))
    check_common_args(dict(q=q, k=k), indices, num_roles=num_roles, causal=causal, impl=impl,
                      implementations=MASS_IMPLEMENTATIONS)
    thd = cu_seqlens is not None
    want_dim = 3 if thd else 4
    layout = "[T, H, D] (THD, cu_seqlens given)" if thd else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k)) if q_index is None else (("k", k),):
        if t.dim() != want_dim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}"
                             + ("" if thd else "; for packed sequences pass cu_seqlens"))
    if q_index is None and (q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q {tuple(q.shape)} in tokens or head_dim; "
                         "only the head count may differ (GQA)")
    if q_index is not None:
        if q.dim() != 3 or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"with q_index, q must be [M, Hq, D] queries with k's head_dim ({k.shape[-1]}), got "
                             f"shape {tuple(q.shape)}")
        if q_index.dim() != 1 or q_index.dtype not in (torch.int64, torch.int32) or q_index.shape != query_rows.shape:
            raise TypeError(f"q_index must be int64 [N] like query_rows ({tuple(query_rows.shape)}), got "
                            f"{q_index.dtype} of shape {tuple(q_index.shape)}")
    num_q_heads, num_kv_heads, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key heads ({num_kv_heads})")
    tokens_shape = tuple(k.shape[:-2])
    if key_roles.dtype.is_floating_point or key_roles.dtype.is_complex or key_roles.dtype == torch.bool:
        raise TypeError(f"key_roles must be an integer tensor of role ids, got {key_roles.dtype}")
    if tuple(key_roles.shape) != tokens_shape:
        raise ValueError(f"key_roles must have shape {tokens_shape} (one role per key), got {tuple(key_roles.shape)}")
    if query_rows.dim() != 1 or query_rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"query_rows must be a 1-D int64 tensor of flat query indices, got "
                        f"{query_rows.dtype} of shape {tuple(query_rows.shape)}")
    total = math.prod(tokens_shape)
    if check_values and key_roles.numel():
        lo, hi = (int(x) for x in torch.aminmax(key_roles))
        if lo < -1 or hi >= num_roles:
            raise ValueError(f"key_roles values must lie in [-1, num_roles={num_roles}) (-1 = padding), "
                             f"got min {lo}, max {hi}; raise num_roles or fix the role ids")
    if check_values and query_rows.numel():
        lo, hi = (int(x) for x in torch.aminmax(query_rows))
        if lo < 0 or hi >= total:
            raise ValueError(f"query_rows must be flat query indices in [0, {total}) "
                             f"({'T' if thd else 'B*S'} = {total}), got min {lo}, max {hi}")
    if check_values and q_index is not None and q_index.numel():
        lo, hi = (int(x) for x in torch.aminmax(q_index))
        if lo < 0 or hi >= q.shape[0]:
            raise ValueError(f"q_index must index q's {q.shape[0]} queries, got min {lo}, max {hi}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
            or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None (1/sqrt(D)), got {softmax_scale!r}")

    rows = query_rows.long()
    if thd:
        key_lo, key_hi = _packed_windows(cu_seqlens, rows, total, check_values)
    else:
        seq_len = tokens_shape[1]
        key_lo = rows - rows % seq_len if seq_len else rows
        key_hi = key_lo + seq_len
    if causal:
        key_hi = torch.minimum(key_hi, rows + 1)
    return RoleMassProblem(q=q.reshape(total, num_q_heads, head_dim) if q_index is None else q,
                           k=k.reshape(total, num_kv_heads, head_dim), key_roles=key_roles.reshape(total), rows=rows,
                           q_index=rows if q_index is None else q_index.long(), key_lo=key_lo, key_hi=key_hi,
                           num_roles=num_roles, softmax_scale=float(softmax_scale),
                           num_windows=len(cu_seqlens) - 1 if thd else tokens_shape[0])


def _packed_windows(cu_seqlens, rows, total, check_values):
    """[lo, hi) of each row's packed sample, on the device (``segments.packed_sample_windows``; no host copy of
    cu_seqlens unless ``check_values``)."""
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != rows.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but query_rows is on {rows.device}")
    return packed_sample_windows(cu_seqlens, rows, total, check_values=check_values)


def _role_one_hot(roles: torch.Tensor, num_roles: int, dtype) -> torch.Tensor:
    """[K, R] one-hot of key roles; padding (-1) maps to an all-zero row."""
    return torch.nn.functional.one_hot(roles.long() + 1, num_roles + 1)[:, 1:].to(dtype)


# ----------------------------------------------------------------------------------------------------
# Reference: materialises [N, Hq, T] (ground truth for tests)


def reference_role_mass(problem: RoleMassProblem) -> torch.Tensor:
    """Masses from the full [N, Hq, T] probabilities in float32 (float64 for float64); plain autograd."""
    p = problem
    cdt = _mass_dtype(p.q.dtype)
    group = p.q.shape[1] // p.k.shape[1]
    q_rows = p.q[p.q_index].to(cdt)                                           # [N, Hq, D]
    keys = p.k.to(cdt).repeat_interleave(group, dim=1)                       # [T, Hq, D]
    logits = torch.einsum("nhd,thd->nht", q_rows, keys) * p.softmax_scale
    cols = torch.arange(p.k.shape[0], device=p.k.device)
    allowed = (cols >= p.key_lo[:, None]) & (cols < p.key_hi[:, None]) & (p.key_roles >= 0)[None]   # [N, T]
    logits = logits.masked_fill(~allowed[:, None], -math.inf)
    empty = ~allowed.any(-1)[:, None, None]
    probs = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs @ _role_one_hot(p.key_roles, p.num_roles, cdt)


# ----------------------------------------------------------------------------------------------------
# Blockwise PyTorch (the CPU path): row tiles inside one sample, each over its own key range


def _row_tiles(problem: RoleMassProblem):
    """Sorted row order and tiles (a, b, key_lo, key_hi) of at most BLOCKWISE_ROWS sorted rows of one sample.

    Host lists: this is the CPU path (Triton's kernels find their ranges on the device)."""
    order = torch.argsort(problem.rows, stable=True)
    lo = problem.key_lo[order].tolist()
    hi = problem.key_hi[order].tolist()
    tiles, a = [], 0
    while a < len(lo):
        b = a + 1
        while b < len(lo) and b - a < BLOCKWISE_ROWS and lo[b] == lo[a]:
            b += 1
        tiles.append((a, b, lo[a], max(hi[a:b])))
        a = b
    return order, tiles


def _tile_logits(problem, q_tile, j0, j1, lo_t, hi_t):
    """Masked logits [n, Hkv, G, tk] of a row tile against keys [j0, j1)."""
    k_tile = problem.k[j0:j1].to(q_tile.dtype)                              # [tk, Hkv, D]
    logits = torch.einsum("nhgd,thd->nhgt", q_tile, k_tile) * problem.softmax_scale
    cols = torch.arange(j0, j1, device=q_tile.device)
    allowed = (cols >= lo_t[:, None]) & (cols < hi_t[:, None]) & (problem.key_roles[j0:j1] >= 0)[None]
    return logits.masked_fill(~allowed[:, None, None], -math.inf), k_tile


def _blockwise_forward(problem: RoleMassProblem):
    cdt = _mass_dtype(problem.q.dtype)
    num_rows, num_q_heads = problem.rows.numel(), problem.q.shape[1]
    num_kv_heads, head_dim = problem.k.shape[1], problem.q.shape[2]
    group = num_q_heads // num_kv_heads
    order, tiles = _row_tiles(problem)
    mass = torch.zeros(num_rows, num_q_heads, problem.num_roles, dtype=cdt, device=problem.q.device)
    lse = torch.full((num_rows, num_q_heads), math.inf, dtype=cdt, device=problem.q.device)
    for a, b, key_lo, key_hi in tiles:
        index = order[a:b]
        q_tile = problem.q[problem.q_index[index]].to(cdt).reshape(b - a, num_kv_heads, group, head_dim)
        lo_t, hi_t = problem.key_lo[index], problem.key_hi[index]
        row_max = torch.full((b - a, num_kv_heads, group), -math.inf, dtype=cdt, device=q_tile.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(b - a, num_kv_heads, group, problem.num_roles, dtype=cdt, device=q_tile.device)
        for j0 in range(key_lo, key_hi, BLOCKWISE_KEYS):
            j1 = min(j0 + BLOCKWISE_KEYS, key_hi)
            logits, _ = _tile_logits(problem, q_tile, j0, j1, lo_t, hi_t)
            new_max = torch.maximum(row_max, logits.amax(-1))
            shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(row_max - shift)
            probs = torch.exp(logits - shift[..., None])
            row_sum = row_sum * rescale + probs.sum(-1)
            acc = acc * rescale[..., None] + probs @ _role_one_hot(problem.key_roles[j0:j1], problem.num_roles, cdt)
            row_max = new_max
        nonempty = row_sum > 0
        inv = torch.where(nonempty, 1.0 / torch.where(nonempty, row_sum, torch.ones_like(row_sum)), 0.0)
        mass[index] = (acc * inv[..., None]).reshape(b - a, num_q_heads, problem.num_roles)
        tile_lse = torch.where(nonempty, row_max + torch.log(torch.where(nonempty, row_sum, 1.0)), math.inf)
        lse[index] = tile_lse.reshape(b - a, num_q_heads)
    return mass, lse


def _blockwise_backward(problem: RoleMassProblem, mass, lse, grad_mass):
    cdt = _mass_dtype(problem.q.dtype)
    num_q_heads, (num_kv_heads, head_dim) = problem.q.shape[1], problem.k.shape[1:]
    group = num_q_heads // num_kv_heads
    dq = torch.zeros(problem.q.shape, dtype=cdt, device=problem.q.device)
    dk = torch.zeros(problem.k.shape, dtype=cdt, device=problem.k.device)
    grad_mass = grad_mass.to(cdt)
    delta = (grad_mass * mass).sum(-1)                                      # [N, Hq]
    order, tiles = _row_tiles(problem)
    for a, b, key_lo, key_hi in tiles:
        index = order[a:b]
        rows = problem.q_index[index]
        q_tile = problem.q[rows].to(cdt).reshape(b - a, num_kv_heads, group, head_dim)
        lo_t, hi_t = problem.key_lo[index], problem.key_hi[index]
        shape = (b - a, num_kv_heads, group)
        lse_t, delta_t = lse[index].reshape(*shape, 1), delta[index].reshape(*shape, 1)
        g_t = grad_mass[index].reshape(*shape, problem.num_roles)
        dq_t = torch.zeros_like(q_tile)
        for j0 in range(key_lo, key_hi, BLOCKWISE_KEYS):
            j1 = min(j0 + BLOCKWISE_KEYS, key_hi)
            logits, k_tile = _tile_logits(problem, q_tile, j0, j1, lo_t, hi_t)
            probs = torch.exp(logits - lse_t)                                # normalised P, 0 where masked
            g_of_key = g_t @ _role_one_hot(problem.key_roles[j0:j1], problem.num_roles, cdt).T
            dz = probs * (g_of_key - delta_t) * problem.softmax_scale        # [n, Hkv, G, tk]
            dq_t += torch.einsum("nhgt,thd->nhgd", dz, k_tile)
            dk[j0:j1] += torch.einsum("nhgt,nhgd->thd", dz, q_tile)
        dq.index_add_(0, rows, dq_t.reshape(b - a, num_q_heads, head_dim))
    return dq.to(problem.q.dtype), dk.to(problem.k.dtype)


class _BlockwiseRoleMass(torch.autograd.Function):
    """Blockwise forward keeping only mass and the row log-sum-exp; backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, problem):
        mass, lse = _blockwise_forward(problem)
        ctx.problem = dataclasses.replace(problem, q=None, k=None)
        ctx.save_for_backward(q, k, mass, lse)
        return mass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mass):
        q, k, mass, lse = ctx.saved_tensors
        problem = dataclasses.replace(ctx.problem, q=q, k=k)
        with exact_precision(q):  # a backward() called inside autocast runs this under it
            dq, dk = _blockwise_backward(problem, mass, lse, grad_mass)
        return dq, dk, None
