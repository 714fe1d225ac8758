"""Compile the role-attention Triton kernels for Hopper (sm_90) without a GPU, through ptxas.

Run as a script in a process where TRITON_INTERPRET is unset (the kernels must be real JIT functions):
the interpreter executes kernels as Python and so never checks what only the compiler checks (types
of loop-carried values, constexpr branches, dot shapes, shared-memory layouts). Prints one JSON line.
"""

import json
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_avar.ops import role_attention_triton as rat
from megatron_avar.ops import role_mass_triton as rmt

_POINTER_TYPES = {"Roles": "*i32", "QMask": "*i8", "RowStart": "*i32", "RowEnd": "*i32", "ScaleTab": "*fp32",
                  "BiasTab": "*fp32", "Mass": "*fp32", "Lse": "*fp32", "Delta": "*fp32", "DMass": "*fp32",
                  "Rows": "*i64", "KeyLo": "*i64", "KeyHi": "*i64", "BlockLo": "*i64", "BlockHi": "*i64"}
_FLOAT_SCALARS = ("sm_scale_log2", "sm_scale")


def compile_for(kernel, dtype, constexprs, num_warps, num_stages, target):
    """Compile `kernel` with tensor pointers of `dtype` ("bf16", "fp16", "fp32") and the given constexprs."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():                  # pointer arguments are capitalised
            signature[name] = _POINTER_TYPES.get(name, "*" + dtype)
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def variants():
    every = dict(HEAD_DIM=128, BLOCK_D=128, NUM_ROLES=5, CAUSAL=True, HAS_WINDOWS=True, HAS_SCALE=True,
                 HAS_BIAS=True, DOT_FP32=False, PRECISION="tf32")
    plain = dict(HEAD_DIM=80, BLOCK_D=128, NUM_ROLES=2, CAUSAL=False, HAS_WINDOWS=False, HAS_SCALE=False,
                 HAS_BIAS=False, DOT_FP32=False, PRECISION="ieee")
    yield "fwd bf16 all features", rat._fwd_kernel, "bf16", dict(every, BLOCK_R=8, BLOCK_M=128, BLOCK_N=64,
                                                                  COMPUTE_MASS=True), 8, 3
    yield "fwd fp32 masses off", rat._fwd_kernel, "fp32", dict(plain, BLOCK_R=2, BLOCK_M=64, BLOCK_N=32,
                                                                COMPUTE_MASS=False), 4, 3
    yield "dkdv bf16 all features", rat._bwd_dkdv_kernel, "bf16", dict(every, BLOCK_M=32, BLOCK_N=128,
                                                                        HAS_OUT_GRAD=True, HAS_MASS_GRAD=True), 4, 3
    yield "dq bf16 all features", rat._bwd_dq_kernel, "bf16", dict(every, BLOCK_R=8, BLOCK_M=128, BLOCK_N=32,
                                                                    HAS_OUT_GRAD=True, HAS_MASS_GRAD=True), 4, 3
    yield "dkdv fp16 mass grad only", rat._bwd_dkdv_kernel, "fp16", dict(every, BLOCK_M=64, BLOCK_N=64,
                                                                          HAS_OUT_GRAD=False, HAS_MASS_GRAD=True), 4, 2
    # fp32 with 128-wide heads: the first candidate of each wide-fp32 list (what MEGATRON_AVAR_TRITON_AUTOTUNE=0
    # launches); the 2-byte lists' candidates need more shared memory than a block may have in fp32.
    wide = dict(every, PRECISION="ieee")
    for name, kernel, shapes, extra in (
            ("fwd", rat._fwd_kernel, rat._FWD_CONFIGS_WIDE_FP32, dict(BLOCK_R=8, COMPUTE_MASS=True)),
            ("dkdv", rat._bwd_dkdv_kernel, rat._DKDV_CONFIGS_WIDE_FP32, dict(HAS_OUT_GRAD=True, HAS_MASS_GRAD=True)),
            ("dq", rat._bwd_dq_kernel, rat._DQ_CONFIGS_WIDE_FP32, dict(BLOCK_R=8, HAS_OUT_GRAD=True,
                                                                      HAS_MASS_GRAD=True))):
        m, n, warps, stages = shapes[0]
        yield f"{name} fp32 D=128 first wide candidate", kernel, "fp32", dict(wide, BLOCK_M=m, BLOCK_N=n, **extra), \
            warps, stages
    # The role-mass probe's kernels (one block configuration on GPUs), bf16 and fp32 at D=128.
    mass_m, mass_n, mass_warps, mass_stages = rmt.GPU_BLOCKS
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        probe = dict(HEAD_DIM=128, BLOCK_D=128, NUM_ROLES=5, BLOCK_R=16, BLOCK_M=mass_m, BLOCK_N=mass_n,
                     DOT_FP32=False, PRECISION=precision)
        for name, kernel in (("fwd", rmt._mass_fwd_kernel), ("dq", rmt._mass_dq_kernel), ("dk", rmt._mass_dk_kernel)):
            yield f"role_mass {name} {dtype}", kernel, dtype, probe, mass_warps, mass_stages
    yield "preprocess", rat._bwd_preprocess_kernel, "bf16", dict(HEAD_DIM=128, BLOCK_D=128, NUM_ROLES=5, BLOCK_R=8,
                                                                  BLOCK_M=64, HAS_OUT_GRAD=True,
                                                                  HAS_MASS_GRAD=True), 4, 2


def main():
    if rat.INTERPRETING or os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    target = GPUTarget("cuda", 90, 32)
    report = {}
    for name, kernel, dtype, constexprs, warps, stages in variants():
        start = time.perf_counter()
        compiled = compile_for(kernel, dtype, constexprs, warps, stages, target)
        report[name] = dict(seconds=round(time.perf_counter() - start, 2), shared_bytes=compiled.metadata.shared)
    # Which candidates each kernel may launch, by input dtype and BLOCK_D (its autotune pruning).
    import torch

    pruned = {}
    for kernel_name, tuned in (("fwd", rat._fwd), ("dkdv", rat._dkdv), ("dq", rat._dq)):
        for dtype, block_d in ((torch.float32, 128), (torch.float32, 64), (torch.bfloat16, 128)):
            kept = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(1, dtype=dtype)}, BLOCK_D=block_d)
            pruned[f"{kernel_name} {dtype} {block_d}"] = [
                [c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages] for c in kept]
    print(json.dumps({"compiled": report, "pruned": pruned}))


if __name__ == "__main__":
    sys.exit(main())
