"""Compile the role-attention and role-mass Triton kernels for Hopper (sm_90) without a GPU, through ptxas.

Run as a script in a process where TRITON_INTERPRET is unset (the kernels must be real JIT functions):
the interpreter executes kernels as Python and so never checks what only the compiler checks (types
of loop-carried values, constexpr branches, dot shapes, shared-memory layouts, registers). Prints one JSON line.

Each kernel is compiled as the runtime compiles it for a launch: the launchers run on CPU tensors with their
kernels replaced by recorders, and each recorded launch goes through Triton's own argument binder, so argument
types, constexprs and specialisation (16-byte aligned pointers and integers divisible by 16 marked so, integers
equal to 1 made constants) are those a GPU launch with tensors of these shapes and strides gets. Autotuned
kernels are compiled per candidate their pruning keeps. Inputs at Qwen2.5-VL-7B's attention shape (bf16,
28 query / 4 kv heads, D=128, 5 roles) are views of a fused QKV projection, as the model passes them.

  python tests/ops/role_attention_aot.py         # what test_kernels_compile_for_hopper checks

Register spills ("spill_stores" / "spill_loads", bytes per thread) come from ptxas -v run again on the
compiled PTX with Triton's flags, for every autotune candidate at Qwen2.5-VL-7B's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

from megatron_avar.ops import role_attention_triton as rat
from megatron_avar.ops import role_mass_triton as rmt
from megatron_avar.ops.role_attention import build_problem
from megatron_avar.ops.role_mass import build_mass_problem

ARCH = 90  # Hopper
TARGET = GPUTarget("cuda", ARCH, 32)
QWEN = dict(q_heads=28, kv_heads=4, head_dim=128, num_roles=5)


class _Recorder:
    """Stands in for a kernel (``kernel[grid](*args, **kwargs)``) and records the launch."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, args, kwargs))


def record(module, names, run) -> list:
    """The launches ``run()`` makes of ``module``'s kernels ``names`` (kernels not executed)."""
    log, saved = [], {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, _Recorder(name, log))
        run()
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    return log


def compile_launch(jit_fn, args, kwargs):
    """Compile ``jit_fn`` for sm_90 as JITFunction.run would for this launch (kwargs: constexprs and options)."""
    backend = CUDABackend(TARGET)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(jit_fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def ptxas_usage(compiled) -> dict:
    """Registers and spill bytes per thread: ptxas -v on the compiled PTX with the flags Triton's make_cubin uses."""
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(ARCH)}"]
    if not compiled.metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([get_ptxas(ARCH).path, *flags, ptx, "-o", ptx + ".cubin"],
                              capture_output=True, text=True, check=True)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    registers = re.search(r"Used (\d+) registers", done.stderr)
    assert spills and registers, done.stderr
    return dict(registers=int(registers[1]), spill_stores=int(spills[1]), spill_loads=int(spills[2]))


def _fused_qkv(tokens, q_heads, kv_heads, head_dim, dtype, batch=None):
    """q, k, v as views of one projection output: THD [T, H, D] (batch None) or Megatron's [S, B, H, D] seen as
    [B, S, H, D]."""
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, dtype=dtype) if batch is None else torch.randn(tokens, batch, width, dtype=dtype)
    cuts = [0, q_heads * head_dim, (q_heads + kv_heads) * head_dim, width]
    views = []
    for heads, lo, hi in zip((q_heads, kv_heads, kv_heads), cuts, cuts[1:]):
        part = qkv[..., lo:hi]
        views.append(part.view(tokens, heads, head_dim) if batch is None
                     else part.view(tokens, batch, heads, head_dim).transpose(0, 1))
    return views


