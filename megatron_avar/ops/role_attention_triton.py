"""Triton kernels for role-mass attention (the GPU path of :func:`megatron_avar.ops.role_attention`).

Design: FlashAttention-2 (Tri Dao, https://tridao.me/publications/flash2/flash2.pdf) as laid out in
Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py): the forward walks key
tiles with an online softmax in base 2 and keeps only the row log-sum-exp; the backward recomputes P
per tile, with one kernel for dK/dV (per key tile) and one for dQ (per query tile), so nothing is
accumulated with atomics and results are deterministic. Written here from that design, not copied.

What is added to the tutorial's kernels:
* Role masses: inside the forward tile loop, P @ one_hot(key roles) ([BLOCK_M, BLOCK_N] x [BLOCK_N, BLOCK_R],
  BLOCK_R >= 16 for tl.dot) is added to an fp32 accumulator [BLOCK_M, BLOCK_R] that is rescaled by the running
  max exactly like the output accumulator. The product runs on tensor cores with P split into three bf16
  parts (hi + mid + lo hold all 24 bits of an fp32 significand, and one-hot entries are exact), so the
  masses are fp32 sums of the fp32 probabilities, as a per-role masked row sum would give (_role_dot).
* Backward through the masses: with upstream gradient g[i, r] on mass[i, r], dS_ij gains
  P_ij * (g[i, role_j] - sum_r g[i, r] mass[i, r]); the row term is folded into the usual
  D_i = dO_i . O_i, so dS_ij = P_ij * (dP_ij + g[i, role_j] - D_i). g[i, role_j] is the same split
  product, g @ one_hot^T, exact in fp32.
* Masks beyond causal: key padding (role -1), per-query key windows [row_start, row_end) for packed
  (THD) samples, and rows with no allowed key (out 0, mass 0, log-sum-exp +inf so the backward's P
  is exactly 0).
* Per-role logit edits on rows where query_mask is set: z = (q.k) * scale * role_scale + role_bias.
* GQA: q head h reads kv head h // G; the dK/dV kernel loops over the G query heads of a kv head.
* 64-bit addressing: a tile's row offset start * stride_s (and the batch and head offsets) are int64, so
  sequences whose offsets pass 2^31 elements (466k tokens of a fused-QKV view at Qwen2.5-VL-7B widths) are
  addressed correctly; offsets inside a tile stay int32, which a launcher guard keeps exact (_tile_ready).

The dK/dV kernel works on transposed tiles (S^T = K Q^T, [BLOCK_N, BLOCK_M]), as the tutorial does: every
product then has BLOCK_N rows, so a 32-row query tile still maps to Hopper's 64-row wgmma, and P^T, dS^T
feed dV += P^T dO and dK += dS^T Q from registers without a transpose.

Under TRITON_INTERPRET=1 (CPU tests) the same kernels run in Triton's interpreter, with three adjustments
(interpreter traps: docs/installation.md, 'Known dependency quirks'): tl.dot operands are cast to fp32 (bf16 dots
return garbage there), one fixed block configuration replaces autotuning, and one-hot matrices are built with
tl.where (a bool tensor cast to bf16 gives zeros).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.knobs
import triton.language as tl

from megatron_avar import platform
from megatron_avar.ops.role_attention import RoleAttentionProblem

# Triton's DSL as pyright reads it: @triton.jit kernels take Python ints and bools for their tl.constexpr
# parameters at launch, iterate tl.static_range, and index with None/slices; pyright checks them as plain Python
# calls and reports false errors. Those four rules are off in this file (the launchers' Python is still checked
# for Optional access, attributes and returns).
# pyright: reportArgumentType=false, reportCallIssue=false, reportGeneralTypeIssues=false, reportOperatorIssue=false

# Whether @triton.jit below produces interpreted functions: decided by Triton at decoration time.
INTERPRETING = bool(triton.knobs.runtime.interpret)

# Block sizes used under the interpreter (each program instance costs milliseconds there, so fewer,
# larger blocks are faster); tests may lower them to get several tiles on short sequences.
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 32

MAX_TRITON_ROLES = 16  # the one-hot role matrices are BLOCK_R = 16 wide
# Offsets inside a tile are int32: (BLOCK - 1) * stride_s + BLOCK_D < 2^31 for BLOCK <= 128, BLOCK_D <= 256 while a
# per-token stride is below 2^24 elements. Inputs with a larger one are copied (a [.., H, D] layout has H * D).
MAX_TILE_ROW_STRIDE = 2 ** 24
# The role dots' bf16 operands go to the interpreter's tl.dot as fp32 (its bf16 dots are wrong; fp32 is exact).
_BF16_DOTS_IN_FP32 = tl.constexpr(INTERPRETING)
# Logits are handled in base 2 (exp2/log2 are the fast hardware paths): z2 = z * log2(e).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_rows(Ptr, offs, n, other):
    return tl.load(Ptr + offs, mask=offs < n, other=other)


@triton.jit
def _row_offset(start, stride):
    """Element offset of row ``start`` (int64: start * stride passes 2^31 on long sequences)."""
    return tl.cast(start, tl.int64) * stride


@triton.jit
def _one_hot(is_role):
    """1.0 / 0.0 in bf16 (a bool tensor cast straight to bf16 gives zeros under the interpreter)."""
    return tl.where(is_role, 1.0, 0.0).to(tl.bfloat16)


@triton.jit
def _dot16(a, b, acc):
    """acc + a @ b for bf16 operands."""
    if _BF16_DOTS_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _role_dot_step(x, one_hot, acc, X_FIRST: tl.constexpr):
    """(acc + part @ one_hot or one_hot @ part, x - part) for part = x rounded to bf16 (the remainder is exact in
    fp32: Sterbenz)."""
    part = x.to(tl.bfloat16)
    if X_FIRST:
        acc = _dot16(part, one_hot, acc)
    else:
        acc = _dot16(one_hot, part, acc)
    return acc, x - part.to(tl.float32)


@triton.jit
def _role_dot(x, one_hot, acc, X_FIRST: tl.constexpr):
    """acc + x @ one_hot (X_FIRST) or acc + one_hot @ x on tensor cores, exact up to fp32 accumulation: fp32 ``x``
    is split into three bf16 parts x = hi + mid + lo (8 + 8 + 8 significant bits hold fp32's 24; each remainder is
    exact), each multiplied by a one-hot bf16 matrix of key roles (entries 0 or 1, products exact)."""
    acc, rest = _role_dot_step(x, one_hot, acc, X_FIRST)
    acc, rest = _role_dot_step(rest, one_hot, acc, X_FIRST)
    acc, _ = _role_dot_step(rest, one_hot, acc, X_FIRST)
    return acc


@triton.jit
def _key_edits(ScaleTab, BiasTab, head, roles2, NUM_ROLES: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """Per key (``roles2``, broadcastable like the tile) for one head: the role's logit scale and its bias in base 2,
    applied on edited rows; each is a scalar (1, 0) when that edit is off."""
    key_scale = 1.0
    key_bias = 0.0
    if HAS_SCALE:
        key_scale = tl.load(ScaleTab + head * NUM_ROLES + roles2, mask=roles2 >= 0, other=1.0)
    if HAS_BIAS:
        key_bias = tl.load(BiasTab + head * NUM_ROLES + roles2, mask=roles2 >= 0, other=0.0) * _LOG2E
    return key_scale, key_bias


@triton.jit
def _tile_logits(qk, m2, n2, roles2, qmask2, win_idx2, win_start2, win_end2, key_scale2, key_bias2, sm_scale_log2,
                 CAUSAL: tl.constexpr, HAS_WINDOWS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Base-2 logits of a tile of q.k products, -inf where not allowed. The per-query operands (m2 row index,
    qmask2) and per-key ones (n2 key index, roles2, and _key_edits' key_scale2, key_bias2) come broadcastable to
    qk's shape: [M, 1] and [1, N] for a query-major tile, [1, M] and [N, 1] for the dK/dV kernel's key-major one.
    Packed samples (HAS_WINDOWS) also need win_start2 <= win_idx2 < win_end2: the key index against the query's
    window, or the query index against the key's. Windows are whole samples, so the two tests agree; each kernel
    takes the window of its tile's rows (a per-row vector costs a thread 2 registers in Hopper's MMA layout, a
    per-column one a quarter of the tile's width)."""
    allowed = roles2 >= 0
    if CAUSAL:
        allowed = allowed & (n2 <= m2)
    if HAS_WINDOWS:
        allowed = allowed & (win_idx2 >= win_start2) & (win_idx2 < win_end2)
    s = qk * sm_scale_log2
    if HAS_SCALE or HAS_BIAS:
        s = tl.where(qmask2, s * key_scale2 + key_bias2, s)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _edited_grad(ds, qmask2, key_scale2, HAS_SCALE: tl.constexpr):
    """``ds`` times the role scale on edited rows (operands as in _tile_logits): d(logit2)/d(q.k) is that times
    sm_scale_log2, which the kernels apply once, to the accumulated dQ or dK. Formed unlike _tile_logits' product,
    so no [M, N] tile of factors stays live from the logits to the gradient."""
    if HAS_SCALE:
        ds = tl.where(qmask2, ds * key_scale2, ds)
    return ds


