"""The Triton kernels agree with the reference in values and gradients.

On CPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py) with small shapes and small
blocks (several tiles per sequence); on a CUDA machine the same tests run compiled, on the GPU.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from megatron_avar import platform
from megatron_avar.ops import role_attention, role_attention_triton
from megatron_avar.ops.role_attention import build_problem
from role_attention_cases import (
    NAMES,
    Case,
    assert_within_low_precision_budget,
    detached64,
    far_apart,
    make,
    plain_low_precision,
    random_loss,
    values_and_grads,
)


@pytest.fixture
def device(monkeypatch):
    if role_attention_triton.INTERPRETING:
        # 16-row query tiles and 32-key tiles: several of each on the ~40-token test sequences, and
        # different sizes so a mix-up of BLOCK_M and BLOCK_N cannot pass.
        monkeypatch.setattr(role_attention_triton, "INTERPRETER_BLOCK_M", 16)
        monkeypatch.setattr(role_attention_triton, "INTERPRETER_BLOCK_N", 32)
        return torch.device("cpu")
    if not platform.triton_gpu_available():
        pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1")
    return torch.device("cuda")


def _on(device, q, k, v, roles, kwargs):
    moved = {key: val.to(device) if isinstance(val, torch.Tensor) and key != "cu_seqlens" else val
             for key, val in kwargs.items()}
    if "cu_seqlens" in kwargs:
        moved["cu_seqlens"] = kwargs["cu_seqlens"].to(device)
    tensors = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
    return (*tensors, roles.to(device), moved)


SWEEP = [
    Case(),
    Case(causal=False, padding="right"),
    Case(num_q_heads=2, num_kv_heads=2, padding="left"),                               # GQA 1
    Case(num_q_heads=7, num_kv_heads=1, head_dim=80, roles="scattered", num_roles=5),  # GQA 7, D=80
    Case(batch=1, seq_len=45, head_dim=128, num_roles=6, roles="scattered"),
    Case(seq_len=19, head_dim=32, num_roles=2, edits="scale"),
    Case(edits="head_scale_bias", padding="left", causal=False),
    Case(edits="drop_role", padding="left", num_q_heads=2, num_kv_heads=1),
    Case(padding="all", num_q_heads=2, num_kv_heads=1),                                # rows without keys
    Case(packed=(13, 1, 24, 9), num_q_heads=2, num_kv_heads=1),
    Case(packed=(20, 17), causal=False, padding="tail", edits="bias", num_q_heads=2, num_kv_heads=1),
]


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_triton_matches_reference_fp32(case, device):
    q, k, v, roles, kwargs = _on(device, *make(case, torch.float32, seed=11))
    got = values_and_grads(q, k, v, roles, kwargs, "triton")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    plain = plain_low_precision(q, k, v, roles, kwargs)
    truth = values_and_grads(*detached64(q, k, v), roles, kwargs, "reference")
    assert_within_low_precision_budget(got, plain, truth, str(case))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(edits="head_scale_bias", padding="left"),
                                  Case(packed=(30, 11), num_q_heads=7, num_kv_heads=1, num_roles=4)], ids=str)
def test_triton_low_precision_error_budget(case, dtype, device):
    q, k, v, roles, kwargs = _on(device, *make(case, dtype, seed=12))
    got = values_and_grads(q, k, v, roles, kwargs, "triton")
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    plain = plain_low_precision(q, k, v, roles, kwargs)
    truth = values_and_grads(*detached64(q, k, v), roles, kwargs, "reference")
    assert_within_low_precision_budget(got, plain, truth, f"{case} {dtype}")


@pytest.mark.parametrize("use", ["out", "mass"])
def test_triton_backward_with_one_output_used(use, device):
    """Only one output in the loss: the other's gradient arrives as None and its kernel term is skipped."""
    q, k, v, roles, kwargs = _on(device, *make(Case(padding="left", edits="bias"), torch.float32, seed=13))
    grads = {}
    for impl in ("triton", "reference"):
        out, mass = role_attention(q, k, v, roles, impl=impl, **kwargs)
        loss = random_loss(out, torch.zeros_like(mass)) if use == "out" else random_loss(torch.zeros_like(out), mass)
        grads[impl] = torch.autograd.grad(loss, (q, k, v), allow_unused=True)
    for name, a, b in zip(NAMES[2:], grads["triton"], grads["reference"]):
        b = torch.zeros_like(a) if b is None else b  # mass does not depend on v
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def first_config_only(monkeypatch):
    """Every autotuned kernel launches its first candidate (interpreted kernels have one fixed block shape):
    autotuning may pick different tiles for two variants of a kernel, which reorders fp32 sums."""
    if role_attention_triton.INTERPRETING:
        return
    for tuned in (role_attention_triton._fwd, role_attention_triton._dkdv, role_attention_triton._dq):
        prune = tuned.early_config_prune
        assert prune is not None
        monkeypatch.setattr(tuned, "early_config_prune",
                            lambda configs, named_args, prune=prune, **kwargs: prune(configs, named_args, **kwargs)[:1])
        monkeypatch.setattr(tuned, "cache", {})  # choices made before are kept per tuning key


