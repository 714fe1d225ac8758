"""The config of `avar sft`: every field documented, validated once. YAML files in examples/sft/ override it."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_avar.config import check_seed
from megatron_avar.training.config import (
    OPTIM_RESUME_FIXED,
    PRECISIONS,
    RECOMPUTE_MODES,
    CheckpointConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
)
from megatron_avar.training.objective import AGTOConfig
from megatron_avar.training.sft_data import SFTDataConfig

# The sections shared with `avar grpo` live in training/config.py; imported here, they are SFTConfig's too.
__all__ = ["SFTConfig", "TrainConfig", "RESUME_FIXED", "ModelConfig", "ParallelConfig", "OptimConfig",
           "CheckpointConfig", "LogConfig"]

RESUME_FIXED = OPTIM_RESUME_FIXED + ("train.steps",)


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps to train; global_batch_size: packed rows per step over all data-parallel ranks
    (accumulated in micro-batches of data.micro_batch_size); precision: fp32 or bf16 (bf16 on GPU);
    recompute: activation recompute (none | selective | full); seed: parameter/dropout RNG seed, 0 <= seed < 2**63."""

    steps: int = 100
    global_batch_size: int = 8
    precision: str = "bf16"
    recompute: str = "none"
    seed: int = 1234

    def __post_init__(self):
        if self.steps < 1 or self.global_batch_size < 1:
            raise ValueError("train.steps and train.global_batch_size must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}: allowed {', '.join(PRECISIONS)}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute={self.recompute!r}: allowed {', '.join(RECOMPUTE_MODES)}")
        check_seed(self.seed, "train.seed")


@dataclass(frozen=True)
class SFTConfig:
    """out: the run directory (resolved config, logs, TensorBoard, checkpoints under <out>/checkpoints)."""

    out: str
    model: ModelConfig
    data: SFTDataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    avar: AGTOConfig = field(default_factory=AGTOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        self.parallel.check_row_length(self.data.seq_length, field="data.seq_length")
        if self.parallel.context_parallel_size > 1 and self.model.mass_mode != "probe":
            raise ValueError(f"model.mass_mode={self.model.mass_mode} computes every row's masses in one kernel over "
                             "whole rows; with parallel.context_parallel_size > 1 use model.mass_mode=probe (the same "
                             "step, masses only for the rows the objective reads)")
