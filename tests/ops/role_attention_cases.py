"""Random inputs and comparison helpers shared by the role_attention tests."""

from __future__ import annotations

import dataclasses
import itertools
import math
import mmap
import sys

import torch

from megatron_avar.ops import role_attention
from megatron_avar.ops.role_attention import build_problem, reference_role_attention


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration; `make` turns it into role_attention arguments."""

    batch: int = 2
    seq_len: int = 37
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    num_roles: int = 3
    causal: bool = True
    padding: str = "none"           # "none" | "left" | "right" | "all" (batch row 0 fully padded);
                                    # packed: anything but "none" pads the tail of every sample
    roles: str = "runs"             # "runs": contiguous segments like a chat; "scattered": i.i.d.
    edits: str = "none"             # "none" | "scale" | "bias" | "head_scale_bias" | "drop_role"
    packed: tuple[int, ...] | None = None   # THD sample lengths (then batch is ignored)

    def __str__(self):
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                  if getattr(self, f.name) != f.default]
        return ",".join(fields) or "default"


def make(case: Case, dtype=torch.float64, seed=0, requires_grad=True):
    """(q, k, v, key_roles, kwargs) for role_attention; logits are O(1..3) so softmax is not flat."""
    gen = torch.Generator().manual_seed(seed)
    if case.packed is not None:
        tokens = sum(case.packed)
        lead = (tokens,)
    else:
        lead = (case.batch, case.seq_len)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    # q.k / sqrt(D) has std ~ 1.5: peaked enough that mass differs clearly between roles.
    q = randn(*lead, case.num_q_heads, case.head_dim, scale=1.2)
    k = randn(*lead, case.num_kv_heads, case.head_dim, scale=1.2)
    v = randn(*lead, case.num_kv_heads, case.head_dim)
    roles = _roles(case, lead, gen)
    kwargs = dict(num_roles=case.num_roles, causal=case.causal)
    if case.packed is not None:
        kwargs["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(case.packed)], dtype=torch.int32)
    if case.edits != "none":
        kwargs["query_mask"] = torch.rand(*lead, generator=gen) < 0.6
        per_head = (case.num_q_heads, case.num_roles)
        if case.edits in ("scale", "head_scale_bias"):
            shape = per_head if case.edits == "head_scale_bias" else (case.num_roles,)
            kwargs["role_logit_scale"] = 0.4 + 1.2 * torch.rand(*shape, generator=gen)
        if case.edits in ("bias", "head_scale_bias"):
            shape = per_head if case.edits == "head_scale_bias" else (case.num_roles,)
            kwargs["role_logit_bias"] = torch.randn(*shape, generator=gen)
        if case.edits == "drop_role":  # log(1 - 1): role 0 removed from the edited rows
            bias = torch.zeros(case.num_roles)
            bias[0] = -math.inf
            kwargs["role_logit_bias"] = bias
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, roles, kwargs


def _roles(case: Case, lead, gen):
    num_roles = case.num_roles
    if case.roles == "scattered":
        roles = torch.randint(0, num_roles, lead, generator=gen)
    else:  # runs: role r repeated for a random run length, cycling through the roles
        flat = []
        while len(flat) < math.prod(lead):
            flat += [len(flat) // 7 % num_roles] * int(torch.randint(1, 9, (1,), generator=gen))
        roles = torch.tensor(flat[: math.prod(lead)]).reshape(lead)
    if case.packed is None:
        seq_len = lead[1]
        if case.padding == "left":
            for b in range(lead[0]):
                roles[b, : (b + 1) * seq_len // 5] = -1
        elif case.padding == "right":
            for b in range(lead[0]):
                roles[b, seq_len - (b + 1) * seq_len // 6:] = -1
        elif case.padding == "all":
            roles[0] = -1
    elif case.padding != "none":  # packed: pad the tail of every sample
        start = 0
        for n in case.packed:
            roles[start + n - n // 4: start + n] = -1
            start += n
    return roles


def random_loss(out: torch.Tensor, mass: torch.Tensor, seed: int = 1):
    """A random scalar loss of both outputs (weights drawn with explicit shapes, independent of strides)."""
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(tuple(out.shape), generator=gen, dtype=torch.float64).to(out.device)
    w_mass = torch.randn(tuple(mass.shape), generator=gen, dtype=torch.float64).to(mass.device)
    return (out.double() * w_out).sum() + (mass.double() * w_mass).sum()


def values_and_grads(q, k, v, roles, kwargs, impl):
    """(out, mass, dq, dk, dv) of `impl` on a random scalar loss of out and mass."""
    out, mass = role_attention(q, k, v, roles, impl=impl, **kwargs)
    grads = torch.autograd.grad(random_loss(out, mass), (q, k, v))
    return (out, mass, *grads)


def plain_low_precision(q, k, v, roles, kwargs):
    """Same outputs from plain PyTorch eager attention run in q's dtype (the low-precision baseline)."""
    problem, thd = build_problem(q, k, v, roles, **kwargs)
    out, mass = reference_role_attention(problem, compute_dtype=q.dtype)
    if thd:
        out, mass = out.squeeze(0), mass.squeeze(0)
    grads = torch.autograd.grad(random_loss(out, mass), (q, k, v))
    return (out, mass, *grads)


