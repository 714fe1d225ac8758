"""The config of `avar sft`: every field documented, validated once. YAML files in examples/sft/ override it."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_avar.training.objective import AGTOConfig
from megatron_avar.training.sft_data import SFTDataConfig

__all__ = ["SFTConfig", "ModelConfig", "ParallelConfig", "OptimConfig", "TrainConfig", "CheckpointConfig",
           "LogConfig"]

PRECISIONS = ("fp32", "bf16")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelConfig:
    """hf_path: the HF Qwen2.5-VL checkpoint directory training starts from (weights, config, tokenizer and
    processor). role_attention_impl: role_attention implementation in the AVAR layers ("auto": Triton on
    GPU, blockwise on CPU)."""

    hf_path: str
    role_attention_impl: str = "auto"

    def __post_init__(self):
        if self.role_attention_impl not in ("auto", "blockwise", "triton", "reference"):
            raise ValueError(f"model.role_attention_impl={self.role_attention_impl!r}: allowed auto, blockwise, "
                             "triton, reference")


@dataclass(frozen=True)
class ParallelConfig:
    """tensor / pipeline model-parallel sizes; the data-parallel size is world_size / (tp * pp).
    distributed_optimizer: shard optimizer states over data-parallel ranks (megatron's ZeRO-1)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    distributed_optimizer: bool = True

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError("parallel.tensor_model_parallel_size and pipeline_model_parallel_size must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine schedule after linear warmup. lr: peak learning rate (paper: 5e-6); min_lr: the
    floor the cosine decays to; warmup_steps: linear warmup from 0; clip_grad: global grad-norm clip (0: off)."""

    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    clip_grad: float = 1.0

    def __post_init__(self):
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= lr, got {self.lr}, {self.min_lr}")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError("optim.warmup_steps and optim.clip_grad must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps to train; global_batch_size: packed rows per step over all data-parallel ranks
    (accumulated in micro-batches of data.micro_batch_size); precision: fp32 or bf16 (bf16 on GPU);
    recompute: activation recompute (none | selective | full); seed: parameter/dropout RNG seed."""

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
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"train.recompute={self.recompute!r}: allowed {', '.join(RECOMPUTE)}")


@dataclass(frozen=True)
class CheckpointConfig:
    """interval: save every N steps (0: only at the end and on SIGTERM/SIGUSR1); keep: how many checkpoints to
    keep (older ones are removed after a newer one is complete); resume: continue from the run directory's
    latest checkpoint when there is one."""

    interval: int = 100
    keep: int = 2
    resume: bool = True

    def __post_init__(self):
        if self.interval < 0 or self.keep < 1:
            raise ValueError("checkpoint.interval must be >= 0 and checkpoint.keep >= 1")


@dataclass(frozen=True)
class LogConfig:
    """interval: log every N steps; tensorboard: write event files under <out>/tensorboard; wandb_project:
    also log to Weights & Biases (needs `pip install wandb` and WANDB_API_KEY)."""

    interval: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError("log.interval must be >= 1")


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
