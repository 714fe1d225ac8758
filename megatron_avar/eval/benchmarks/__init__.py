"""The seven AVAR benchmarks (docs/evaluation.md), one small adapter each; :data:`BENCHMARKS` maps CLI names
to classes in the order of the paper's table."""

from __future__ import annotations

from megatron_avar.eval.benchmarks.base import Benchmark, Judgement, Sample
from megatron_avar.eval.benchmarks.hallusionbench import HallusionBench
from megatron_avar.eval.benchmarks.mathverse import MathVerseVisionOnly
from megatron_avar.eval.benchmarks.mathvision import MathVision
from megatron_avar.eval.benchmarks.mathvista import MathVista
from megatron_avar.eval.benchmarks.mmmu import MMMU
from megatron_avar.eval.benchmarks.mmmu_pro import MMMUPro
from megatron_avar.eval.benchmarks.mmstar import MMStar

__all__ = ["BENCHMARKS", "Benchmark", "Judgement", "Sample", "get_benchmark"]

BENCHMARKS: dict[str, type[Benchmark]] = {
    cls.name: cls for cls in (MathVista, MathVision, MathVerseVisionOnly, MMMU, MMMUPro, MMStar, HallusionBench)
}


def get_benchmark(name: str, *, mathvision_split: str = "test") -> Benchmark:
    """An adapter by CLI name; ValueError listing the names otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return MathVision(mathvision_split) if name == "mathvision" else BENCHMARKS[name]()
