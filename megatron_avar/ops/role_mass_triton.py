"""Triton kernels for the role-mass probe (the GPU path of :func:`megatron_avar.ops.role_mass`).

Design: the forward of FlashAttention-2 (an online softmax in base 2 over key tiles, keeping only the row
log-sum-exp) applied to a gathered block of selected query rows, with the role masses as the only output:
per key tile, P @ one-hot(key roles) adds each role's probability (a [BLOCK_M, BLOCK_N] x [BLOCK_N, BLOCK_R]
product). Rows are sorted, and each window's rows (a batch row's, a packed sample's) start a row block of their
own: the rows are laid out in slots with empty ones (no keys) after a window's last block. A block's rows thus see
one window: it walks only the keys between its rows' first window start and last window end, and skips key tiles
no row of the block may see, so the work follows N x (keys those rows see). (Blocks cut every BLOCK_M rows
spanned several samples when each has fewer rows, as AGTO's tens of query rows per packed sample: every key tile
from the first sample's start to the last one's end, ~1.5x the tiles at 16 samples of 2k with 40 rows each.)

Backward (dz_nj = P_nj * (g[n, role_j] - D_n), D_n = sum_r g_nr mass_nr): one kernel per row block for dq
(the selected rows' gradient, added into dq by PyTorch, so repeated rows accumulate), one per (key tile, kv
head) for dk that loops over the G query heads and over the row blocks whose key range meets its tile.
No atomics: results are deterministic. Offsets are 64-bit (no overflow past 2^31 elements).

Under TRITON_INTERPRET=1 (CPU tests) the kernels run interpreted, with dot operands in fp32 (the
interpreter's bf16 dots are wrong) and small blocks.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.knobs
import triton.language as tl

from megatron_avar import platform
from megatron_avar.ops.role_mass import RoleMassProblem

# Triton's DSL as pyright reads it: @triton.jit kernels take Python ints and bools for their tl.constexpr
# parameters at launch, iterate tl.static_range, and index with None/slices; pyright checks them as plain Python
# calls and reports false errors. Those four rules are off in this file (the launchers' Python is still checked
# for Optional access, attributes and returns).
# pyright: reportArgumentType=false, reportCallIssue=false, reportGeneralTypeIssues=false, reportOperatorIssue=false

INTERPRETING = bool(triton.knobs.runtime.interpret)
# (BLOCK_M, BLOCK_N, num_warps, num_stages): rows are few, so one configuration (no autotune, no
# compile-time spent trying others); the interpreter uses small blocks (milliseconds per program there).
GPU_BLOCKS = (64, 64, 4, 2)
INTERPRETER_BLOCK_M = 16
INTERPRETER_BLOCK_N = 16
_LOG2E = 1.4426950408889634
_NO_KEY_VALUE = 2 ** 62  # larger than any key index: the "start" of a row block with no rows
_NO_KEY = tl.constexpr(_NO_KEY_VALUE)


@triton.jit
def _load_rows(Queries, KeyLo, KeyHi, offs_m, num_rows):
    """Per row of the block: in range, the row of q holding its query, its key window [lo, hi)."""
    row_ok = offs_m < num_rows
    tok = tl.load(Queries + offs_m, mask=row_ok, other=0)
    lo = tl.load(KeyLo + offs_m, mask=row_ok, other=0)
    hi = tl.load(KeyHi + offs_m, mask=row_ok, other=0)  # padding rows: empty window [0, 0)
    return row_ok, tok, lo, hi


@triton.jit
def _load_q(Q, tok, row_ok, head, offs_d, stride_qt, stride_qh, HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr):
    """The selected rows' q [BLOCK_M, BLOCK_D] of one head (fp32 under the interpreter)."""
    q = tl.load(Q + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _key_span(row_ok, lo, hi):
    """The rows that see any key, and the keys [start, end) the block walks (start > end when none does)."""
    nonempty = row_ok & (hi > lo)
    return nonempty, tl.min(tl.where(nonempty, lo, _NO_KEY), 0), tl.max(tl.where(nonempty, hi, 0), 0)


@triton.jit
def _load_grad_terms(Lse, Delta, DMass, rows64, row_ok, head, num_q_heads, stride_gn, stride_gh, offs_r,
                     NUM_ROLES: tl.constexpr):
    """Per row of one head: the base-2 lse, D = sum_r g_r mass_r, and g [BLOCK_M, BLOCK_R]."""
    lse = tl.load(Lse + rows64 * num_q_heads + head, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + rows64 * num_q_heads + head, mask=row_ok, other=0.0)
    g = tl.load(DMass + rows64[:, None] * stride_gn + head * stride_gh + offs_r[None, :],
                mask=row_ok[:, None] & (offs_r[None, :] < NUM_ROLES), other=0.0)
    return lse, delta, g


@triton.jit
def _scores(q, K, Roles, kv_head, offs_n, offs_d, lo, hi, num_keys, stride_kt, stride_kh, sm_scale_log2,
            HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Masked base-2 logits [BLOCK_M, BLOCK_N] of the rows against one key tile, the tile's K and roles."""
    n_ok = offs_n < num_keys
    k = tl.load(K + offs_n[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    roles = tl.load(Roles + offs_n, mask=n_ok, other=-1)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
    allowed = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None]) & (roles[None, :] >= 0)
    return tl.where(allowed, qk, float("-inf")), k, roles


@triton.jit
def _mass_fwd_kernel(
    Q, K, Roles, Queries, KeyLo, KeyHi, Mass, Lse,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_mn, stride_mh,
    num_rows, num_keys, num_q_heads, group, sm_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok, tok, lo, hi = _load_rows(Queries, KeyLo, KeyHi, offs_m, num_rows)
    q = _load_q(Q, tok, row_ok, head, offs_d, stride_qt, stride_qh, HEAD_DIM, DOT_FP32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    nonempty, start, end = _key_span(row_ok, lo, hi)
    for j0 in range(start, end, BLOCK_N):
        if tl.max((nonempty & (lo < j0 + BLOCK_N) & (hi > j0)).to(tl.int32), 0) > 0:  # some row sees the tile
            offs_n = j0 + tl.arange(0, BLOCK_N)
            qk, k, roles = _scores(q, K, Roles, kv_head, offs_n, offs_d, lo, hi, num_keys, stride_kt, stride_kh,
                                   sm_scale_log2, HEAD_DIM, DOT_FP32, PRECISION)
            new_max = tl.maximum(row_max, tl.max(qk, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp2(qk - shift[:, None])
            rescale = tl.exp2(row_max - shift)
            one_hot = (roles[:, None] == offs_r[None, :]).to(tl.float32)              # [BLOCK_N, BLOCK_R]
            row_sum = row_sum * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p, one_hot, input_precision="ieee")
            row_max = new_max
    has_keys = row_sum > 0
    inv = tl.where(has_keys, 1.0 / tl.where(has_keys, row_sum, 1.0), 0.0)
    mass = acc * inv[:, None]
    out_rows = offs_m.to(tl.int64)
    tl.store(Mass + out_rows[:, None] * stride_mn + head * stride_mh + offs_r[None, :], mass,
             mask=row_ok[:, None] & (offs_r[None, :] < NUM_ROLES))
    lse = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("inf"))
    tl.store(Lse + out_rows * num_q_heads + head, lse, mask=row_ok)


@triton.jit
def _dz(qk, lse, delta, g, roles, offs_r):
    """dz (in base-2 logit units' softmax) [BLOCK_M, BLOCK_N] = P * (g[row, role of key] - D_row)."""
    p = tl.exp2(qk - lse[:, None])                                                # 0 where masked or empty
    one_hot = (roles[:, None] == offs_r[None, :]).to(tl.float32)                  # [BLOCK_N, BLOCK_R]
    g_of_key = tl.dot(g, tl.trans(one_hot), input_precision="ieee")               # [BLOCK_M, BLOCK_N]
    return p * (g_of_key - delta[:, None])


@triton.jit
def _mass_dq_kernel(
    Q, K, Roles, Queries, KeyLo, KeyHi, Lse, Delta, DMass, DQ,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_gn, stride_gh, stride_dn, stride_dh,
    num_rows, num_keys, num_q_heads, group, sm_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok, tok, lo, hi = _load_rows(Queries, KeyLo, KeyHi, offs_m, num_rows)
    q = _load_q(Q, tok, row_ok, head, offs_d, stride_qt, stride_qh, HEAD_DIM, DOT_FP32)
    rows64 = offs_m.to(tl.int64)
    lse, delta, g = _load_grad_terms(Lse, Delta, DMass, rows64, row_ok, head, num_q_heads, stride_gn, stride_gh,
                                     offs_r, NUM_ROLES)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    nonempty, start, end = _key_span(row_ok, lo, hi)
    for j0 in range(start, end, BLOCK_N):
        if tl.max((nonempty & (lo < j0 + BLOCK_N) & (hi > j0)).to(tl.int32), 0) > 0:
            offs_n = j0 + tl.arange(0, BLOCK_N)
            qk, k, roles = _scores(q, K, Roles, kv_head, offs_n, offs_d, lo, hi, num_keys, stride_kt, stride_kh,
                                   sm_scale_log2, HEAD_DIM, DOT_FP32, PRECISION)
            dz = _dz(qk, lse, delta, g, roles, offs_r)
            dq += tl.dot(dz.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + rows64[:, None] * stride_dn + head * stride_dh + offs_d[None, :], dq * sm_scale,
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _mass_dk_kernel(
    Q, K, Roles, Queries, KeyLo, KeyHi, BlockLo, BlockHi, Lse, Delta, DMass, DK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_gn, stride_gh, stride_dkt, stride_dkh,
    num_rows, num_keys, num_q_heads, group, num_row_blocks, sm_scale_log2, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    j0 = pid_n.to(tl.int64) * BLOCK_N  # key offsets (offs_n * stride_kt) in 64 bits, as the other kernels' are
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for rb in range(0, num_row_blocks):
        block_lo = tl.load(BlockLo + rb)
        block_hi = tl.load(BlockHi + rb)
        if (block_lo < j0 + BLOCK_N) & (block_hi > j0):                        # the block's rows may see the tile
            offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok, tok, lo, hi = _load_rows(Queries, KeyLo, KeyHi, offs_m, num_rows)
            rows64 = offs_m.to(tl.int64)
            for member in range(0, group):
                head = kv_head * group + member
                q = _load_q(Q, tok, row_ok, head, offs_d, stride_qt, stride_qh, HEAD_DIM, DOT_FP32)
                lse, delta, g = _load_grad_terms(Lse, Delta, DMass, rows64, row_ok, head, num_q_heads, stride_gn,
                                                 stride_gh, offs_r, NUM_ROLES)
                qk, k, roles = _scores(q, K, Roles, kv_head, offs_n, offs_d, lo, hi, num_keys, stride_kt,
                                       stride_kh, sm_scale_log2, HEAD_DIM, DOT_FP32, PRECISION)
                dz = _dz(qk, lse, delta, g, roles, offs_r)
                dk += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + offs_n[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < num_keys) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------
# Launchers


@dataclasses.dataclass(frozen=True)
class _Sorted:
    order: torch.Tensor   # sorted position -> caller's row index
    slot: torch.Tensor    # sorted position -> its slot in the kernels' row layout (module docstring)
    queries: torch.Tensor  # per slot: the row of q holding its query (the kernels read q there only); 0 when empty
    lo: torch.Tensor      # per slot: the key window [lo, hi); [0, 0) when empty
    hi: torch.Tensor


def _check_runnable(problem: RoleMassProblem) -> None:
    if INTERPRETING:
        if problem.q.is_cuda:
            raise ValueError("TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors; unset it to run on CUDA")
    elif not problem.q.is_cuda:
        raise ValueError("impl='triton' needs CUDA tensors and Triton's GPU backend (or TRITON_INTERPRET=1 set "
                         "before megatron_avar.ops is imported); use impl='blockwise' on the CPU")


def _blocks():
    if INTERPRETING:
        return dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N), {}
    block_m, block_n, warps, stages = GPU_BLOCKS
    return dict(BLOCK_M=block_m, BLOCK_N=block_n), dict(num_warps=warps, num_stages=stages)


def _flags(problem: RoleMassProblem) -> dict:
    q = problem.q
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
                NUM_ROLES=problem.num_roles, BLOCK_R=max(16, triton.next_power_of_2(problem.num_roles)),
                DOT_FP32=INTERPRETING and q.dtype != torch.float32,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _sort(problem: RoleMassProblem) -> _Sorted:
    """The rows in the kernels' layout: sorted, each window's run of rows starting at a multiple of BLOCK_M. On the
    device, no host sync: the number of slots is a bound known on the host (N plus BLOCK_M - 1 per window)."""
    block_m = _blocks()[0]["BLOCK_M"]
    order = torch.argsort(problem.rows, stable=True)
    lo = problem.key_lo[order]
    num_rows = lo.numel()
    first = torch.ones(num_rows, dtype=torch.bool, device=lo.device)                # a window's first row
    first[1:] = lo[1:] != lo[:-1]                                                 # (lo: the window's start)
    window = torch.cumsum(first, 0) - 1                                           # [N] run index, runs <= N
    counts = torch.zeros(num_rows, dtype=torch.int64, device=lo.device).index_add_(0, window, torch.ones_like(lo))
    padded = (counts + block_m - 1) // block_m * block_m
    slot = (torch.cumsum(padded, 0) - padded)[window] \
        + torch.arange(num_rows, device=lo.device) - (torch.cumsum(counts, 0) - counts)[window]
    num_slots = num_rows + min(num_rows, problem.num_windows) * (block_m - 1)

    def laid_out(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_slots).index_copy_(0, slot, values)

    return _Sorted(order=order, slot=slot, queries=laid_out(problem.q_index[order]), lo=laid_out(lo),
                   hi=laid_out(problem.key_hi[order]))


def _forward(problem: RoleMassProblem, rows: _Sorted):
    """mass [slots, Hq, R] fp32 and the base-2 lse [slots, Hq] fp32, in the rows' slots (empty ones: 0 and inf)."""
    q, k = problem.q.contiguous(), problem.k.contiguous()
    num_rows, num_q_heads = rows.queries.numel(), q.shape[1]
    mass = torch.empty(num_rows, num_q_heads, problem.num_roles, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_rows, num_q_heads, dtype=torch.float32, device=q.device)
    blocks, launch = _blocks()
    grid = (triton.cdiv(num_rows, blocks["BLOCK_M"]), num_q_heads)
    _mass_fwd_kernel[grid](
        q, k, problem.key_roles.to(torch.int32).contiguous(), rows.queries, rows.lo, rows.hi, mass, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), mass.stride(0), mass.stride(1),
        num_rows, k.shape[0], num_q_heads, num_q_heads // k.shape[1], problem.softmax_scale * _LOG2E,
        **_flags(problem), **blocks, **launch)
    return mass, lse


def _backward(problem: RoleMassProblem, rows: _Sorted, mass, lse, grad_mass):
    """dq, dk of a loss with gradient ``grad_mass`` [slots, Hq, R] (in the rows' slots; 0 in empty ones) on the
    masses."""
    q, k = problem.q.contiguous(), problem.k.contiguous()
    num_rows, num_q_heads = rows.queries.numel(), q.shape[1]
    num_keys, num_kv_heads = k.shape[0], k.shape[1]
    grad_mass = grad_mass.to(torch.float32).contiguous()
    delta = (grad_mass * mass).sum(-1).contiguous()                               # [N, Hq]
    roles = problem.key_roles.to(torch.int32).contiguous()
    blocks, launch = _blocks()
    block_m = blocks["BLOCK_M"]
    num_row_blocks = triton.cdiv(num_rows, block_m)
    pad = num_row_blocks * block_m - num_rows                                     # a row block's key range
    empty = rows.hi <= rows.lo
    block_lo = torch.nn.functional.pad(torch.where(empty, _NO_KEY_VALUE, rows.lo), (0, pad), value=_NO_KEY_VALUE)
    block_hi = torch.nn.functional.pad(torch.where(empty, 0, rows.hi), (0, pad), value=0)
    block_lo = block_lo.reshape(num_row_blocks, block_m).amin(1).contiguous()
    block_hi = block_hi.reshape(num_row_blocks, block_m).amax(1).contiguous()
    flags, scalars = _flags(problem), (problem.softmax_scale * _LOG2E, problem.softmax_scale)
    dq_rows = torch.empty(num_rows, num_q_heads, q.shape[2], dtype=torch.float32, device=q.device)
    _mass_dq_kernel[(num_row_blocks, num_q_heads)](
        q, k, roles, rows.queries, rows.lo, rows.hi, lse, delta, grad_mass, dq_rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), grad_mass.stride(0), grad_mass.stride(1),
        dq_rows.stride(0), dq_rows.stride(1), num_rows, num_keys, num_q_heads, num_q_heads // num_kv_heads,
        *scalars, **flags, **blocks, **launch)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _mass_dk_kernel[(triton.cdiv(num_keys, blocks["BLOCK_N"]), num_kv_heads)](
        q, k, roles, rows.queries, rows.lo, rows.hi, block_lo, block_hi, lse, delta, grad_mass, dk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), grad_mass.stride(0), grad_mass.stride(1),
        dk.stride(0), dk.stride(1), num_rows, num_keys, num_q_heads, num_q_heads // num_kv_heads, num_row_blocks,
        *scalars, **flags, **blocks, **launch)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device).index_add_(0, rows.queries, dq_rows)
    return dq.to(q.dtype), dk


class _TritonRoleMass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, problem):
        rows = _sort(problem)
        mass_slots, lse = _forward(problem, rows)
        ctx.problem = dataclasses.replace(problem, q=None, k=None)
        ctx.rows = rows
        ctx.save_for_backward(q, k, mass_slots, lse)
        mass = mass_slots.new_empty(rows.order.numel(), *mass_slots.shape[1:])
        mass[rows.order] = mass_slots[rows.slot]
        return mass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mass):
        q, k, mass_slots, lse = ctx.saved_tensors
        problem = dataclasses.replace(ctx.problem, q=q, k=k)
        rows = ctx.rows
        with platform.on_device_of(q):
            grad_slots = grad_mass.new_zeros(mass_slots.shape).index_copy_(0, rows.slot, grad_mass[rows.order])
            dq, dk = _backward(problem, rows, mass_slots, lse, grad_slots)
        return dq, dk, None


def triton_role_mass(problem: RoleMassProblem) -> torch.Tensor:
    """:func:`role_mass` on the fused kernels: mass float32 [N, Hq, R] in the caller's row order."""
    _check_runnable(problem)
    with platform.on_device_of(problem.q):
        return _TritonRoleMass.apply(problem.q, problem.k, problem)
