"""The config of `avar sweep`: a grid of `avar sft` runs submitted as Slurm jobs (examples/sweeps/).

A sweep is one base SFT config (``sft_config`` + ``sft_overrides``) and a set of points. Each point fixes a
layout and a few knobs — model checkpoint, nodes, TP, PP, CP (DP = nodes x ranks_per_node / (TP x PP x CP)), sequence
length, AGTO on/off, steps — plus optional extra dotted overrides, and becomes one sbatch of ``script`` with
its own run directory ``<out>/runs/<point name>``. Points come from ``grid`` (the cartesian product of its
axes) followed by ``points`` (an explicit list, for sets that are not a product); a point listed twice is run
once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_avar.config import config_from_dict

__all__ = ["SweepConfig", "SlurmOptions", "GridConfig", "PointSpec"]


def _check_overrides(where: str, overrides) -> None:
    for override in overrides:
        if not isinstance(override, str) or "=" not in override or any(c.isspace() for c in override):
            raise ValueError(f"{where}: {override!r} must be a dotted.key=value string without spaces (the launcher "
                             "passes overrides space-separated in OVERRIDES)")


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch options of every point. account / partition / qos / time: passed as --account ... when set
    (None: the cluster's or the script's default; time as sbatch reads it, e.g. "01:00:00");
    extra_args: further sbatch options, e.g. ["--mem=4G", "--cpus-per-task=1"]; env: environment variables for
    the job (e.g. PYTHON, CONTAINER, SRUN_ARGS: see slurm/lib/launch.sh)."""

    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    time: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        bad = [a for a in self.extra_args if not isinstance(a, str) or not a.startswith("-")]
        if bad:
            raise ValueError(f"slurm.extra_args: {bad} are not sbatch options (each starts with '-')")
        for reserved in ("CONFIG", "RUN_DIR", "OVERRIDES", "REPO"):
            if reserved in self.env:
                raise ValueError(f"slurm.env.{reserved} is set by the sweep per point; remove it")


@dataclass(frozen=True)
class PointSpec:
    """One run. model: an HF checkpoint directory (None: the base config's model.hf_path); nodes; tp / pp / cp:
    tensor / pipeline / context parallel sizes (a TP=1 point runs without the base config's sequence parallelism,
    which needs TP > 1); seq_length / steps: None keeps the base config's; agto: False trains with
    avar.alpha = avar.beta = 0 (the masses are still computed, so this measures the objective's terms and their
    backward, not the mass-returning attention itself); overrides: extra dotted overrides of this point."""

    model: str | None = None
    nodes: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    seq_length: int | None = None
    agto: bool = True
    steps: int | None = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.nodes < 1 or self.tp < 1 or self.pp < 1 or self.cp < 1:
            raise ValueError(f"point nodes/tp/pp/cp must be >= 1, got {self.nodes}/{self.tp}/{self.pp}/{self.cp}")
        if self.seq_length is not None and self.seq_length < 1 or self.steps is not None and self.steps < 1:
            raise ValueError("point seq_length and steps must be >= 1 (or null for the base config's)")
        if not isinstance(self.agto, bool):
            raise ValueError(f"point agto must be true or false, got {self.agto!r}")
        _check_overrides("point overrides", self.overrides)
        if self.model is not None and any(c.isspace() for c in str(self.model)):
            raise ValueError(f"point model {self.model!r} contains whitespace: the launcher passes overrides "
                             "space-separated in OVERRIDES; give a path without spaces (a symlink to it)")


@dataclass(frozen=True)
class GridConfig:
    """The cartesian product of these axes (each a list; an empty list leaves that knob to the base config,
    e.g. model: [] keeps model.hf_path). An all-default grid is one point; set ``enabled: false`` to use only
    the explicit ``points``."""

    enabled: bool = True
    model: list[str] = field(default_factory=list)
    nodes: list[int] = field(default_factory=lambda: [1])
    tp: list[int] = field(default_factory=lambda: [1])
    pp: list[int] = field(default_factory=lambda: [1])
    cp: list[int] = field(default_factory=lambda: [1])
    seq_length: list[int] = field(default_factory=list)
    agto: list[bool] = field(default_factory=lambda: [True])
    steps: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("nodes", "tp", "pp", "cp", "agto"):
            if not getattr(self, name):
                raise ValueError(f"grid.{name} must list at least one value")

    def points(self) -> list[PointSpec]:
        import itertools

        if not self.enabled:
            return []
        axes = [self.model or [None], self.nodes, self.tp, self.pp, self.cp, self.seq_length or [None], self.agto,
                self.steps or [None]]
        return [PointSpec(model=m, nodes=n, tp=t, pp=p, cp=c, seq_length=s, agto=a, steps=k)
                for m, n, t, p, c, s, a, k in itertools.product(*axes)]


