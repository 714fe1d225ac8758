"""The GPUs a plan is judged against, and the verdict: does a step's peak fit, with what headroom.

Memory is what ``nvidia-smi`` reports as the total of each card (the 80 GB H100 SXM: 81559 MiB; the 141 GB H200:
143771 MiB). Peak dense throughput from NVIDIA's data sheets (H100 SXM and H200 share the Hopper core): 989.4
TFLOP/s bf16 on tensor cores; 67 TFLOP/s for fp32 runs, the plain fp32 rate, not TF32's 494.7: nothing in this
project turns TF32 on (torch's matmuls keep IEEE fp32 by default, and the attention kernels ask for IEEE products
in fp32), so an fp32 step runs at that rate.

A plan's peak is what ``torch.cuda.max_memory_allocated`` counts (tensors). A step also needs memory that is not a
tensor: the CUDA context, NCCL's buffers, cuBLAS / Transformer Engine workspaces, and the caching allocator's
fragmentation (reserved minus allocated). The verdict adds :data:`RUNTIME_RESERVE_BYTES` and
:data:`FRAGMENTATION` x peak for them — typical values, not measured by this project — and a fit needs the sum
within the card.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPU", "GPUS", "RUNTIME_RESERVE_BYTES", "FRAGMENTATION", "Verdict", "verdict", "gpu_named",
           "gpu_of_device"]

RUNTIME_RESERVE_BYTES = 4 * 10**9
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class GPU:
    """name: how commands name it; label: for tables; memory_bytes: the card's total; peak_tflops: dense
    TFLOP/s by training precision (module docstring)."""

    name: str
    label: str
    memory_bytes: int
    peak_tflops: dict[str, float]


_HOPPER_TFLOPS = {"bf16": 989.4, "fp32": 67.0}
GPUS = {
    "h100": GPU("h100", "H100 80GB", 81559 * 2**20, _HOPPER_TFLOPS),
    "h200": GPU("h200", "H200 141GB", 143771 * 2**20, _HOPPER_TFLOPS),
}


def gpu_of_device(device_name: str) -> GPU | None:
    """The GPU of ``GPUS`` that a CUDA device name (``torch.cuda.get_device_name``) is, or None: an H100 other than
    the SXM one (PCIe, NVL) has other clocks and peaks, and no other card is listed."""
    name = device_name.upper()
    if "H200" in name:
        return GPUS["h200"]
    if "H100" in name and not any(variant in name for variant in ("PCIE", "NVL")):
        return GPUS["h100"]
    return None


def gpu_named(name: str, *, memory_gb: float | None = None) -> GPU:
    """The GPU called ``name`` (``GPUS``), with its memory replaced by ``memory_gb`` (1e9 bytes) when given."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}: allowed {', '.join(GPUS)}")
    gpu = GPUS[key]
    if memory_gb is None:
        return gpu
    if not memory_gb > 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    return GPU(gpu.name, f"{gpu.label} ({memory_gb:g} GB)", int(memory_gb * 1e9), gpu.peak_tflops)


@dataclass(frozen=True)
class Verdict:
    """gpu; required_bytes: the binding phase's peak + reserve + fragmentation; headroom_bytes: the card's
    memory minus that (negative: does not fit); phase: "training" or "rollout" (GRPO's generation, when that
    binds); step_seconds: the step time at the plan's MFU on this GPU (None when not predicted)."""

    gpu: GPU
    required_bytes: int
    headroom_bytes: int
    phase: str
    step_seconds: float | None

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def as_dict(self) -> dict:
        return {"gpu": self.gpu.name, "label": self.gpu.label, "memory_bytes": self.gpu.memory_bytes,
                "required_bytes": self.required_bytes, "headroom_bytes": self.headroom_bytes, "fits": self.fits,
                "binding_phase": self.phase, "step_seconds": self.step_seconds}


def verdict(gpu: GPU, training_peak: int, *, rollout_peak: int | None = None, engine_fraction: float = 0.0,
            engine_sleeps: bool = True, refit_peak: int | None = None, step_seconds: float | None = None) -> Verdict:
    """Whether a step fits ``gpu``. training_peak: the update's peak bytes. GRPO with a colocated engine:
    rollout_peak, the bytes the trainer holds while the engine generates, beside the engine's share
    ``engine_fraction`` x the card's memory (vLLM's gpu_memory_utilization); an engine that does not sleep
    (``engine_sleeps=False``) keeps that share through the update too. refit_peak: the bytes of the weight
    refit (the trainer, its gathered copy of the weights and the engine's weights, which wake alone for it)."""
    engine = engine_fraction * gpu.memory_bytes
    needed = lambda peak: peak * (1 + FRAGMENTATION) + RUNTIME_RESERVE_BYTES  # noqa: E731
    phases = {"training": needed(training_peak) + (0 if engine_sleeps else engine)}
    if rollout_peak is not None:
        phases["rollout"] = needed(rollout_peak) + engine
    if refit_peak is not None:
        phases["refit"] = needed(refit_peak) + (0 if engine_sleeps else engine)
    phase = max(phases, key=phases.__getitem__)
    required = int(phases[phase])
    return Verdict(gpu=gpu, required_bytes=required, headroom_bytes=gpu.memory_bytes - required, phase=phase,
                   step_seconds=step_seconds)