def attention_problem(dtype, every_feature, q_heads, kv_heads, head_dim, num_roles, tokens=2048):
    """every_feature: a packed THD row of 3 samples with logit edits (windows, scale, bias, query mask);
    otherwise a padded causal batch of 2 x tokens / 2 without edits."""
    gen = torch.Generator().manual_seed(0)
    if every_feature:
        q, k, v = _fused_qkv(tokens, q_heads, kv_heads, head_dim, dtype)
        lead = (tokens,)
        bounds = [0, tokens // 3, tokens // 3 * 2 + 1, tokens]
        kwargs: dict[str, Any] = dict(cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                                      query_mask=torch.rand(tokens, generator=gen) < 0.5,
                                      role_logit_scale=torch.rand(q_heads, num_roles, generator=gen) + 0.5,
                                      role_logit_bias=torch.randn(q_heads, num_roles, generator=gen))
    else:
        q, k, v = _fused_qkv(tokens // 2, q_heads, kv_heads, head_dim, dtype, batch=2)
        lead, kwargs = (2, tokens // 2), {}
    roles = torch.randint(-1, num_roles, lead, generator=gen)
    problem, _ = build_problem(q, k, v, roles, num_roles=num_roles, causal=True, **kwargs)
    return problem


def attention_launches(problem, compute_mass=True, out_grad=True, mass_grad=True):
    """{kernel name: (args, kwargs)} of one forward and backward of the role-attention launchers."""

    def run():
        out, mass, lse = rat._forward(problem, compute_mass)
        if compute_mass:
            rat._backward(problem, out, mass, lse, torch.empty_like(out) if out_grad else None,
                          torch.empty_like(mass) if mass_grad else None)

    names = ("_fwd", "_dkdv", "_dq", "_bwd_preprocess_kernel")
    return {name: (args, kwargs) for name, args, kwargs in record(rat, names, run)}


def mass_launches(dtype):
    """{kernel name: (args, kwargs)} of the role-mass probe at Qwen2.5-VL-7B's heads, 256 rows of 2048 tokens."""
    q, k, _ = _fused_qkv(2048, QWEN["q_heads"], QWEN["kv_heads"], QWEN["head_dim"], dtype)
    gen = torch.Generator().manual_seed(1)
    roles = torch.randint(-1, QWEN["num_roles"], (2048,), generator=gen)
    rows = torch.randperm(2048, generator=gen)[:256]
    problem = build_mass_problem(q, k, roles, rows, num_roles=QWEN["num_roles"],
                                 cu_seqlens=torch.tensor([0, 1000, 2048], dtype=torch.int32))

    def run():
        order = rmt._sort(problem)
        mass, lse = rmt._forward(problem, order)
        rmt._backward(problem, order, mass, lse, torch.randn(mass.shape, generator=gen))

    names = ("_mass_fwd_kernel", "_mass_dq_kernel", "_mass_dk_kernel")
    return {name: (args, kwargs) for name, args, kwargs in record(rmt, names, run)}


def candidates(tuned, args, kwargs) -> list:
    """An autotuned kernel's candidates for this launch (its early_config_prune), as (label, kwargs) pairs."""
    prune = tuned.early_config_prune
    assert prune is not None
    kept = prune(tuned.configs, dict(zip(tuned.arg_names, args)), **kwargs)
    return [(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}",
             dict(kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)) for c in kept]


def variants():
    """(entry name, jit function, args, kwargs, report spills) for each compilation."""
    tuned = {"_fwd": rat._fwd, "_dkdv": rat._dkdv, "_dq": rat._dq}
    short = {"_fwd": "fwd", "_dkdv": "dkdv", "_dq": "dq"}
    for label, every_feature in (("every feature", True), ("plain", False)):
        launches = attention_launches(attention_problem(torch.bfloat16, every_feature, **QWEN))
        for name in ("_fwd", "_dkdv", "_dq"):
            args, kwargs = launches[name]
            for config, config_kwargs in candidates(tuned[name], args, kwargs):  # every candidate, with spills
                yield f"{short[name]} qwen7b bf16 {label} {config}", tuned[name].fn, args, config_kwargs, True
        if every_feature:
            args, kwargs = launches["_bwd_preprocess_kernel"]
            yield "preprocess qwen7b bf16", rat._bwd_preprocess_kernel, args, kwargs, False
    # Other dtypes and head sizes: the first candidate each pruning keeps.
    others = (("fp32 D=80 masses off", torch.float32, dict(QWEN, head_dim=80, num_roles=2), dict(compute_mass=False)),
              ("fp16 mass grad only", torch.float16, QWEN, dict(out_grad=False)),
              ("fp32 D=128", torch.float32, QWEN, {}),
              ("bf16 D=256", torch.bfloat16, dict(QWEN, head_dim=256), {}))
    for label, dtype, shape, grads in others:
        launches = attention_launches(attention_problem(dtype, True, **shape), **grads)
        for name, (args, kwargs) in launches.items():
            if name in tuned and (name == "_dkdv" or label != "fp16 mass grad only"):
                config, config_kwargs = candidates(tuned[name], args, kwargs)[0]
                yield f"{short[name]} {label} {config}", tuned[name].fn, args, config_kwargs, False
    for dtype in (torch.bfloat16, torch.float32):
        for name, (args, kwargs) in mass_launches(dtype).items():
            yield f"role_mass {name.split('_')[2]} {str(dtype)[6:]}", getattr(rmt, name), args, kwargs, False


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if rat.INTERPRETING or os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    report = {}
    for name, jit_fn, args, kwargs, spills in variants():
        start = time.perf_counter()
        compiled = compile_launch(jit_fn, args, kwargs)
        ptx = compiled.asm["ptx"]
        entry = dict(seconds=round(time.perf_counter() - start, 2), shared_bytes=compiled.metadata.shared,
                     wgmma=ptx.count("wgmma.mma_async."), mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)))
        if spills:
            entry.update(ptxas_usage(compiled))
        report[name] = entry
    # Which candidates each kernel may launch, by input dtype and BLOCK_D (its autotune pruning).
    pruned = {}
    for kernel_name, tuned in (("fwd", rat._fwd), ("dkdv", rat._dkdv), ("dq", rat._dq)):
        for dtype, block_d in ((torch.float32, 128), (torch.float32, 64), (torch.bfloat16, 128), (torch.bfloat16, 256)):
            kept = candidates(tuned, [torch.empty(1, dtype=dtype)], dict(BLOCK_D=block_d))
            pruned[f"{kernel_name} {dtype} {block_d}"] = [
                [c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]] for _, c in kept]
    print(json.dumps({"compiled": report, "pruned": pruned}))


if __name__ == "__main__":
    sys.exit(main())
