"""Sweep points resolved against the cluster shape: a deterministic name, the layout, and the dotted overrides
that turn the base SFT config into this point's run.

The name is a function of the point alone (not of its position in the grid or of time), so re-running a sweep,
or adding points to it, finds the same run directories: ``<model>_n<nodes>_tp<tp>_pp<pp>_dp<dp>_seq<S>_agto-on
_steps<K>`` (``base`` where the base config decides), plus ``_x<hash>`` of the point's extra overrides. Its run
directory is ``<out>/runs/<name>`` (:func:`run_dir_of`), in every sweep.json ever written.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_avar.sweep.config import PointSpec, SweepConfig

__all__ = ["Point", "resolve_points", "run_dir_of", "RUNS_DIR"]

RUNS_DIR = "runs"


@dataclass(frozen=True)
class Point:
    """A point ready to submit. num_gpus: ranks of the job (GPUs on a GPU cluster); overrides: base
    sft_overrides first, then this point's (later ones win in `avar sft`)."""

    name: str
    spec: PointSpec
    dp: int
    num_gpus: int
    overrides: tuple[str, ...]
    run_dir: Path

    def as_dict(self) -> dict:
        return {"name": self.name, "model": self.spec.model, "nodes": self.spec.nodes, "tp": self.spec.tp,
                "pp": self.spec.pp, "cp": self.spec.cp, "dp": self.dp, "num_gpus": self.num_gpus,
                "seq_length": self.spec.seq_length, "agto": self.spec.agto, "steps": self.spec.steps,
                "extra_overrides": list(self.spec.overrides), "overrides": list(self.overrides),
                "run_dir": str(Path(RUNS_DIR) / self.name)}  # relative to the sweep folder: it may be moved


def run_dir_of(out: str | Path, name: str) -> Path:
    """The run directory of point ``name`` of the sweep in ``out``. Derived from the sweep folder, not from the
    directory the sweep was submitted from, so a sweep collects from anywhere and after being moved or copied."""
    return Path(out) / RUNS_DIR / name


def _tag(value) -> str:
    return "base" if value is None else str(value)


def point_name(spec: PointSpec, dp: int) -> str:
    model = "base" if spec.model is None else re.sub(r"[^A-Za-z0-9.-]+", "-", Path(spec.model).name) or "model"
    context = f"_cp{spec.cp}" if spec.cp > 1 else ""  # (names of CP=1 points are those of sweeps before CP)
    name = (f"{model}_n{spec.nodes}_tp{spec.tp}_pp{spec.pp}{context}_dp{dp}_seq{_tag(spec.seq_length)}"
            f"_agto-{'on' if spec.agto else 'off'}_steps{_tag(spec.steps)}")
    if spec.overrides:
        name += "_x" + hashlib.sha1(" ".join(spec.overrides).encode()).hexdigest()[:8]
    return name


def resolve_points(config: SweepConfig) -> list[Point]:
    """Every point of the sweep with its layout checked against nodes x ranks_per_node."""
    points, names = [], {}
    for spec in config.all_points():
        world = spec.nodes * config.ranks
        if world % (spec.tp * spec.pp * spec.cp):
            raise ValueError(f"point nodes={spec.nodes} tp={spec.tp} pp={spec.pp} cp={spec.cp}: {world} ranks "
                             f"({spec.nodes} x {config.ranks} per node) are not divisible by tp x pp x cp")
        dp = world // (spec.tp * spec.pp * spec.cp)
        overrides = [f"parallel.tensor_model_parallel_size={spec.tp}",
                     f"parallel.pipeline_model_parallel_size={spec.pp}",
                     f"parallel.context_parallel_size={spec.cp}"]
        if spec.tp == 1:  # the base config's sequence parallelism applies where there is TP to split over
            overrides.append("parallel.sequence_parallel=false")
        if spec.model is not None:
            overrides.append(f"model.hf_path={spec.model}")
        if spec.seq_length is not None:
            overrides.append(f"data.seq_length={spec.seq_length}")
        if spec.steps is not None:
            overrides.append(f"train.steps={spec.steps}")
        if not spec.agto:
            overrides += ["avar.alpha=0", "avar.beta=0"]
        if config.global_batch_per_dp is not None:
            overrides.append(f"train.global_batch_size={config.global_batch_per_dp * dp}")
        name = point_name(spec, dp)
        if name in names and names[name] != spec:
            raise ValueError(f"points {names[name]} and {spec} get the same run name {name!r} (models with the "
                             "same directory name?): rename one model directory")
        names[name] = spec
        points.append(Point(name=name, spec=spec, dp=dp, num_gpus=world,
                            overrides=(*config.sft_overrides, *overrides, *spec.overrides),
                            run_dir=run_dir_of(config.out, name)))
    return points
