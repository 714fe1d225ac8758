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

from megatron_avar import platform
from megatron_avar.ops import role_attention, role_attention_triton
from megatron_avar.ops.role_attention import build_problem
from role_attention_cases import (
    NAMES,
    Case,
    assert_within_low_precision_budget,
    detached64,
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


def test_mass_off_flag_keeps_out_and_skips_masses(device):
    q, k, v, roles, kwargs = _on(device, *make(Case(edits="scale"), torch.float32, seed=14))
    problem, _ = build_problem(q, k, v, roles, **kwargs)
    out_on, mass_on = role_attention_triton.triton_role_attention(problem, compute_mass=True)
    out_off, mass_off = role_attention_triton.triton_role_attention(problem, compute_mass=False)
    assert mass_off.shape == (*mass_on.shape[:3], 0)
    dq_on, = torch.autograd.grad(out_on.square().sum(), q)
    dq_off, = torch.autograd.grad(out_off.square().sum(), q)
    # Same blocks (interpreter, or one autotune candidate): bitwise equal. Autotuned, the two variants may pick
    # different tiles, which only reorders fp32 sums.
    same_blocks = role_attention_triton.INTERPRETING or os.environ.get(role_attention_triton.AUTOTUNE_ENV) == "0"
    for on, off in ((out_on, out_off), (dq_on, dq_off)):
        if same_blocks:
            assert torch.equal(on, off)
        else:
            torch.testing.assert_close(on, off, rtol=0, atol=1e-6 * max(1.0, on.abs().max().item()))


def test_triton_is_deterministic(device):
    q, k, v, roles, kwargs = _on(device, *make(Case(num_q_heads=4, num_kv_heads=1, padding="right"), torch.float32,
                                               seed=15))
    first = values_and_grads(q, k, v, roles, kwargs, "triton")
    second = values_and_grads(q, k, v, roles, kwargs, "triton")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_kernels_compile_for_hopper():
    """The compiler (not the interpreter) accepts every kernel variant for sm_90, run through ptxas.

    In a subprocess without TRITON_INTERPRET, since this process imported the kernels interpreted.
    """
    repo = Path(__file__).resolve().parents[2]
    env = {key: val for key, val in os.environ.items()
           if key not in ("TRITON_INTERPRET", role_attention_triton.AUTOTUNE_ENV)}  # every candidate listed
    env.update(PYTHONPATH=str(repo), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("role_attention_aot.py"))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report, pruned = result["compiled"], result["pruned"]
    assert len(report) == 15
    for name, info in report.items():  # H100/H200 give a block at most 227 KiB of shared memory
        assert 0 < info["shared_bytes"] <= 227 * 1024, name
    as_lists = lambda shapes: [list(c) for c in shapes]  # noqa: E731
    for kernel, narrow, wide in (("fwd", role_attention_triton._FWD_CONFIGS,
                                  role_attention_triton._FWD_CONFIGS_WIDE_FP32),
                                 ("dkdv", role_attention_triton._DKDV_CONFIGS,
                                  role_attention_triton._DKDV_CONFIGS_WIDE_FP32),
                                 ("dq", role_attention_triton._DQ_CONFIGS,
                                  role_attention_triton._DQ_CONFIGS_WIDE_FP32)):
        assert pruned[f"{kernel} torch.float32 128"] == as_lists(wide)
        assert pruned[f"{kernel} torch.float32 64"] == as_lists(narrow)
        assert pruned[f"{kernel} torch.bfloat16 128"] == as_lists(narrow)


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
