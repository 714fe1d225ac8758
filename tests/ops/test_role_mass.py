"""role_mass (the probe) equals role_attention's masses at the selected rows, in values and in gradients w.r.t.
q and k, for every layout and mask; its cost follows the rows' keys, not S².

Truth: role_attention's materialising reference in float64 on the same inputs, masses at those rows.
Tolerances: float64 paths agree to 1e-10 (summation order only). float32 / bfloat16 inputs: the probe
computes logits and masses in float32 from the inputs as given, so against the float64 truth of the same
(rounded) inputs its error is float32 accumulation noise: masses within 1e-5, gradients within 1e-5 of
their largest magnitude (sums over up to ~100 keys of O(1) terms, ~1e-7 each).
"""

import dataclasses
import importlib
import math

import pytest
import torch

from megatron_avar.ops import role_attention, role_mass
from role_attention_cases import Case, far_apart, make

role_mass_module = importlib.import_module("megatron_avar.ops.role_mass")  # the package's name is the function
IMPLS = ("reference", "blockwise")
role_mass_triton = importlib.import_module("megatron_avar.ops.role_mass_triton")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Several row tiles and key tiles even on ~40-token sequences."""
    monkeypatch.setattr(role_mass_module, "BLOCKWISE_ROWS", 3)
    monkeypatch.setattr(role_mass_module, "BLOCKWISE_KEYS", 8)


def _truth(q, k, v, roles, kwargs, rows, grad_weights):
    """role_attention's reference masses at ``rows`` [N, Hq, R] and d(loss)/d(q, k) in float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, mass = role_attention(q64, k64, v64, roles, impl="reference", **kwargs)
    flat = mass.permute(1, 0, 2) if "cu_seqlens" in kwargs else mass.permute(0, 2, 1, 3).reshape(
        -1, mass.shape[1], mass.shape[3])                                     # [B*S or T, Hq, R]
    picked = flat[rows]
    dq, dk = torch.autograd.grad((picked * grad_weights).sum(), (q64, k64))
    return picked.detach(), dq, dk


def _probe(q, k, roles, kwargs, rows, grad_weights, impl):
    q_, k_ = (t.detach().clone().requires_grad_() for t in (q, k))
    kwargs = {key: val for key, val in kwargs.items() if key in ("num_roles", "causal", "cu_seqlens")}
    mass = role_mass(q_, k_, roles, rows, impl=impl, **kwargs)
    dq, dk = torch.autograd.grad((mass.double() * grad_weights).sum(), (q_, k_), allow_unused=True)
    return mass.detach(), torch.zeros_like(q_) if dq is None else dq, torch.zeros_like(k_) if dk is None else dk