@triton.jit
def _query_rows(QMask, RowStart, RowEnd, tok, offs_m, row_ok, seq_len, HAS_WINDOWS: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per query row of a tile: whether its logits are edited (query_mask; ``row_ok`` stands in when there are
    no edits) and its key window [row_start, row_end) (packed samples; the row index stands in without)."""
    qmask_m = row_ok
    if HAS_SCALE or HAS_BIAS:
        qmask_m = _load_rows(QMask + tok, offs_m, seq_len, 0) != 0
    row_start_m = offs_m
    row_end_m = offs_m
    if HAS_WINDOWS:
        row_start_m = _load_rows(RowStart + tok, offs_m, seq_len, 0)
        row_end_m = _load_rows(RowEnd + tok, offs_m, seq_len, 0)
    return qmask_m, row_start_m, row_end_m


@triton.jit
def _key_range(RowStart, RowEnd, tok, pid_m, seq_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOWS: tl.constexpr):
    """Keys [lo, hi) that query tile ``pid_m`` can see, lo aligned down to BLOCK_N."""
    lo = 0
    hi = seq_len
    if HAS_WINDOWS:
        lo = tl.load(RowStart + tok + pid_m * BLOCK_M)  # windows are monotone in the row index
        hi = tl.load(RowEnd + tok + tl.minimum(pid_m * BLOCK_M + BLOCK_M, seq_len) - 1)
    if CAUSAL:
        hi = tl.minimum(hi, pid_m * BLOCK_M + BLOCK_M)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, Roles, QMask, RowStart, RowEnd, ScaleTab, BiasTab, Out, Mass, Lse,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    seq_len, num_q_heads, group, sm_scale_log2, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOWS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_MASS: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_q_heads).to(tl.int64)
    head = pid_bh % num_q_heads
    kv_head = head // group
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < seq_len
    d_ok = offs_d < HEAD_DIM
    tok = batch * seq_len  # offset of this sequence in the [B, S] per-token arrays
    q_rows = Q + batch * stride_qb + _row_offset(head, stride_qh) + _row_offset(pid_m * BLOCK_M, stride_qs)
    k_head = K + batch * stride_kb + _row_offset(kv_head, stride_kh)
    v_head = V + batch * stride_vb + _row_offset(kv_head, stride_vh)
    k_t_offs = offs_n0[None, :] * stride_ks + offs_d[:, None]  # in-tile offsets (int32)
    v_offs = offs_n0[:, None] * stride_vs + offs_d[None, :]

    q = tl.load(q_rows + offs_m0[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qmask_m, row_start_m, row_end_m = _query_rows(QMask, RowStart, RowEnd, tok, offs_m, row_ok, seq_len,
                                                  HAS_WINDOWS, HAS_SCALE, HAS_BIAS)
    lo, hi = _key_range(RowStart, RowEnd, tok, pid_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOWS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass_acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seq_len
        roles_n = tl.load(Roles + tok + offs_n, mask=n_ok, other=-1)
        k_t = tl.load(k_head + _row_offset(start_n, stride_ks) + k_t_offs, mask=n_ok[None, :] & d_ok[:, None],
                      other=0.0)
        v = tl.load(v_head + _row_offset(start_n, stride_vs) + v_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k_t, input_precision=PRECISION)
        key_scale, key_bias = _key_edits(ScaleTab, BiasTab, head, roles_n[None, :], NUM_ROLES, HAS_SCALE, HAS_BIAS)
        s = _tile_logits(qk, offs_m[:, None], offs_n[None, :], roles_n[None, :], qmask_m[:, None], offs_n[None, :],
                         row_start_m[:, None], row_end_m[:, None], key_scale, key_bias, sm_scale_log2, CAUSAL,
                         HAS_WINDOWS, HAS_SCALE, HAS_BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing allowed yet keep max -inf: shift by 0 so exp2 gives 0 instead of NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        if COMPUTE_MASS:  # mass_acc[i, r] += sum of p[i, j] over keys j of role r (none for padding, role -1)
            one_hot = _one_hot(roles_n[:, None] == offs_r[None, :])  # [BLOCK_N, BLOCK_R]
            mass_acc = _role_dot(p, one_hot, mass_acc * alpha[:, None], True)
        m_i = m_new

    nonempty = l_i > 0.0
    inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    o_rows = Out + batch * stride_ob + _row_offset(head, stride_oh) + _row_offset(pid_m * BLOCK_M, stride_os)
    tl.store(o_rows + offs_m0[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    bh_rows = (batch * num_q_heads + head) * seq_len + offs_m  # row index into [B, H, S] arrays
    # +inf on empty rows: the backward's exp2(s - lse) is then exactly 0 for every key.
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("inf"))
    tl.store(Lse + bh_rows, lse, mask=row_ok)
    if COMPUTE_MASS:
        tl.store(Mass + bh_rows[:, None] * NUM_ROLES + offs_r[None, :], mass_acc * inv_l[:, None],
                 mask=row_ok[:, None] & (offs_r[None, :] < NUM_ROLES))


@triton.jit
def _bwd_preprocess_kernel(Out, DOut, Mass, DMass, Delta, stride_ob, stride_os, stride_oh,
                           stride_db, stride_ds, stride_dh, seq_len, num_q_heads,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, HAS_OUT_GRAD: tl.constexpr,
                           HAS_MASS_GRAD: tl.constexpr):
    """Delta[b, h, i] = dO_i . O_i + sum_r g[i, r] mass[i, r] (the softmax-backward row term)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_q_heads).to(tl.int64)
    head = pid_bh % num_q_heads
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_m0
    row_ok = offs_m < seq_len
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_OUT_GRAD:
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        o_rows = Out + batch * stride_ob + _row_offset(head, stride_oh) + _row_offset(pid_m * BLOCK_M, stride_os)
        do_rows = DOut + batch * stride_db + _row_offset(head, stride_dh) + _row_offset(pid_m * BLOCK_M, stride_ds)
        o = tl.load(o_rows + offs_m0[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_rows + offs_m0[:, None] * stride_ds + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        delta += tl.sum(o * do, 1)
    bh_rows = (batch * num_q_heads + head) * seq_len + offs_m
    if HAS_MASS_GRAD:
        offs_r = tl.arange(0, BLOCK_R)
        mask = row_ok[:, None] & (offs_r[None, :] < NUM_ROLES)
        ptrs = bh_rows[:, None] * NUM_ROLES + offs_r[None, :]
        delta += tl.sum(tl.load(Mass + ptrs, mask=mask, other=0.0) * tl.load(DMass + ptrs, mask=mask, other=0.0), 1)
    tl.store(Delta + bh_rows, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Roles, QMask, RowStart, RowEnd, ScaleTab, BiasTab, Lse, Delta, DMass, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_gb, stride_gs, stride_gh,
    seq_len, num_q_heads, group, sm_scale_log2, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOWS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key tile of one kv head: loops over the G query heads sharing it and over the
    query tiles that may see these keys, on key-major tiles ([BLOCK_N, BLOCK_M]: S^T = K Q^T).
    dK/dV strides (stride_g*) are those of contiguous [B, S, Hkv, D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    num_kv_heads = num_q_heads // group
    batch = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = pid_bh % num_kv_heads
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_n0
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_len
    d_ok = offs_d < HEAD_DIM
    tok = batch * seq_len
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_rows = K + batch * stride_kb + _row_offset(kv_head, stride_kh) + _row_offset(pid_n * BLOCK_N, stride_ks)
    v_rows = V + batch * stride_vb + _row_offset(kv_head, stride_vh) + _row_offset(pid_n * BLOCK_N, stride_vs)
    k = tl.load(k_rows + offs_n0[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_rows + offs_n0[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    roles_n = tl.load(Roles + tok + offs_n, mask=n_ok, other=-1)
    offs_r = tl.arange(0, BLOCK_R)
    one_hot = _one_hot(roles_n[:, None] == offs_r[None, :])  # [BLOCK_N, BLOCK_R]
    q_offs = offs_m0[:, None] * stride_qs + offs_d[None, :]  # in-tile offsets (int32)
    do_offs = offs_m0[:, None] * stride_ds + offs_d[None, :]

    lo = 0
    hi = seq_len
    # A key's packed sample is the sample of the query at the same index: the key's window bounds the queries.
    key_start, key_end = _query_rows(QMask, RowStart, RowEnd, tok, offs_n, n_ok, seq_len, HAS_WINDOWS, False,
                                     False)[1:]
    if HAS_WINDOWS:
        lo = tl.load(RowStart + tok + pid_n * BLOCK_N)
        hi = tl.load(RowEnd + tok + tl.minimum(pid_n * BLOCK_N + BLOCK_N, seq_len) - 1)
    if CAUSAL:
        lo = tl.maximum(lo, pid_n * BLOCK_N)
    lo = (lo // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for member in range(0, group):
        head = kv_head * group + member
        bh_base = (batch * num_q_heads + head) * seq_len
        q_head = Q + batch * stride_qb + _row_offset(head, stride_qh)
        do_head = DOut + batch * stride_db + _row_offset(head, stride_dh)
        key_scale, key_bias = _key_edits(ScaleTab, BiasTab, head, roles_n[:, None], NUM_ROLES, HAS_SCALE, HAS_BIAS)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seq_len
            q = tl.load(q_head + _row_offset(start_m, stride_qs) + q_offs, mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if DOT_FP32:
                q = q.to(tl.float32)
            qmask_m, _, _ = _query_rows(QMask, RowStart, RowEnd, tok, offs_m, row_ok, seq_len, False, HAS_SCALE,
                                        HAS_BIAS)
            lse = _load_rows(Lse + bh_base, offs_m, seq_len, float("inf"))
            delta = _load_rows(Delta + bh_base, offs_m, seq_len, 0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            s_t = _tile_logits(qk_t, offs_m[None, :], offs_n[:, None], roles_n[:, None], qmask_m[None, :],
                               offs_m[None, :], key_start[:, None], key_end[:, None], key_scale, key_bias,
                               sm_scale_log2, CAUSAL, HAS_WINDOWS, HAS_SCALE, HAS_BIAS)
            p_t = tl.exp2(s_t - lse[None, :])
            dp_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            if HAS_OUT_GRAD:
                do = tl.load(do_head + _row_offset(start_m, stride_ds) + do_offs,
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    do = do.to(tl.float32)
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if HAS_MASS_GRAD:  # dP^T[j, i] += g[i, role_j] = (one_hot g^T)[j, i]
                g = tl.load(DMass + (bh_base + offs_m)[:, None] * NUM_ROLES + offs_r[None, :],
                            mask=row_ok[:, None] & (offs_r[None, :] < NUM_ROLES), other=0.0)
                dp_t = _role_dot(tl.trans(g), one_hot, dp_t, False)
            ds_t = p_t * (dp_t - delta[None, :])
            ds_t = _edited_grad(ds_t, qmask_m[None, :], key_scale, HAS_SCALE)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    # Logits are in base 2: d(natural logit)/d(q.k) = sm_scale_log2 * ln 2 (times the role scale, applied above).
    dk = dk * (sm_scale_log2 * _LN2)
    out_rows = batch * stride_gb + _row_offset(kv_head, stride_gh) + _row_offset(pid_n * BLOCK_N, stride_gs)
    out_offs = offs_n0[:, None] * stride_gs + offs_d[None, :]
    tl.store(DK + out_rows + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_rows + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Roles, QMask, RowStart, RowEnd, ScaleTab, BiasTab, Lse, Delta, DMass, DQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_db, stride_ds, stride_dh, stride_gb, stride_gs, stride_gh,
    seq_len, num_q_heads, group, sm_scale_log2, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_ROLES: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOWS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT_GRAD: tl.constexpr, HAS_MASS_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query tile of one head (stride_g*: dQ's strides)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_q_heads).to(tl.int64)
    head = pid_bh % num_q_heads
    kv_head = head // group
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_m0
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < seq_len
    d_ok = offs_d < HEAD_DIM
    tok = batch * seq_len
    bh_base = (batch * num_q_heads + head) * seq_len
    q_mask = row_ok[:, None] & d_ok[None, :]
    row0 = pid_m * BLOCK_M
    q_rows = Q + batch * stride_qb + _row_offset(head, stride_qh) + _row_offset(row0, stride_qs)
    q = tl.load(q_rows + offs_m0[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    do = q
    if HAS_OUT_GRAD:
        do_rows = DOut + batch * stride_db + _row_offset(head, stride_dh) + _row_offset(row0, stride_ds)
        do = tl.load(do_rows + offs_m0[:, None] * stride_ds + offs_d[None, :], mask=q_mask, other=0.0)
        if DOT_FP32:
            do = do.to(tl.float32)
    g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if HAS_MASS_GRAD:
        g = tl.load(DMass + (bh_base + offs_m)[:, None] * NUM_ROLES + offs_r[None, :],
                    mask=row_ok[:, None] & (offs_r[None, :] < NUM_ROLES), other=0.0)
    lse = _load_rows(Lse + bh_base, offs_m, seq_len, float("inf"))
    delta = _load_rows(Delta + bh_base, offs_m, seq_len, 0.0)
    qmask_m, row_start_m, row_end_m = _query_rows(QMask, RowStart, RowEnd, tok, offs_m, row_ok, seq_len,
                                                  HAS_WINDOWS, HAS_SCALE, HAS_BIAS)
    lo, hi = _key_range(RowStart, RowEnd, tok, pid_m, seq_len, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOWS)
    k_head = K + batch * stride_kb + _row_offset(kv_head, stride_kh)
    v_head = V + batch * stride_vb + _row_offset(kv_head, stride_vh)
    k_offs = offs_n0[:, None] * stride_ks + offs_d[None, :]  # in-tile offsets (int32)
    v_t_offs = offs_n0[None, :] * stride_vs + offs_d[:, None]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < seq_len
        roles_n = tl.load(Roles + tok + offs_n, mask=n_ok, other=-1)
        k = tl.load(k_head + _row_offset(start_n, stride_ks) + k_offs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        key_scale, key_bias = _key_edits(ScaleTab, BiasTab, head, roles_n[None, :], NUM_ROLES, HAS_SCALE, HAS_BIAS)
        s = _tile_logits(qk, offs_m[:, None], offs_n[None, :], roles_n[None, :], qmask_m[:, None], offs_n[None, :],
                         row_start_m[:, None], row_end_m[:, None], key_scale, key_bias, sm_scale_log2, CAUSAL,
                         HAS_WINDOWS, HAS_SCALE, HAS_BIAS)
        p = tl.exp2(s - lse[:, None])
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_OUT_GRAD:
            v_t = tl.load(v_head + _row_offset(start_n, stride_vs) + v_t_offs, mask=n_ok[None, :] & d_ok[:, None],
                          other=0.0)
            if DOT_FP32:
                v_t = v_t.to(tl.float32)
            dp = tl.dot(do, v_t, input_precision=PRECISION)
        if HAS_MASS_GRAD:  # dP[i, j] += g[i, role_j] = (g one_hot^T)[i, j]
            one_hot_t = _one_hot(offs_r[:, None] == roles_n[None, :])  # [BLOCK_R, BLOCK_N]
            dp = _role_dot(g, one_hot_t, dp, True)
        ds = p * (dp - delta[:, None])
        ds = _edited_grad(ds, qmask_m[:, None], key_scale, HAS_SCALE)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq = dq * (sm_scale_log2 * _LN2)  # see _bwd_dkdv_kernel
    dq_rows = DQ + batch * stride_gb + _row_offset(head, stride_gh) + _row_offset(row0, stride_gs)
    tl.store(dq_rows + offs_m0[:, None] * stride_gs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------
# Launch configuration: autotuned on GPUs, one fixed configuration under the interpreter.

_TUNING_KEYS = ["seq_bucket", "HEAD_DIM", "NUM_ROLES", "CAUSAL", "HAS_WINDOWS", "HAS_SCALE", "HAS_BIAS"]


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages). Each is compiled separately, once per
# specialisation (head dim, roles, masks, dtype): seconds each for 2-byte inputs, up to ~30 s for fp32 with
# 128-wide heads. fp32 inputs with BLOCK_D >= 128, and any input with BLOCK_D > 128 (head dims up to 256), take
# the *_WIDE lists only: the others need more than the 227 KiB of shared memory a Hopper block may use (ptxas
# for sm_90: the first forward candidate needs 225 KiB in fp32 at D=128, 259 KiB in bf16 at D=256; the wide
# ones 69-146 KiB in fp32 at D=128), and a config that does not fit fails at launch. AUTOTUNE_ENV=0 keeps the
# first fitting candidate of each kernel: the same kernels and results, a fraction of the compile time, for
# correctness runs on a fresh machine (tools/gpu_check.py); so does torch.use_deterministic_algorithms
# (kept_configs).
# Every 2-byte candidate is one ptxas compiles without register spills at Qwen2.5-VL's attention shape (D=128,
# bf16, fused-QKV views), with every feature on and with none (tests/ops/role_attention_aot.py checks them all).
# Spilling shapes dropped or not taken on that evidence: forward 128x64 w4 s3 (~1.4 KiB/thread), 128x128 w8 s2
# (~0.4 KiB), 64x64 w4 s3 (12 B, masses off), 128x32 w4 s3, 64x128 w4 s2; dQ 128x32 w4 s3 (~0.3 KiB), 128x64 w4
# s2 (~1.5 KiB), 64x64 w4 s2/s3 (8-16 B).
# dK/dV at D=128: its fp32 dK and dV accumulators take 128 of a thread's 255 registers (BLOCK_N = 16 x num_warps):
# 16- or 32-row query tiles, the 32-row ones unpipelined.
AUTOTUNE_ENV = "MEGATRON_AVAR_TRITON_AUTOTUNE"
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 4)]
_FWD_CONFIGS_WIDE = [(64, 64, 4, 2), (64, 32, 4, 2)]
_DKDV_CONFIGS = [(32, 64, 4, 1), (16, 64, 4, 2), (32, 128, 8, 1), (16, 128, 8, 2), (16, 64, 4, 3)]
_DKDV_CONFIGS_WIDE = [(32, 64, 4, 2), (64, 64, 4, 2)]
_DQ_CONFIGS = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 8, 2)]
_DQ_CONFIGS_WIDE = [(64, 32, 4, 2), (64, 64, 4, 2)]


def _autotune_all() -> bool:
    setting = os.environ.get(AUTOTUNE_ENV, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV}={setting!r}: use 1 (autotune, the default) or 0 (first config only)")
    return setting == "1"


def kept_configs(configs, shapes, *, autotune_all: bool):
    """The candidates of ``configs`` whose (BLOCK_M, BLOCK_N, num_warps, num_stages) are in ``shapes``, in its
    order; only the first without autotuning, and under ``torch.use_deterministic_algorithms``: candidates tile the
    keys differently, so they sum in different orders, and a choice made by timing (noisy) could differ in the
    next process (a resumed run), breaking bitwise reproducibility."""
    by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
    kept = [by_shape[shape] for shape in shapes]
    return kept if autotune_all and not torch.are_deterministic_algorithms_enabled() else kept[:1]


def _autotuned(kernel, shapes, wide_shapes, key):
    """``kernel`` autotuned over ``shapes`` (2-byte inputs up to D=128, fp32 below it) or ``wide_shapes``."""
    every = list(dict.fromkeys(shapes + wide_shapes))
    autotune_all = _autotune_all()  # read once, at import, like the decoration itself

    def prune(configs, named_args, **kwargs):
        # fp32 tiles at D=128, and any tiles past it (bf16 at D=256: the first 2-byte candidates need 265-277 KB of
        # shared memory, over the 227 KiB a Hopper block may have), take the smaller tiles
        wide = kwargs["BLOCK_D"] > 128 or (named_args["Q"].element_size() == 4 and kwargs["BLOCK_D"] >= 128)
        return kept_configs(configs, wide_shapes if wide else shapes, autotune_all=autotune_all)

    return triton.autotune(_configs(every), key=key, prune_configs_by={"early_config_prune": prune})(kernel)


if INTERPRETING:
    _fwd, _dkdv, _dq = _fwd_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel
else:  # Every kernel only stores its outputs (no accumulation across launches): safe to autotune.
    _fwd = _autotuned(_fwd_kernel, _FWD_CONFIGS, _FWD_CONFIGS_WIDE, _TUNING_KEYS + ["COMPUTE_MASS"])
    _dkdv = _autotuned(_bwd_dkdv_kernel, _DKDV_CONFIGS, _DKDV_CONFIGS_WIDE,
                       _TUNING_KEYS + ["HAS_OUT_GRAD", "HAS_MASS_GRAD"])
    _dq = _autotuned(_bwd_dq_kernel, _DQ_CONFIGS, _DQ_CONFIGS_WIDE,
                     _TUNING_KEYS + ["HAS_OUT_GRAD", "HAS_MASS_GRAD"])


def autotune_choices() -> dict[str, list[dict]]:
    """The configuration autotuning chose for each specialisation seen so far in this process, per kernel ("fwd",
    "dkdv", "dq"): [{"key": {tuning argument: value}, "dtypes": [the tensors' dtypes], "config": [BLOCK_M,
    BLOCK_N, num_warps, num_stages]}]. Empty lists under the interpreter (no autotuning). Benchmarks record it,
    so candidate lists are pruned from measurements."""
    choices: dict[str, list[dict]] = {}
    for name, kernel in (("fwd", _fwd), ("dkdv", _dkdv), ("dq", _dq)):
        names = list(getattr(kernel, "keys", []))  # Triton's key: these arguments' values, then tensor dtypes
        choices[name] = [
            dict(key=dict(zip(names, map(str, key))), dtypes=sorted(set(map(str, key[len(names):]))),
                 config=[c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages])
            for key, c in getattr(kernel, "cache", {}).items()]
    return choices


def _fixed_blocks():
    """Block sizes passed explicitly when not autotuning (the interpreter)."""
    return dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=INTERPRETER_BLOCK_N) if INTERPRETING else {}


def _check_runnable(problem: RoleAttentionProblem) -> None:
    q = problem.q
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"impl='triton' supports float32/float16/bfloat16, got {q.dtype}")
    if INTERPRETING:
        if q.is_cuda:
            raise ValueError("TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors; unset it to run on CUDA")
    elif not (q.is_cuda and platform.triton_gpu_available()):
        raise ValueError("impl='triton' needs CUDA tensors and Triton's GPU backend (or TRITON_INTERPRET=1 set "
                         "before importing megatron_avar.ops on a CPU machine); use impl='blockwise' here")
    if problem.num_roles > MAX_TRITON_ROLES:  # the one-hot role matrices have BLOCK_R = 16 columns
        raise ValueError(f"impl='triton' supports num_roles <= {MAX_TRITON_ROLES}, got {problem.num_roles}; "
                         "use impl='blockwise'")
    if q.shape[-1] > 256:
        raise ValueError(f"impl='triton' supports head_dim <= 256, got {q.shape[-1]}; use impl='blockwise'")


def _tile_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, S, H, D] as the kernels address it: unit stride along D, and a per-token stride below
    MAX_TILE_ROW_STRIDE (in-tile offsets are int32); otherwise a contiguous copy."""
    return t if t.stride(-1) == 1 and t.stride(1) < MAX_TILE_ROW_STRIDE else t.contiguous()


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Arguments shared by the kernels of one problem (pointers to per-token arrays, flags)."""

    roles: torch.Tensor
    qmask: torch.Tensor
    row_start: torch.Tensor
    row_end: torch.Tensor
    scale_tab: torch.Tensor
    bias_tab: torch.Tensor
    flags: dict


def _launch_args(problem: RoleAttentionProblem) -> _Launch:
    q = problem.q
    roles = problem.key_roles.to(torch.int32).contiguous()
    edits = problem.has_edits
    head_dim = q.shape[-1]
    # Unused pointer arguments (feature off) get any tensor: the constexpr flags keep them unread.
    return _Launch(
        roles=roles,
        qmask=problem.query_mask.to(torch.int8).contiguous() if edits and problem.query_mask is not None else roles,
        row_start=problem.row_start.contiguous() if problem.row_start is not None else roles,
        row_end=problem.row_end.contiguous() if problem.row_end is not None else roles,
        scale_tab=problem.logit_scale if edits and problem.logit_scale is not None else q,
        bias_tab=problem.logit_bias if edits and problem.logit_bias is not None else q,
        flags=dict(
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), NUM_ROLES=problem.num_roles,
            BLOCK_R=16,  # tl.dot's smallest width; num_roles <= MAX_TRITON_ROLES = 16
            CAUSAL=problem.causal, HAS_WINDOWS=problem.row_start is not None,
            HAS_SCALE=edits and problem.logit_scale is not None, HAS_BIAS=edits and problem.logit_bias is not None,
            # Interpreter trap: tl.dot on bf16/fp16 returns garbage there; fp32 operands are exact.
            DOT_FP32=INTERPRETING and q.dtype != torch.float32,
            # fp32 inputs get true fp32 products (as torch.matmul by default), not TF32.
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ),
    )


def _scalars(problem: RoleAttentionProblem):
    batch, seq_len, num_q_heads, _ = problem.q.shape
    return dict(seq_len=seq_len, num_q_heads=num_q_heads, group=num_q_heads // problem.k.shape[2],
                sm_scale_log2=problem.softmax_scale * _LOG2E.value, seq_bucket=triton.next_power_of_2(seq_len))


def _forward(problem: RoleAttentionProblem, compute_mass: bool):
    """Returns out [B, S, Hq, D], mass [B, Hq, S, R] fp32 (empty [0] if not computed), lse2 [B, Hq, S] fp32."""
    q, k, v = (_tile_ready(t) for t in (problem.q, problem.k, problem.v))
    batch, seq_len, num_q_heads, head_dim = q.shape
    launch = _launch_args(problem)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    mass = torch.empty(batch, num_q_heads, seq_len, problem.num_roles if compute_mass else 0,
                       dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_q_heads, seq_len, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_q_heads)  # noqa: E731
    _fwd[grid](
        q, k, v, launch.roles, launch.qmask, launch.row_start, launch.row_end, launch.scale_tab, launch.bias_tab,
        # An empty mass has a null data pointer, which Triton's launcher rejects: pass lse instead
        # (never read or written when COMPUTE_MASS is off).
        out, mass if compute_mass else lse, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *out.stride()[:3],
        **_scalars(problem), **launch.flags, COMPUTE_MASS=compute_mass, **_fixed_blocks(),
    )
    return out, mass, lse


def _backward(problem: RoleAttentionProblem, out, mass, lse, grad_out, grad_mass):
    q, k, v = (_tile_ready(t) for t in (problem.q, problem.k, problem.v))
    batch, seq_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    launch = _launch_args(problem)
    flags = dict(launch.flags)
    has_out_grad, has_mass_grad = grad_out is not None, grad_mass is not None
    grad_out = _tile_ready(grad_out) if has_out_grad else out       # placeholder when absent
    grad_mass = grad_mass.to(torch.float32).contiguous() if has_mass_grad else lse
    delta = torch.empty_like(lse)
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(seq_len, pre_block), batch * num_q_heads)](
        out, grad_out, mass if has_mass_grad else lse, grad_mass, delta, *out.stride()[:3], *grad_out.stride()[:3],
        seq_len, num_q_heads,
        HEAD_DIM=head_dim, BLOCK_D=flags["BLOCK_D"], NUM_ROLES=problem.num_roles, BLOCK_R=flags["BLOCK_R"],
        BLOCK_M=pre_block, HAS_OUT_GRAD=has_out_grad, HAS_MASS_GRAD=has_mass_grad,
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    common = (q, k, v, grad_out, launch.roles, launch.qmask, launch.row_start, launch.row_end, launch.scale_tab,
              launch.bias_tab, lse, delta, grad_mass)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    grad_flags = dict(HAS_OUT_GRAD=has_out_grad, HAS_MASS_GRAD=has_mass_grad, **_fixed_blocks())
    grid_kv = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), batch * num_kv_heads)  # noqa: E731
    _dkdv[grid_kv](*common, dk, dv, *strides, *dk.stride()[:3], **_scalars(problem), **flags, **grad_flags)
    grid_q = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_q_heads)  # noqa: E731
    _dq[grid_q](*common, dq, *strides, *dq.stride()[:3], **_scalars(problem), **flags, **grad_flags)
    return dq, dk, dv


class _TritonRoleAttention(torch.autograd.Function):
    """Fused forward saving out, mass and the row log-sum-exp; backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, v, problem, compute_mass):
        out, mass, lse = _forward(problem, compute_mass)
        ctx.problem = dataclasses.replace(problem, q=None, k=None, v=None)
        ctx.save_for_backward(q, k, v, out, mass, lse)
        ctx.set_materialize_grads(False)
        if not compute_mass:
            ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_mass):
        q, k, v, out, mass, lse = ctx.saved_tensors
        if grad_out is None and grad_mass is None:
            return None, None, None, None, None
        problem = dataclasses.replace(ctx.problem, q=q, k=k, v=v)
        with platform.on_device_of(q):
            dq, dk, dv = _backward(problem, out, mass, lse, grad_out, grad_mass)
        return dq, dk, dv, None, None


def triton_role_attention(problem: RoleAttentionProblem, compute_mass: bool = True):
    """Run the Triton kernels on a validated problem; returns (out, mass) like the functional API.

    compute_mass=False skips the mass accumulation (the kernel is then plain FlashAttention-2 with
    the same masks and edits) and returns an empty mass [B, Hq, S, 0]; it exists for benchmarks
    that measure what the masses cost.
    """
    _check_runnable(problem)
    with platform.on_device_of(problem.q):
        return _TritonRoleAttention.apply(problem.q, problem.k, problem.v, problem, compute_mass)