def test_mass_off_flag_keeps_out_and_skips_masses(device, first_config_only):
    """Under the same block configuration, out and dq are bitwise those of the kernel with masses on."""
    q, k, v, roles, kwargs = _on(device, *make(Case(edits="scale"), torch.float32, seed=14))
    problem, _ = build_problem(q, k, v, roles, **kwargs)
    out_on, mass_on = role_attention_triton.triton_role_attention(problem, compute_mass=True)
    out_off, mass_off = role_attention_triton.triton_role_attention(problem, compute_mass=False)
    assert mass_off.shape == (*mass_on.shape[:3], 0)
    dq_on, = torch.autograd.grad(out_on.square().sum(), q)
    dq_off, = torch.autograd.grad(out_off.square().sum(), q)
    assert torch.equal(out_on, out_off)
    assert torch.equal(dq_on, dq_off)


def test_offsets_past_2_31_elements(device, first_config_only):
    """Tokens MAX_TILE_ROW_STRIDE - 16 elements apart (the widest layout the kernels take without a copy, like a
    fused-QKV view 16M features wide) put tokens 128-135 past 2^31 elements from q, k and v: the row offsets of
    every kernel (forward, dK/dV, dQ) must be 64-bit. Values and gradients are bitwise those of contiguous inputs;
    with offsets that wrap at 2^31 those tokens read the zeros before the view instead."""
    seq, heads, head_dim = 136, 4, 16  # 2 query heads, 1 kv head: q, k, v side by side in one token row
    stride = role_attention_triton.MAX_TILE_ROW_STRIDE - head_dim
    assert (seq - 1) * stride >= 2 ** 31
    case = Case(batch=1, seq_len=seq, num_q_heads=2, num_kv_heads=1, head_dim=head_dim, padding="left",
                edits="bias")
    q, k, v, roles, kwargs = _on(device, *make(case, torch.bfloat16, seed=19))
    fused = far_apart((1, seq, heads, head_dim), (seq * stride, stride, head_dim, 1), torch.bfloat16, device)
    fused.copy_(torch.cat([q, k, v], 2).detach())
    wide = [fused[:, :, :2], fused[:, :, 2:3], fused[:, :, 3:]]
    assert wide[0].stride(1) == stride
    assert role_attention_triton._tile_ready(wide[0]) is wide[0]  # passed as is (a wider stride is copied)
    wider = far_apart((1, 2, 1, head_dim), (2 * stride + 32, stride + 16, head_dim, 1), torch.bfloat16, device)
    assert role_attention_triton._tile_ready(wider).is_contiguous()
    got = values_and_grads(*[t.requires_grad_() for t in wide], roles, kwargs, "triton")
    want = values_and_grads(q, k, v, roles, kwargs, "triton")
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name


