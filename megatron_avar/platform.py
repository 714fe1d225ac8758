"""The single place that knows which accelerator stack is present.

Everything else asks this module (never `torch.cuda.is_available()` directly, never `import
transformer_engine` to probe): whether CUDA, Transformer Engine, Triton's GPU backend and vLLM are
usable, which device and collective backend a rank uses, and, only when CUDA is absent, how to make
megatron-core run on the CPU.

Why a CPU compatibility layer is needed at all: megatron-core 0.16.1 calls CUDA unconditionally
(`torch.cuda.current_device()` as a device, literal ``device="cuda"`` in the pipeline schedules and
DDP buffers, ``param.type() == "torch.cuda.FloatTensor"`` checks in the optimizer, CUDA RNG state in
the tensor-parallel RNG tracker). :func:`enable_megatron_on_cpu` patches exactly those entry points and
installs a ``TorchFunctionMode`` that maps ``cuda`` devices to the CPU. It is idempotent and is a
no-op on a machine with CUDA, so training code calls :func:`prepare_megatron` unconditionally.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.overrides import TorchFunctionMode

from megatron_avar import console

T = TypeVar("T")

__all__ = [
    "cuda_available",
    "transformer_engine_available",
    "triton_gpu_available",
    "cuda_extension_available",
    "vllm_available",
    "device_for_local_rank",
    "distributed_backend",
    "on_any_rank",
    "on_device_of",
    "agreed",
    "stop_together",
    "bind_device",
    "prepare_megatron",
    "enable_megatron_on_cpu",
    "megatron_cpu_mode_active",
    "peak_memory_bytes",
    "reset_peak_memory",
]


@functools.cache
def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def transformer_engine_available() -> bool:
    """True only with CUDA and an installed Transformer Engine.

    Transformer Engine's import raises RuntimeError (not ImportError) without a GPU, so presence is
    checked through the import system's metadata and the module is imported only when CUDA exists.
    """
    if not cuda_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


@functools.cache
def triton_gpu_available() -> bool:
    """True when Triton can compile kernels for a GPU here (not the CPU interpreter)."""
    if not cuda_available() or importlib.util.find_spec("triton") is None:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


@functools.cache
def flash_attention_capable(device_index: int) -> bool:
    """Whether torch's SDPA has its FlashAttention kernel on this CUDA device (compute capability 8.0 or newer:
    A100, H100, H200); older GPUs fall back to kernels without grouped-query attention."""
    return cuda_available() and torch.cuda.get_device_capability(device_index)[0] >= 8


@functools.cache
def cuda_extension_available(module: str) -> bool:
    """Whether a compiled CUDA extension module that megatron-core imports for a fusion is installed here
    (apex / megatron's fused kernels, e.g. ``fused_weight_gradient_mlp_cuda``). megatron imports them inside the
    fused path, so a fusion switched on without its module fails at the first forward or backward."""
    return cuda_available() and importlib.util.find_spec(module) is not None


@functools.cache
def vllm_available() -> bool:
    return cuda_available() and importlib.util.find_spec("vllm") is not None


def device_for_local_rank(local_rank: int | None = None) -> torch.device:
    """The device a rank computes on: ``cuda:LOCAL_RANK`` with CUDA, else the CPU."""
    if not cuda_available():
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank)


def current_device() -> torch.device:
    """The device this process computes on now (the one `bind_device` chose): the current CUDA device, or CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def peak_memory_bytes() -> int:
    """The most memory this process has held so far: CUDA's max allocated bytes on the current device (tensors
    only, not the caching allocator's reserve), or, on the CPU, the process's peak resident set size (Linux
    ``ru_maxrss`` is in KiB; it includes the interpreter and libraries, so it is an upper bound)."""
    if cuda_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory() -> None:
    """Start :func:`peak_memory_bytes` over from what is held now, on CUDA (e.g. after warm-up steps, whose one-off
    buffers — Triton autotuning's cache-flush tensor — are not the step's). A no-op on the CPU, whose peak RSS
    cannot be reset."""
    if cuda_available():
        torch.cuda.reset_peak_memory_stats()


def on_device_of(tensor: torch.Tensor):
    """A context in which ``tensor``'s CUDA device is the current one (nothing for a tensor elsewhere). Triton
    launches a kernel on the current device and its stream, whatever device the arguments are on: without it, a
    layer on cuda:1 of a model spread over GPUs (``device_map="auto"``) would run cuda:0's kernel on cuda:1's
    memory."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def on_any_rank(happened: bool, group=None) -> bool:
    """Collective over ``group`` (the world by default): whether ``happened`` holds on any of its ranks, so that
    every rank stops together and none is left waiting in a later collective for one that has given up. A
    process without torch.distributed is its own world."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return happened
    flag = torch.tensor([1.0 if happened else 0.0], device=current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def stop_together(failure: BaseException | None, what: str, group=None, *,
                  error: Callable[[str], BaseException] = ValueError) -> None:
    """Collective over ``group`` (the world by default): return when ``failure`` is None on every rank of the group.
    Otherwise raise ``failure`` on each rank that has one, and on every other rank ``error(message)``, the message
    naming ``what``, the first rank that failed and that rank's error ("<what> failed on rank R (its error: ...)")
    — so that no rank goes on into a collective that another will never reach. One flag is reduced when all went
    well; the messages are gathered only when something failed."""
    import torch.distributed as dist

    if not on_any_rank(failure is not None, group=group):
        return
    if failure is not None and not dist.is_initialized():
        raise failure
    reports: list = [None] * dist.get_world_size(group)
    # one line: the first and last of a long message (a DataLoader worker's error holds its whole traceback)
    lines = str(failure).strip().splitlines() or [""]
    mine = None if failure is None else (
        dist.get_rank(), f"{type(failure).__name__}: {lines[0]}" + (f" … {lines[-1]}" if len(lines) > 1 else ""))
    dist.all_gather_object(reports, mine, group=group)
    if failure is not None:
        raise failure
    rank, message = next(report for report in reports if report is not None)
    raise error(f"{what} failed on rank {rank} (its error: {message})")


def agreed(compute: Callable[[], T], what: str, group=None, *,
           error: Callable[[str], BaseException] = ValueError) -> T:
    """Collective over ``group`` (the world by default): ``compute()``'s result when it raised on no rank of the
    group; otherwise :func:`stop_together`'s errors (its own on each rank where it raised, ``error(...)`` naming
    the failed rank on the others). ``compute`` is this rank's own work: a collective inside it would leave the
    ranks that did not raise waiting there."""
    try:
        result, failure = compute(), None
    except Exception as error_here:  # noqa: BLE001 — re-raised by stop_together, after the others have been told
        result, failure = None, error_here
    stop_together(failure, what, group, error=error)
    return result  # type: ignore[return-value]  # (compute returned: result is its T)


def distributed_backend() -> str:
    """The torch.distributed backend: NCCL on GPUs, gloo on CPUs (gloo has every collective megatron uses)."""
    return "nccl" if cuda_available() else "gloo"


def bind_device(local_rank: int) -> torch.device:
    """Pin this process to its device before creating the process group (NCCL and megatron need
    ``torch.cuda.set_device``; on the CPU there is nothing to pin). Returns the device."""
    device = device_for_local_rank(local_rank)
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:  # (torch: a raw "CUDA error: invalid device ordinal")
            raise ValueError(f"local rank {local_rank} needs cuda:{local_rank}, but this process sees {visible} "
                             "GPU(s): every rank of a node must see all of the node's GPUs (no per-task GPU binding "
                             "such as --gpus-per-task or --gpu-bind in SRUN_ARGS; CUDA_VISIBLE_DEVICES listing them "
                             "all)")
        torch.cuda.set_device(device)
    return device


_forking_parent: int | None = None  # the pid of the process about to fork (set by the at-fork hook)
_children_tied = False


def _remember_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _die_with_parent() -> None:
    """In a freshly forked child: ask the kernel for SIGKILL when the parent dies (PR_SET_PDEATHSIG), and exit
    at once if it died before the request was in place."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() != _forking_parent:  # 1: PR_SET_PDEATHSIG
        os._exit(1)


def tie_forked_children_to_this_process() -> None:
    """Linux, once per process (a training or conversion rank): every child it forks from now on (megatron's
    checkpoint writer workers, DataLoader workers) is killed when the rank dies. Without this, a rank killed
    with SIGKILL (the OOM killer, a failed node's job step) leaves a writer worker blocked for good on the
    queue its dead parent would have read. Children started with spawn / subprocess (fork + exec) are
    unaffected. The signal follows the thread that forked, so call it from the main thread of a process whose
    forks all come from there."""
    global _children_tied
    if _children_tied or not hasattr(os, "register_at_fork") or not os.path.exists("/proc/self"):
        return
    os.register_at_fork(before=_remember_parent, after_in_child=_die_with_parent)
    _children_tied = True


# Said once, by the logging rank, where it costs something: a CUDA machine without Transformer Engine. On a CPU
# Transformer Engine cannot be installed, so nothing is said there (megatron-core's own warnings are filtered).
MISSING_TRANSFORMER_ENGINE_NOTE = (
    "Transformer Engine is not installed: megatron-core falls back to its local PyTorch norms and linear layers "
    "and to torch's AdamW (slower, more memory); see docs/installation.md, "
    "'GPU clusters: NVIDIA PyTorch containers'")


def prepare_megatron() -> None:
    """Make megatron-core usable on this machine; call before building any megatron module. On a CUDA machine
    without Transformer Engine, says once (logging rank only) what that costs."""
    if not cuda_available():
        enable_megatron_on_cpu()
    elif not transformer_engine_available():
        console.note_once(MISSING_TRANSFORMER_ENGINE_NOTE)


_CPU = torch.device("cpu")


def _cpu_if_cuda(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, int):  # `torch.device(torch.cuda.current_device())`-style integer ordinals
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in factory calls, ``tensor.to("cuda")`` and ``tensor.cuda()`` to the CPU.

    megatron's optimizer and grad clipping check ``param.type()`` against CUDA tensor type names, so the
    type string is reported with the ``torch.cuda.`` prefix as it would be on a GPU.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_cpu_if_cuda(kwargs["device"]))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) if isinstance(a, (str, torch.device)) else a for a in args)
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            if out.startswith("torch.") and not out.startswith("torch.cuda."):
                out = "torch.cuda." + out[len("torch."):]
        return out


class _NoOpStream:
    """Stands in for a CUDA stream: megatron's DDP and p2p code only orders work on streams."""

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return None


_cpu_mode: _CudaToCpuMode | None = None


def megatron_cpu_mode_active() -> bool:
    return _cpu_mode is not None


def enable_megatron_on_cpu() -> None:
    """Patch the CUDA entry points megatron-core uses so it runs on a CPU-only torch. Idempotent.

    Raises RuntimeError if called where CUDA exists: then megatron must run on the GPU unchanged.
    """
    global _cpu_mode
    if cuda_available():
        raise RuntimeError("enable_megatron_on_cpu() is for machines without CUDA; call prepare_megatron()")
    if _cpu_mode is not None:
        return
    console.install_cpu_warning_filters()
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(seed)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _NoOpStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    import megatron.core.tensor_parallel.random as megatron_random

    # The tensor-parallel RNG tracker saves/restores CUDA generator states; use the CPU generator.
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    import megatron.core.optimizer.clip_grads as megatron_clip_grads

    # megatron's fallback (no apex, no TE) norms each gradient with an fp32 torch.norm, which on CPU loses ~1e-5
    # relative on a 10M-element gradient, and differently on each shard the distributed optimizer cuts: the
    # gradient norm (and so the clipping) would depend on the parallel layout. Summed in fp64 it does not.
    megatron_clip_grads.l2_norm_impl = _fp64_l2_norm

    _cpu_mode = _CudaToCpuMode()
    _cpu_mode.__enter__()


def _fp64_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract (the norm of all tensors, as a float32 [1] tensor; per-tensor norms
    not computed), accumulated in float64."""
    del chunk_size, noop_flag, per_tensor, args
    squares = [torch.linalg.vector_norm(tensor, dtype=torch.float64).square() for tensors in tensor_lists
               for tensor in tensors]
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    return total.sqrt().float().reshape(1), None