def detached64(q, k, v):
    return [t.detach().double().requires_grad_() for t in (q, k, v)]


NAMES = ("out", "mass", "dq", "dk", "dv")


def max_errors(results, truth):
    return {name: (a.double() - b.double()).abs().max().item() for name, a, b in zip(NAMES, results, truth)}


def assert_within_low_precision_budget(got, plain, truth, label):
    """Error vs the fp64 truth at most 2x plain PyTorch's error in the same dtype, plus a floor.

    Why: a kernel that computes in the input precision cannot beat rounding its inputs and outputs,
    which plain PyTorch attention (matmuls in that dtype, fp32 softmax) also pays; 2x leaves room for a
    different summation order. The floor, 32 fp32 ulps of the largest true value, is fp32
    accumulation noise (sums over ~70 keys plus one online-softmax rescale per key tile): it
    decides only in fp32, where plain PyTorch's own error is itself that noise, and is negligible
    against bf16/fp16 errors (~1e-3 to 1e-2).
    """
    err, plain_err = max_errors(got, truth), max_errors(plain, truth)
    eps32 = torch.finfo(torch.float32).eps
    for name, want in zip(NAMES, truth):
        floor = 32 * eps32 * max(1.0, want.abs().max().item())
        assert err[name] <= 2 * plain_err[name] + floor, (
            f"{label} {name}: error {err[name]:.2e} > 2 x plain {plain_err[name]:.2e} + {floor:.1e}")


# Linux's MAP_NORESERVE (Python's mmap module does not export it): reserve address space without committing memory.
_MAP_NORESERVE = 0x4000
INT32_HEADROOM = 2 ** 31  # elements before a far_apart view: offsets wrapped at 2^31 land there, not outside


def far_apart(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor of ``shape`` with element ``strides`` far apart enough that offsets pass 2^31 elements.

    It views a buffer INT32_HEADROOM elements in: a kernel whose offsets wrap at 2^31 elements then reads the
    zeros before it (a wrong result, not a fault). On the CPU the buffer is an anonymous private mapping that
    only reserves address space, so only the pages the tensor's elements touch take memory; on CUDA it is
    allocated (about 2 bytes x (2^31 + span) for 2-byte types). Skips the test where the mapping is refused.
    """
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    elements = INT32_HEADROOM + span
    if torch.device(device).type == "cuda":
        base = torch.zeros(elements, dtype=dtype, device=device)
    else:
        import pytest

        if not sys.platform.startswith("linux"):
            pytest.skip("needs Linux's MAP_NORESERVE")
        try:
            buffer = mmap.mmap(-1, elements * dtype.itemsize,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        except OSError as err:  # e.g. vm.overcommit_memory=2
            pytest.skip(f"cannot reserve {elements * dtype.itemsize / 2**30:.1f} GiB of address space: {err}")
        base = torch.frombuffer(buffer, dtype=dtype)  # keeps the mapping alive
    return base[INT32_HEADROOM:].as_strided(shape, strides)