@dataclass(frozen=True)
class SweepConfig:
    """out: the sweep directory (sweep.json, state.json, runs/<point>/, results.csv/.json, plots).
    sft_config / sft_overrides: the base `avar sft` YAML and dotted overrides every point starts from.
    script: the sbatch script (run from the repository root, the directory `avar sweep` is called from).
    gpus_per_node: --gpus-per-node of each job (0 on a CPU cluster); ranks_per_node: --ntasks-per-node (None:
    one rank per GPU). max_concurrent: at most this many points queued or running at once (dependency chains,
    see megatron_avar.sweep.slurm). global_batch_per_dp: set train.global_batch_size = this x DP per point
    (weak scaling); None keeps the base config's global batch (strong scaling). warmup_steps: the first steps
    of each run left out of the medians. peak_tflops_per_gpu: the MFU denominator (H100 SXM bf16 dense: 989).
    gpu: the GPU the points run on (h100, h200: ``megatron_avar.plan.gpus``); before submitting, every point is
    planned as `avar plan` plans it, and a point that does not fit is not submitted but reported with the state
    DOES_NOT_FIT (None: no check). gpu_memory_gb: that GPU's memory in GB (1e9 bytes) when it is not the table's.
    plan_model: the published size (3b, 7b, 72b) to plan with when a point's model.hf_path has no config.json on
    the submitting machine. plan_image_fraction / plan_response_fraction: the shares of a row the plan assumes
    are image tokens and labelled (response) tokens (`avar plan --image-fraction / --response-fraction`): the
    vision encoder's activations and the output layer's logits grow with them.
    grid / points: see the module docstring.
    """

    out: str
    sft_config: str
    sft_overrides: list[str] = field(default_factory=list)
    script: str = "slurm/avar_sft_7b.sh"
    gpus_per_node: int = 8
    ranks_per_node: int | None = None
    max_concurrent: int = 4
    global_batch_per_dp: int | None = None
    warmup_steps: int = 2
    peak_tflops_per_gpu: float = 989.0
    gpu: str | None = None
    gpu_memory_gb: float | None = None
    plan_model: str | None = None
    plan_image_fraction: float = 0.5
    plan_response_fraction: float = 0.35
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    grid: GridConfig = field(default_factory=GridConfig)
    points: list = field(default_factory=list)  # list[PointSpec]; YAML mappings are converted and validated below

    def __post_init__(self):
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.ranks_per_node is None and self.gpus_per_node == 0:
            raise ValueError("ranks_per_node must be set when gpus_per_node is 0 (a CPU cluster)")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.max_concurrent < 1 or self.warmup_steps < 0 or not self.peak_tflops_per_gpu > 0:
            raise ValueError("max_concurrent must be >= 1, warmup_steps >= 0 and peak_tflops_per_gpu > 0")
        if self.global_batch_per_dp is not None and self.global_batch_per_dp < 1:
            raise ValueError(f"global_batch_per_dp must be >= 1 or null, got {self.global_batch_per_dp}")
        _check_overrides("sft_overrides", self.sft_overrides)
        from megatron_avar.plan.gpus import GPUS

        if self.gpu is not None and self.gpu.lower() not in GPUS:
            raise ValueError(f"gpu={self.gpu!r}: allowed {', '.join(GPUS)} (or null: no memory check)")
        if self.gpu is not None and self.gpus_per_node == 0:
            raise ValueError("gpu is set but gpus_per_node is 0 (a CPU cluster): set gpu: null")
        if self.gpu_memory_gb is not None and (self.gpu is None or not self.gpu_memory_gb > 0):
            raise ValueError(f"gpu_memory_gb={self.gpu_memory_gb} needs gpu set and a value > 0")
        if self.plan_model is not None:
            from megatron_avar.models.qwen2_5_vl.published import PUBLISHED

            if self.plan_model.lower() not in PUBLISHED:
                raise ValueError(f"plan_model={self.plan_model!r}: allowed {', '.join(PUBLISHED)} (published sizes)")
        specs = tuple(p if isinstance(p, PointSpec) else config_from_dict(PointSpec, p, f"points[{i}].")
                      for i, p in enumerate(self.points))
        object.__setattr__(self, "points", list(specs))  # validated once, here: dicts from YAML -> PointSpec
        if not self.grid.points() and not self.points:
            raise ValueError("the sweep has no points: enable grid or list points")

    @property
    def ranks(self) -> int:
        """Ranks per node (one per GPU unless ranks_per_node says otherwise)."""
        return self.ranks_per_node if self.ranks_per_node is not None else self.gpus_per_node

    def all_points(self) -> list[PointSpec]:
        """grid points, then explicit points, each once (first occurrence kept)."""
        seen, result = set(), []
        for point in self.grid.points() + self.points:
            key = repr(dataclasses.astuple(point))
            if key not in seen:
                seen.add(key)
                result.append(point)
        return result