@triton.jit
def _role_dot_kernel(X, Roles, Out, X_FIRST: tl.constexpr, M: tl.constexpr, N: tl.constexpr, R: tl.constexpr):
    """Out = X @ one_hot(Roles) ([M, N] x [N, R], X_FIRST) or one_hot(Roles) @ X ([N, R] x [R, M]; X is [R, M])."""
    offs_m, offs_n, offs_r = tl.arange(0, M), tl.arange(0, N), tl.arange(0, R)
    roles = tl.load(Roles + offs_n)
    if X_FIRST:
        x = tl.load(X + offs_m[:, None] * N + offs_n[None, :])
        one_hot = role_attention_triton._one_hot(roles[:, None] == offs_r[None, :])
        out = role_attention_triton._role_dot(x, one_hot, tl.zeros([M, R], tl.float32), True)
        tl.store(Out + offs_m[:, None] * R + offs_r[None, :], out)
    else:
        x = tl.load(X + offs_r[:, None] * M + offs_m[None, :])
        one_hot = role_attention_triton._one_hot(roles[:, None] == offs_r[None, :])
        out = role_attention_triton._role_dot(x, one_hot, tl.zeros([N, M], tl.float32), False)
        tl.store(Out + offs_n[:, None] * M + offs_m[None, :], out)


@pytest.mark.parametrize("x_first", [True, False], ids=["P@onehot", "onehot@gT"])
def test_role_dot_is_exact_in_fp32(x_first, device):
    """The role sums on tensor cores (x in three bf16 parts times a one-hot matrix) lose no bit of fp32 x: with
    one key per role, each output is one product, so it must equal x bitwise (one bf16 part keeps 8 bits, two 16).
    Keys of role -1 (padding) contribute nothing."""
    gen = torch.Generator().manual_seed(20)
    m, n, r = 32, 16, 16
    roles = torch.randperm(n, generator=gen).to(torch.int32)
    roles[3] = -1
    if x_first:  # the forward's masses: P [M, N] @ one_hot [N, R]
        x = torch.rand(m, n, generator=gen) * torch.logspace(0, -30, n)
        want = torch.zeros(m, r)
        want[:, roles[roles >= 0].long()] = x[:, roles >= 0]
    else:  # the dK/dV kernel's g[i, role_j]: one_hot [N, R] @ g^T [R, M]
        x = torch.randn(r, m, generator=gen) * 10.0 ** torch.randint(-20, 20, (r, 1), generator=gen)
        want = torch.where((roles >= 0)[:, None], x[roles.clamp(min=0).long()], 0.0)
    out = torch.empty(want.shape)
    x, roles, out = x.to(device), roles.to(device), out.to(device)
    _role_dot_kernel[(1,)](x, roles, out, X_FIRST=x_first, M=m, N=n, R=r)
    assert torch.equal(out.cpu(), want)


def test_triton_is_deterministic(device):
    q, k, v, roles, kwargs = _on(device, *make(Case(num_q_heads=4, num_kv_heads=1, padding="right"), torch.float32,
                                               seed=15))
    first = values_and_grads(q, k, v, roles, kwargs, "triton")
    second = values_and_grads(q, k, v, roles, kwargs, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_deterministic_algorithms_keep_one_candidate_so_every_process_tiles_alike():
    """Autotuning picks by timing, and candidates tile (so sum) differently: under
    torch.use_deterministic_algorithms only the first candidate runs, in this process and in a resumed one."""
    shapes = role_attention_triton._FWD_CONFIGS
    configs = role_attention_triton._configs(shapes + role_attention_triton._FWD_CONFIGS_WIDE)
    kept = lambda **kw: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
                         for c in role_attention_triton.kept_configs(configs, shapes, **kw)]
    assert kept(autotune_all=True) == shapes and kept(autotune_all=False) == shapes[:1]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kept(autotune_all=True) == shapes[:1]
    finally:
        torch.use_deterministic_algorithms(before)


