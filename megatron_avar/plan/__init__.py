"""`avar plan`: the per-GPU memory and step time of an `avar sft` / `avar grpo` run before it is submitted.

    from megatron_avar.plan import Assumptions, plan_config
    plan = plan_config("examples/sft/avar_7b.yaml", [], preset="7b", assumptions=Assumptions(gpus=16))
    plan.memory.peak, [v.fits for v in plan.verdicts()]

``plan.memory`` holds the formulas (weights, gradients, optimizer states, activations by recompute mode and
layout, in-flight pipeline micro-batches, vision encoder, logits, AVAR masses), ``plan.gpus`` the GPUs and the
verdict, ``plan.runs`` the link to the sft / grpo configs and the step time.
"""

import importlib

# Loaded on first use: `avar --help` registers the plan command without importing torch (plan.memory reads the
# model configs, whose package imports torch).
_EXPORTS = {
    "gpus": ("GPUS", "Verdict", "gpu_named", "verdict"),
    "memory": ("CPU_KERNELS", "GPU_KERNELS", "KERNELS", "Kernels", "MemoryPlan", "Parallelism",
               "StageMemory", "StepShape", "memory_plan", "stage_parameters"),
    "runs": ("Assumptions", "RunPlan", "load_model_config", "microbatch_row_counts", "plan_config", "plan_grpo",
             "plan_sft"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)  # pyright: ignore[reportUnsupportedDunderAll]  (built from _EXPORTS)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
