"""Which sweep points fit the sweep's GPU: each point's SFT config planned as `avar plan` plans it
(``megatron_avar.plan``, with the point's GPU count), before anything is submitted. A point that does not fit is
never queued; `avar sweep` and `avar sweep collect` report it with the state DOES_NOT_FIT and the numbers."""

from __future__ import annotations

from megatron_avar.sweep.config import SweepConfig
from megatron_avar.sweep.grid import Point

__all__ = ["plan_points", "DOES_NOT_FIT", "describe_misfit"]

DOES_NOT_FIT = "DOES_NOT_FIT"


def plan_points(config: SweepConfig, points: list[Point]) -> dict[str, dict]:
    """Point name -> its plan on the sweep's ``gpu``: gpu (label), memory_gb, planned_peak_gb, required_gb (peak +
    fragmentation + runtime reserve, ``plan.gpus.verdict``) and fits. {} when the sweep sets no gpu."""
    if config.gpu is None:
        return {}
    from megatron_avar.plan import Assumptions, gpu_named, plan_config

    gpu = gpu_named(config.gpu, memory_gb=config.gpu_memory_gb)
    plans = {}
    for point in points:
        try:
            plan = plan_config(config.sft_config, [*point.overrides, f"out={point.run_dir}"], command="sft",
                               preset=config.plan_model,
                               assumptions=Assumptions(gpus=point.num_gpus, image_fraction=config.plan_image_fraction,
                                                       response_fraction=config.plan_response_fraction))
        except ValueError as error:
            raise ValueError(f"point {point.name}: {error} (the sweep plans every point before submitting it: "
                             "plan_model names the model size where model.hf_path has no config.json, gpu: null "
                             "submits without the check)") from None
        verdict = plan.verdicts([gpu])[0]
        plans[point.name] = {"gpu": gpu.label, "memory_gb": gpu.memory_bytes / 1e9,
                             "planned_peak_gb": plan.memory.peak / 1e9, "required_gb": verdict.required_bytes / 1e9,
                             "fits": verdict.fits}
    return plans


def describe_misfit(plan: dict) -> str:
    """One line: why a point was not submitted."""
    return (f"does not fit {plan['gpu']}: planned peak {plan['planned_peak_gb']:.1f} GB needs "
            f"{plan['required_gb']:.1f} GB of {plan['memory_gb']:.1f} GB (avar plan)")