def test_autotune_choices_name_each_specialisation(monkeypatch):
    """What the benchmarks record: per kernel, the tuning key (argument values, then the tensors' dtypes) and
    the chosen candidate. Under the interpreter nothing is autotuned: empty lists."""
    if role_attention_triton.INTERPRETING:
        assert role_attention_triton.autotune_choices() == {"fwd": [], "dkdv": [], "dq": []}

    @triton.jit
    def kernel(X, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pass

    tuned = triton.autotune(role_attention_triton._configs([(128, 64, 8, 3), (64, 32, 4, 4)]), key=["N"])(kernel)
    tuned.cache[(4096, "torch.bfloat16", "torch.bfloat16")] = tuned.configs[1]
    monkeypatch.setattr(role_attention_triton, "_fwd", tuned)
    assert role_attention_triton.autotune_choices()["fwd"] == [
        dict(key=dict(N="4096"), dtypes=["torch.bfloat16"], config=[64, 32, 4, 4])]


def test_kernels_compile_for_hopper():
    """The compiler (not the interpreter) accepts every kernel variant for sm_90, run through ptxas, specialised
    as the runtime specialises real launches (role_attention_aot.py). At Qwen2.5-VL-7B's shapes every autotune
    candidate of every kernel (forward, dK/dV, dQ; every feature on and none) keeps its hot loop in registers (no
    spills) and the bf16 products run on wgmma, not mma.sync.

    In a subprocess without TRITON_INTERPRET, since this process imported the kernels interpreted.
    """
    repo = Path(__file__).resolve().parents[2]
    env = {key: val for key, val in os.environ.items()
           if key not in ("TRITON_INTERPRET", role_attention_triton.AUTOTUNE_ENV)}  # every candidate listed
    env.update(PYTHONPATH=str(repo), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("role_attention_aot.py"))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report, pruned = result["compiled"], result["pruned"]
    qwen = [name for name in report if "qwen7b bf16" in name and not name.startswith("preprocess")]
    lists = (role_attention_triton._FWD_CONFIGS, role_attention_triton._DKDV_CONFIGS, role_attention_triton._DQ_CONFIGS)
    assert len(qwen) == 2 * sum(map(len, lists))
    assert len(report) == len(qwen) + 15  # preprocess, other dtypes and head sizes, role_mass
    for name, info in report.items():  # H100/H200 give a block at most 227 KiB of shared memory
        assert 0 < info["shared_bytes"] <= 227 * 1024, name
    for name in qwen:
        assert report[name]["wgmma"] > 0 and report[name]["mma_sync"] == 0, (name, report[name])
        assert report[name]["spill_stores"] == report[name]["spill_loads"] == 0, (name, report[name])
    as_lists = lambda shapes: [list(c) for c in shapes]  # noqa: E731
    for kernel, narrow, wide in (("fwd", role_attention_triton._FWD_CONFIGS,
                                  role_attention_triton._FWD_CONFIGS_WIDE),
                                 ("dkdv", role_attention_triton._DKDV_CONFIGS,
                                  role_attention_triton._DKDV_CONFIGS_WIDE),
                                 ("dq", role_attention_triton._DQ_CONFIGS,
                                  role_attention_triton._DQ_CONFIGS_WIDE)):
        assert pruned[f"{kernel} torch.float32 128"] == as_lists(wide)
        assert pruned[f"{kernel} torch.float32 64"] == as_lists(narrow)
        assert pruned[f"{kernel} torch.bfloat16 128"] == as_lists(narrow)
        assert pruned[f"{kernel} torch.bfloat16 256"] == as_lists(wide)  # the narrow lists' tiles do not fit there


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_triton_matches_blockwise_at_qwen_scale_on_gpu(packed):
    """Qwen2.5-VL-7B attention shape (28 q / 4 kv heads, D=128), bf16, 2k tokens, every feature on."""
    base = Case(batch=2, seq_len=1024, num_q_heads=28, num_kv_heads=4, head_dim=128, num_roles=5,
                padding="left", edits="head_scale_bias")
    case = dataclasses.replace(base, packed=(700, 1, 900, 447)) if packed else base
    q, k, v, roles, kwargs = _on(torch.device("cuda"), *make(case, torch.bfloat16, seed=16))
    got = values_and_grads(q, k, v, roles, kwargs, "triton")
    plain = plain_low_precision(q, k, v, roles, kwargs)
    truth = values_and_grads(*[t.detach().float().requires_grad_() for t in (q, k, v)], roles, kwargs, "blockwise")
    assert_within_low_precision_budget(got, plain, truth, str(case))


def _detached32(q, k, v):
    return [t.detach().float().requires_grad_() for t in (q, k, v)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    Case(batch=1, seq_len=8192, num_q_heads=28, num_kv_heads=4, head_dim=128, num_roles=5),
    Case(packed=(9000, 1, 15000, 8767), num_q_heads=2, num_kv_heads=1, head_dim=128, num_roles=5, padding="tail"),
], ids=["7b-heads-8k", "thd-32k"])
def test_triton_error_budget_at_long_sequences_on_gpu(case, dtype):
    """Qwen2.5-VL-7B's heads at 8k, and a 32,768-token packed THD row (4 samples, one of a single token, padded
    tails): the same error budget as the short cases. The truth is fp32 (fp64 S x S tensors would not fit):
    its own error, ~1e-6 relative, is far below the bf16/fp16 budget (~1e-3). At 32k the budget's plain eager
    attention forms [H, S, S] fp32 probabilities, so that case keeps 2 query heads of one kv head."""
    q, k, v, roles, kwargs = _on(torch.device("cuda"), *make(case, dtype, seed=17))
    got = values_and_grads(q, k, v, roles, kwargs, "triton")
    plain = plain_low_precision(q, k, v, roles, kwargs)
    torch.cuda.empty_cache()
    truth = values_and_grads(*_detached32(q, k, v), roles, kwargs, "reference")
    assert_within_low_precision_budget(got, plain, truth, f"{case} {dtype}")