def _rows(case: Case, how: str, gen) -> torch.Tensor:
    total = sum(case.packed) if case.packed else case.batch * case.seq_len
    if how == "all":
        return torch.arange(total)
    if how == "one":
        return torch.tensor([total - 1])
    if how == "edges":  # first and last token of every sample / batch row, in reverse order, one repeated
        if case.packed:
            ends = list(torch.tensor(case.packed).cumsum(0))
            starts = [0] + ends[:-1]
        else:
            starts = [b * case.seq_len for b in range(case.batch)]
            ends = [s + case.seq_len for s in starts]
        edges = sorted({int(x) for s, e in zip(starts, ends) if e > s for x in (s, e - 1)}, reverse=True)
        return torch.tensor(edges + edges[:1])
    return torch.randperm(total, generator=gen)[: max(1, total // 3)]     # "random": a third, shuffled


def _to(device, q, k, v, roles, kwargs):
    kwargs = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
    return q.to(device), k.to(device), v.to(device), roles.to(device), kwargs


def _inputs(case: Case, how: str, dtype, *, seed: int, rows_seed: int, device="cpu"):
    """(q, k, v, key_roles, kwargs, rows, weights) on ``device``: ``make``'s inputs, the rows ``how`` picks, and
    float64 weights [N, Hq, R] of the loss whose gradients the tests compare."""
    gen = torch.Generator().manual_seed(rows_seed)
    rows = _rows(case, how, gen)
    weights = torch.randn(rows.numel(), case.num_q_heads, case.num_roles, generator=gen, dtype=torch.float64)
    return (*_to(device, *make(case, dtype, seed=seed)), rows.to(device), weights.to(device))


CASES = [
    (Case(), "random"),
    (Case(causal=False, padding="right"), "all"),
    (Case(num_q_heads=2, num_kv_heads=2, padding="left"), "edges"),                       # GQA 1
    (Case(num_q_heads=7, num_kv_heads=1, head_dim=80, roles="scattered", num_roles=5), "random"),  # GQA 7
    (Case(batch=1, seq_len=45, head_dim=128, num_roles=6, roles="scattered"), "one"),
    (Case(padding="all", num_q_heads=2, num_kv_heads=1), "all"),                          # rows without keys
    (Case(packed=(13, 1, 24, 0, 9), num_q_heads=4, num_kv_heads=2), "edges"),
    (Case(packed=(20, 17), causal=False, padding="tail", num_q_heads=2, num_kv_heads=1), "random"),
    (Case(packed=(13, 1, 24, 9), num_q_heads=4, num_kv_heads=2, head_dim=32), "all"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,how", CASES, ids=[f"{c}-{h}" for c, h in CASES])
def test_probe_equals_role_attention_masses_and_gradients(case, how, impl):
    q, k, v, roles, kwargs, rows, weights = _inputs(case, how, torch.float64, seed=21, rows_seed=3)
    want, want_dq, want_dk = _truth(q, k, v, roles, kwargs, rows, weights)
    got, dq, dk = _probe(q, k, roles, kwargs, rows, weights, impl)
    assert got.dtype == torch.float64 and got.shape == (rows.numel(), case.num_q_heads, case.num_roles)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(dq, want_dq, atol=1e-10, rtol=0)
    torch.testing.assert_close(dk, want_dk, atol=1e-10, rtol=0)


HELD_APART = [CASES[0], CASES[3], CASES[8]]  # padded, GQA 7 with scattered roles, packed THD; no repeated rows


def _held_apart(q, k, roles, kwargs, rows, weights, impl):
    """The probe with the rows' queries held apart (``q_index``), shuffled, after a decoy query no row reads:
    masses, dq scattered back to the rows' positions in q's layout, dk, and the decoy's gradient."""
    flat = q.detach().reshape(-1, *q.shape[-2:])
    order = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(4))
    held = torch.cat([torch.ones_like(flat[:1]), flat[rows[order]]]).requires_grad_()
    k_ = k.detach().clone().requires_grad_()
    kwargs = {key: val for key, val in kwargs.items() if key in ("num_roles", "causal", "cu_seqlens")}
    mass = role_mass(held, k_, roles, rows, q_index=1 + torch.argsort(order).to(rows.device), impl=impl, **kwargs)
    d_held, dk = torch.autograd.grad((mass.double() * weights).sum(), (held, k_))
    dq = torch.zeros_like(flat).index_copy(0, rows[order], d_held[1:]).reshape(q.shape)
    return mass.detach(), dq, dk, d_held[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,how", HELD_APART, ids=[f"{c}-{h}" for c, h in HELD_APART])
def test_queries_held_apart_equal_queries_in_place(case, how, impl):
    """q_index (context parallelism's own queries against the whole row's keys): the same masses and gradients
    as the queries in k's layout; a query no row reads gets no gradient."""
    q, k, _, roles, kwargs, rows, weights = _inputs(case, how, torch.float64, seed=34, rows_seed=9)
    want = _probe(q, k, roles, kwargs, rows, weights, impl)
    *got, decoy = _held_apart(q, k, roles, kwargs, rows, weights, impl)
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t, want_t, atol=1e-12, rtol=0)
    assert not decoy.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(num_q_heads=7, num_kv_heads=1, head_dim=128, num_roles=5, padding="left"),
                                  Case(packed=(30, 1, 11), num_q_heads=4, num_kv_heads=2, head_dim=16)], ids=str)
def test_low_precision_inputs_accumulate_in_float32(case, dtype):
    q, k, v, roles, kwargs, rows, weights = _inputs(case, "random", dtype, seed=22, rows_seed=4)
    want, want_dq, want_dk = _truth(q, k, v, roles, kwargs, rows, weights)
    got, dq, dk = _probe(q, k, roles, kwargs, rows, weights, "blockwise")
    assert got.dtype == torch.float32 and dq.dtype == dtype and dk.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    # The gradients are returned in the input dtype: bf16 rounding (2^-8 relative) on top of fp32 noise.
    grad_tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for got_g, want_g in ((dq, want_dq), (dk, want_dk)):
        torch.testing.assert_close(got_g.double(), want_g, atol=grad_tol * want_g.abs().max().item(), rtol=grad_tol)


def test_masses_of_rows_with_keys_sum_to_one_and_empty_rows_are_zero():
    case = Case(padding="all", num_q_heads=2, num_kv_heads=1)
    q, k, _, roles, kwargs = make(case, torch.float32, seed=23)
    mass = role_mass(q, k, roles, torch.arange(2 * case.seq_len), num_roles=case.num_roles)
    sums = mass.sum(-1)
    assert torch.equal(sums[: case.seq_len], torch.zeros_like(sums[: case.seq_len]))   # batch row 0 all padding
    assert not torch.isnan(mass).any()
    has_keys = torch.cumsum(roles[1] >= 0, 0) > 0                       # causal: some allowed key at or before
    torch.testing.assert_close(sums[case.seq_len:][has_keys], torch.ones_like(sums[case.seq_len:][has_keys]))


def test_no_rows_gives_an_empty_result_that_backpropagates():
    q, k, _, roles, kwargs = make(Case(), torch.float32, seed=24)
    mass = role_mass(q, k, roles, torch.zeros(0, dtype=torch.long), num_roles=3)
    assert mass.shape == (0, 4, 3)
    mass.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_blockwise_work_follows_the_rows_keys_not_the_sequence(monkeypatch):
    """In a 4-sample packed row, the probe of rows in one sample touches only that sample's keys."""
    seen = []
    original = role_mass_module._tile_logits

    def recording(problem, q_tile, j0, j1, lo_t, hi_t):
        seen.append((j0, j1))
        return original(problem, q_tile, j0, j1, lo_t, hi_t)

    monkeypatch.setattr(role_mass_module, "_tile_logits", recording)
    case = Case(packed=(64, 64, 64, 64), num_q_heads=2, num_kv_heads=1)
    q, k, _, roles, kwargs = make(case, torch.float32, seed=25)
    role_mass(q, k, roles, torch.tensor([140, 150, 130]), num_roles=3, cu_seqlens=kwargs["cu_seqlens"])
    assert seen and min(j0 for j0, _ in seen) == 128 and max(j1 for _, j1 in seen) == 151
    assert sum(j1 - j0 for j0, j1 in seen) == 151 - 128                 # one row tile: every key once


@pytest.mark.parametrize("bad,match", [
    (dict(query_rows=torch.tensor([0, 74])), r"query_rows must be flat query indices in \[0, 74\)"),
    (dict(query_rows=torch.tensor([[0]])), "query_rows must be a 1-D int64 tensor"),
    (dict(query_rows=torch.tensor([0.0])), "query_rows must be a 1-D int64 tensor"),
    (dict(num_roles=2), r"key_roles values must lie in \[-1, num_roles=2\)"),
    (dict(impl="fast"), "impl='fast' is not an implementation"),
    (dict(k=torch.zeros(2, 37, 3, 16)), "query heads \\(4\\) must be a multiple of key heads \\(3\\)"),
    (dict(cu_seqlens=torch.tensor([0, 74])), r"q must be \[T, H, D\] \(THD, cu_seqlens given\)"),
    (dict(q=torch.zeros(3, 4, 16), q_index=torch.tensor([0])), r"q_index must be int64 \[N\] like query_rows"),
    (dict(q=torch.zeros(3, 4, 16), q_index=torch.tensor([0, 3])), "q_index must index q's 3 queries"),
    (dict(q=torch.zeros(3, 4, 8), q_index=torch.tensor([0, 1])), r"with q_index, q must be \[M, Hq, D\]"),
])
def test_bad_arguments_are_refused_by_name(bad, match):
    q, k, _, roles, _ = make(Case(), torch.float32, seed=26)
    args = {**dict(q=q, k=k, key_roles=roles, query_rows=torch.tensor([0, 5]), num_roles=3), **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        role_mass(args.pop("q"), args.pop("k"), args.pop("key_roles"), args.pop("query_rows"), **args)


def test_bad_cu_seqlens_is_refused():
    case = Case(packed=(10, 20))
    q, k, _, roles, _ = make(case, torch.float32, seed=27)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at T=30"):
        role_mass(q, k, roles, torch.tensor([3]), num_roles=3, cu_seqlens=torch.tensor([0, 10, 29]))


def test_no_host_sync_without_value_checks(monkeypatch):
    """check_values=False: nothing in the blockwise-free path (reference) reads a device value on the host."""
    case = dataclasses.replace(Case(packed=(10, 20)))
    q, k, _, roles, kwargs = make(case, torch.float32, seed=28)

    def refuse(*_args, **_kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    mass = role_mass(q, k, roles, torch.tensor([3, 25]), num_roles=3, cu_seqlens=kwargs["cu_seqlens"],
                     impl="reference", check_values=False)
    monkeypatch.undo()
    assert mass.shape == (2, 4, 3) and math.isclose(float(mass[1].detach().sum(-1).mean()), 1.0, rel_tol=1e-5)


@pytest.fixture
def triton_device():
    """CPU under the Triton interpreter (tests/conftest.py sets it without CUDA), else the GPU."""
    if role_mass_triton.INTERPRETING:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    return torch.device("cuda")


@pytest.mark.parametrize("case,how", CASES, ids=[f"{c}-{h}" for c, h in CASES])
def test_triton_probe_equals_role_attention_masses_and_gradients(case, how, triton_device):
    """fp32 inputs, dots in IEEE fp32: against the float64 truth, float32 accumulation noise only."""
    q, k, v, roles, kwargs, rows, weights = _inputs(case, how, torch.float32, seed=29, rows_seed=5,
                                                    device=triton_device)
    want, want_dq, want_dk = _truth(q, k, v, roles, kwargs, rows, weights)
    got, dq, dk = _probe(q, k, roles, kwargs, rows, weights, "triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    for got_g, want_g in ((dq, want_dq), (dk, want_dk)):
        scale = max(want_g.abs().max().item(), 1.0)
        torch.testing.assert_close(got_g.double(), want_g, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("case,how", HELD_APART, ids=[f"{c}-{h}" for c, h in HELD_APART])
def test_triton_probe_queries_held_apart_equal_queries_in_place(case, how, triton_device):
    """q_index on the kernels: they read each row's query where q_index points, and its dq lands there."""
    q, k, _, roles, kwargs, rows, weights = _inputs(case, how, torch.float32, seed=35, rows_seed=10,
                                                    device=triton_device)
    want = _probe(q, k, roles, kwargs, rows, weights, "triton")
    *got, decoy = _held_apart(q, k, roles, kwargs, rows, weights, "triton")
    for got_t, want_t in zip(got, want):
        torch.testing.assert_close(got_t, want_t, atol=1e-6, rtol=0)
    assert not decoy.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_probe_low_precision_within_the_blockwise_budget(dtype, triton_device):
    """bf16/fp16 inputs: masses accumulate in fp32 (as blockwise: within 1e-5 of the truth); the gradients'
    products run in the input dtype, so their error may be at most 2x plain low-precision PyTorch's
    (role_attention's reference computed in that dtype) plus fp32 noise."""
    case = Case(packed=(30, 1, 18), num_q_heads=4, num_kv_heads=2, head_dim=64, num_roles=5)
    q, k, v, roles, kwargs, rows, weights = _inputs(case, "random", dtype, seed=30, rows_seed=6, device=triton_device)
    want, want_dq, want_dk = _truth(q, k, v, roles, kwargs, rows, weights)
    got, dq, dk = _probe(q, k, roles, kwargs, rows, weights, "triton")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    plain_dq, plain_dk = _plain_grads(q, k, v, roles, kwargs, rows, weights)
    for name, got_g, plain_g, want_g in (("dq", dq, plain_dq, want_dq), ("dk", dk, plain_dk, want_dk)):
        err = (got_g.double() - want_g).abs().max().item()
        plain_err = (plain_g.double() - want_g).abs().max().item()
        floor = 32 * torch.finfo(torch.float32).eps * max(1.0, want_g.abs().max().item())
        assert err <= 2 * plain_err + floor, f"{name}: {err:.2e} > 2 x {plain_err:.2e} + {floor:.1e}"


def _plain_grads(q, k, v, roles, kwargs, rows, weights):
    """dq, dk of the same loss through role_attention's reference computed in q's dtype (plain PyTorch)."""
    from megatron_avar.ops.role_attention import build_problem, reference_role_attention

    q_, k_, v_ = (t.detach().clone().requires_grad_() for t in (q, k, v))
    problem, thd = build_problem(q_, k_, v_, roles, **kwargs)
    _, mass = reference_role_attention(problem, compute_dtype=q.dtype)
    flat = mass.squeeze(0).permute(1, 0, 2) if thd else mass.permute(0, 2, 1, 3).reshape(-1, *mass.shape[1::2])
    return torch.autograd.grad((flat[rows].double() * weights).sum(), (q_, k_))


def test_triton_probe_row_blocks_never_span_two_samples(triton_device):
    """Found in review: row blocks were cut every BLOCK_M sorted rows, so with few rows per packed sample (AGTO's
    tens of query rows) a block held rows of several samples and walked every key tile from the first one's start
    to the last one's end. Now each sample's rows start a block of their own; the values stay the truth's."""
    case = Case(packed=(20, 9, 1, 33, 17, 26, 12, 30), num_q_heads=4, num_kv_heads=2, head_dim=32, num_roles=3)
    q, k, v, roles, kwargs = _to(triton_device, *make(case, torch.float32, seed=41))
    starts = [0, *torch.tensor(case.packed).cumsum(0).tolist()[:-1]]
    rows = torch.tensor([s + i for s, n in zip(starts, case.packed) for i in range(0, n, 3)][::-1],
                        device=triton_device)  # a few rows of every sample, in reverse order
    problem = role_mass_module.build_mass_problem(q, k, roles, rows, num_roles=3, cu_seqlens=kwargs["cu_seqlens"])
    laid = role_mass_triton._sort(problem)
    block = role_mass_triton._blocks()[0]["BLOCK_M"]
    for start in range(0, laid.lo.numel(), block):
        used = laid.hi[start:start + block] > laid.lo[start:start + block]
        assert laid.lo[start:start + block][used].unique().numel() <= 1, f"block at slot {start}"
    assert laid.lo.numel() <= rows.numel() + len(case.packed) * (block - 1)
    weights = torch.randn(rows.numel(), 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want, want_dq, want_dk = _truth(q, k, v, roles, kwargs, rows, weights.to(triton_device))
    got, dq, dk = _probe(q, k, roles, kwargs, rows, weights.to(triton_device), "triton")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    for got_g, want_g in ((dq, want_dq), (dk, want_dk)):
        torch.testing.assert_close(got_g.double(), want_g, atol=1e-5 * max(want_g.abs().max().item(), 1.0), rtol=0)


def test_triton_probe_is_deterministic(triton_device):
    case = Case(packed=(25, 40), num_q_heads=4, num_kv_heads=1, head_dim=32)
    q, k, v, roles, kwargs = _to(triton_device, *make(case, torch.float32, seed=31))
    rows = torch.tensor([60, 3, 24, 30, 61, 64], device=triton_device)
    weights = torch.ones(rows.numel(), case.num_q_heads, case.num_roles, dtype=torch.float64, device=triton_device)
    first = _probe(q, k, roles, kwargs, rows, weights, "triton")
    second = _probe(q, k, roles, kwargs, rows, weights, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_probe_key_offsets_past_2_31_elements(triton_device, monkeypatch):
    """The dk kernel's key offsets are 64-bit: relaunched on K rows 2^24 - 16 elements apart (keys 128-135 past
    2^31 elements; the launcher would copy such a K to contiguous, so the recorded launch is repeated with only
    K and its stride changed), it returns bitwise the same dk. With offsets that wrap at 2^31 those keys read the
    zeros before the view instead. (The forward and dq kernels walk keys from 64-bit row windows.)"""
    case = Case(packed=(70, 66), num_q_heads=2, num_kv_heads=1, head_dim=16)
    q, k, v, roles, kwargs = _to(triton_device, *make(case, torch.bfloat16, seed=33))
    rows = torch.tensor([3, 69, 100, 129, 135, 131], device=triton_device)  # rows of both samples, past key 128
    weights = torch.randn(rows.numel(), 2, case.num_roles, generator=torch.Generator().manual_seed(8),
                          dtype=torch.float64).to(triton_device)
    kernel, launches = role_mass_triton._mass_dk_kernel, []

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append((grid, args, kw))
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(role_mass_triton, "_mass_dk_kernel", Recorded())
    _probe(q, k, roles, kwargs, rows, weights, "triton")
    (grid, args, kw), = launches
    args, names = list(args), kernel.arg_names
    stride = 2 ** 24 - 16
    keys = args[names.index("K")]
    assert (keys.shape[0] - 1) * stride >= 2 ** 31 and keys.stride(0) < stride
    wide = far_apart(tuple(keys.shape), (stride, *keys.stride()[1:]), keys.dtype, triton_device)
    wide.copy_(keys)
    want: torch.Tensor = args[names.index("DK")]
    got = torch.empty_like(want)
    args[names.index("K")], args[names.index("stride_kt")], args[names.index("DK")] = wide, stride, got
    kernel[grid](*args, **kw)
    assert want.abs().amax((1, 2))[128:].min() > 0  # the far keys get gradient
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_probe_at_qwen_scale_on_gpu(dtype):
    """Qwen2.5-VL-7B's heads (28 / 4, D=128), a 32,768-token packed row of 4 samples, 512 rows spread over the
    samples. Truth: the materialising probe reference (equal to role_attention's masses: the CPU tests) in
    float64 from the same inputs. Masses accumulate in fp32 (1e-5); the gradients' products run in the input
    dtype, so they are held to that dtype's resolution: 2^-7 (bf16) / 2^-10 (fp16) of their largest value."""
    from megatron_avar.ops.role_mass import build_mass_problem, reference_role_mass

    case = Case(packed=(9000, 1, 15000, 8767), num_q_heads=28, num_kv_heads=4, head_dim=128, num_roles=5,
                padding="tail")
    q, k, _, roles, kwargs = _to(torch.device("cuda"), *make(case, dtype, seed=32))
    gen = torch.Generator().manual_seed(7)
    rows = torch.randperm(sum(case.packed), generator=gen)[:512].cuda()
    weights = torch.randn(512, 28, 5, generator=gen, dtype=torch.float64).cuda()
    got, dq, dk = _probe(q, k, roles, kwargs, rows, weights, "triton")
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    want = reference_role_mass(build_mass_problem(q64, k64, roles, rows, num_roles=5, cu_seqlens=kwargs["cu_seqlens"]))
    want_dq, want_dk = torch.autograd.grad((want * weights).sum(), (q64, k64))
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=0)
    resolution = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got_g, want_g in ((dq, want_dq), (dk, want_dk)):
        torch.testing.assert_close(got_g.double(), want_g, atol=resolution * want_g.abs().max().item(), rtol=0)