@pytest.mark.gpu
def test_triton_is_deterministic_at_qwen_scale_on_gpu():
    """The backward has no atomics (one kernel per key tile, one per query tile): bitwise equal reruns."""
    case = Case(packed=(1500, 2596), num_q_heads=28, num_kv_heads=4, head_dim=128, num_roles=5, edits="bias")
    q, k, v, roles, kwargs = _on(torch.device("cuda"), *make(case, torch.bfloat16, seed=18))
    first = values_and_grads(q, k, v, roles, kwargs, "triton")
    second = values_and_grads(q, k, v, roles, kwargs, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_every_triton_launch_runs_on_the_device_of_its_tensors(device, monkeypatch):
    """Triton launches on the current CUDA device, whatever device the tensors are on: a layer on cuda:1 of a
    model spread over GPUs (`avar vas --device-map auto`) ran cuda:0's kernels on cuda:1's memory. Both kernel
    families enter platform.on_device_of(q) around their forward and their backward."""
    from megatron_avar.ops import role_mass

    entered = []
    real = platform.on_device_of
    monkeypatch.setattr(platform, "on_device_of", lambda tensor: entered.append(tensor.device) or real(tensor))
    q, k, v, roles, kwargs = _on(device, *make(Case(num_q_heads=2, num_kv_heads=1, head_dim=16), torch.float32,
                                               seed=40))
    values_and_grads(q, k, v, roles, kwargs, "triton")
    assert entered == [q.device, q.device]  # role_attention: forward, backward
    mass = role_mass(q, k, roles, torch.tensor([3, 9], device=device), num_roles=kwargs["num_roles"], impl="triton")
    torch.autograd.grad(mass.sum(), (q, k))
    assert entered == [q.device] * 4  # and the probe's
