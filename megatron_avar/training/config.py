"""Config sections both trainers (`avar sft`, `avar grpo`) share: the model, the parallel layout, the optimizer
and its schedule, checkpoints and logging, with the resume rule. Every field documented, validated once; a
leaf of the config modules (no megatron import)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_avar.config import refuse_unused_setting
from megatron_avar.models.qwen2_5_vl.config import RECOMPUTE_MODES

__all__ = ["PRECISIONS", "RECOMPUTE_MODES", "OPTIM_RESUME_FIXED", "RESCHEDULABLE", "ModelConfig", "ParallelConfig",
           "OptimConfig", "CheckpointConfig", "LogConfig"]

PRECISIONS = ("fp32", "bf16")

# What a resumed run must keep unchanged: the restored learning-rate schedule (peak, floor, warmup, decay
# horizon = train.steps, weight decay), the optimizer's restored param groups (Adam's betas and eps) and RNG
# states (train.seed) carry the checkpoint's values and would silently override new ones. A resume with any of
# them changed is refused by name (``training.run_loop.plan_start``), as is a change of what the optimizer state
# was written as (train.precision: fp32 main weights beside bf16 ones or not; parallel.distributed_optimizer:
# states sharded or whole), which megatron cannot read otherwise. optim.clip_grad is not restored: a new value
# applies.
OPTIM_RESUME_FIXED = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.adam_beta1",
                      "optim.adam_beta2", "optim.adam_eps", "train.seed", "train.precision",
                      "parallel.distributed_optimizer")
# What a resume may change with checkpoint.reschedule=true: the learning-rate schedule and its horizon (a run given
# more steps). The restored scheduler keeps its step count and follows this config's schedule from there.
RESCHEDULABLE = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "train.steps")


@dataclass(frozen=True)
class ModelConfig:
    """hf_path: the HF Qwen2.5-VL checkpoint directory training starts from (weights, config, tokenizer and
    processor). role_attention_impl: kernel family of every decoder layer's attention ("auto": Triton on GPU,
    the CPU path otherwise; "blockwise", "triton", "reference"); with "auto" the output of every layer that
    runs no fused kernel (standard layers, and AVAR layers in probe mode) comes from SDPA per sample
    (FlashAttention-2 on GPUs, bf16/fp16) where ``ops.causal_attention`` says it pays, and "triton" keeps it
    on our Triton kernel too. mass_mode: how AVAR layers get their masses — "probe"
    (default: the fastest plain attention for the output, masses only for the rows the objective reads) or
    "fused" (one kernel computes the output and every row's masses); both give the same step."""

    hf_path: str
    role_attention_impl: str = "auto"
    mass_mode: str = "probe"

    def __post_init__(self):
        if self.role_attention_impl not in ("auto", "blockwise", "triton", "reference"):
            raise ValueError(f"model.role_attention_impl={self.role_attention_impl!r}: allowed auto, blockwise, "
                             "triton, reference")
        if self.mass_mode not in ("probe", "fused"):
            raise ValueError(f"model.mass_mode={self.mass_mode!r}: allowed probe, fused")


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks share the work; the data-parallel size is world_size / (tp * pp * cp).

    tensor_model_parallel_size / pipeline_model_parallel_size: megatron's tensor and pipeline parallel sizes.
    virtual_pipeline_model_parallel_size: model chunks per pipeline rank (megatron's interleaved 1F1B schedule:
        rank r holds decoder layer blocks r, r + pp, ...; the pipeline bubble shrinks by this factor). Needs pp > 1,
        a layer count divisible by pp x this, and micro-batches per step a multiple of pp. 1: plain 1F1B.
    sequence_parallel: megatron's sequence parallelism (needs tp > 1): between the tensor-parallel regions
        (norms, residual stream) every rank holds 1/tp of each row, in the language model and the vision encoder,
        which divides that activation memory by tp; attention and the AVAR masses still see every token. Rows
        must hold a multiple of tp tokens.
    context_parallel_size: split every row over this many ranks (long packed rows): the row is cut into 2 x cp
        equal chunks and rank r holds chunks r and 2 cp - 1 - r (megatron's causal load balancing), which divides
        the language model's activation memory by cp. Every attention layer gathers the row's keys and values over
        the context-parallel group, so attention, the AVAR masses and the AGTO terms are exact; each rank encodes
        1/cp of the images (the features are all-gathered). Rows must hold a multiple of 2 x cp tokens (2 x cp x
        tp with sequence_parallel). Needs model.mass_mode=probe. In ``avar grpo`` the CP ranks train on the same
        rollouts; each generates a share of the prompts and they all-gather the rollouts.
    distributed_optimizer: shard optimizer states over data-parallel (and context-parallel) ranks (megatron's
        ZeRO-1).
    overlap_grad_reduce: reduce the gradients bucket by bucket while the backward pass still runs (the last
        micro-batch's), instead of all at once after it. Same result; on by default.
    overlap_param_gather: with the distributed optimizer, all-gather the updated weights bucket by bucket during
        the next forward pass instead of right after the update. Same result; on by default with
        overlap_grad_reduce and the distributed optimizer.
    ddp_bucket_size: parameters per gradient bucket when overlapping (null: megatron's max(40M, 1M x DP)); without
        overlap_grad_reduce megatron makes one bucket per buffer, so a size is refused there. The optimizer state
        of a checkpoint is stored per bucket: a resume needs the bucket layout it was written with (a change is
        refused by name)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    ddp_bucket_size: int | None = None

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError("parallel.tensor_model_parallel_size and pipeline_model_parallel_size must be >= 1")
        if self.context_parallel_size < 1:
            raise ValueError(f"parallel.context_parallel_size must be >= 1, got {self.context_parallel_size}")
        if self.virtual_pipeline_model_parallel_size < 1:
            raise ValueError("parallel.virtual_pipeline_model_parallel_size must be >= 1")
        if self.virtual_pipeline_model_parallel_size > 1 and self.pipeline_model_parallel_size == 1:
            raise ValueError("parallel.virtual_pipeline_model_parallel_size > 1 interleaves pipeline stages: it needs "
                             "parallel.pipeline_model_parallel_size > 1")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel=true splits rows over tensor-parallel ranks: it needs "
                             "parallel.tensor_model_parallel_size > 1")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ValueError(f"parallel.ddp_bucket_size must be >= 1 (or null), got {self.ddp_bucket_size}")
        refuse_unused_setting(self, "parallel.ddp_bucket_size", used=self.overlap_grad_reduce,
                              here="parallel.overlap_grad_reduce=false", only_with="parallel.overlap_grad_reduce=true",
                              why="without it megatron makes one gradient bucket per buffer")

    @property
    def row_multiple(self) -> int:
        """What every row's token count must be a multiple of: 2 x cp load-balanced chunks under context
        parallelism, and each rank's part split over the tp ranks under sequence parallelism."""
        chunks = 2 * self.context_parallel_size if self.context_parallel_size > 1 else 1
        return chunks * (self.tensor_model_parallel_size if self.sequence_parallel else 1)

    def check_row_length(self, tokens: int, *, field: str) -> None:
        """Refuse a row length (config field ``field``) the layout cannot split (``row_multiple``)."""
        multiple = self.row_multiple
        if tokens % multiple:
            why = []
            if self.context_parallel_size > 1:
                why.append(f"context_parallel_size={self.context_parallel_size} cuts each row into "
                           f"{2 * self.context_parallel_size} equal chunks")
            if self.sequence_parallel:
                why.append(f"sequence_parallel splits {'each chunk' if why else 'each row'} over "
                           f"tensor_model_parallel_size={self.tensor_model_parallel_size} ranks")
            raise ValueError(f"{field} ({tokens}) must be a multiple of {multiple}: parallel.{' and '.join(why)}")

    @property
    def param_gather_overlapped(self) -> bool:
        """Whether the updated weights reach the model only during the next forward pass (megatron's
        overlap_param_gather: it needs the distributed optimizer and overlap_grad_reduce)."""
        return self.overlap_param_gather and self.overlap_grad_reduce and self.distributed_optimizer


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a cosine schedule after linear warmup. lr: peak learning rate (paper: 5e-6); min_lr: the
    floor the cosine decays to; warmup_steps: linear warmup from 0; clip_grad: global grad-norm clip (0: off).

    Every number must be finite: an infinite or NaN setting is not an error of the first step's loss but of
    every update after it (``optim.lr=.inf`` turns the weights into NaN while the step still "succeeds")."""

    lr: float = 5e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    clip_grad: float = 1.0

    def __post_init__(self):
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"optim.{name} must be a finite number, got {value}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr = {self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or not self.adam_eps > 0:
            raise ValueError(f"optim.weight_decay must be >= 0 and optim.adam_eps > 0, got {self.weight_decay}, "
                             f"{self.adam_eps}")
        # beta2 = 1 divides by Adam's bias correction 1 - beta2^t = 0.
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError(f"optim.adam_beta1 and optim.adam_beta2 must be in [0, 1), got {self.adam_beta1}, "
                             f"{self.adam_beta2}")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise ValueError("optim.warmup_steps and optim.clip_grad must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    """interval: save every N steps (0: only at the end and on SIGTERM/SIGUSR1); keep: how many checkpoints to
    keep (older ones are removed after a newer one is complete); resume: continue from the run directory's
    latest checkpoint when there is one; overwrite: with resume=false, consent to start over in a run directory
    that holds checkpoints of an earlier run: its checkpoints, metrics, summary and W&B run record are removed
    before the new run writes anything (without it such a directory is refused, never mixed with the new run's
    checkpoints; see ``training.run_loop.plan_start``); accept_data_change: resume even though the data differ from the
    checkpoint's (their fingerprint: record ids, messages, image names relative to their common folder, sizes
    and dimensions — moving the data or touching files does not change it). The position (epoch, row / step)
    is kept and applied to the new data, so the steps after the resume are not those of an unchanged run. With
    resume=false nothing resumes: accept_data_change=true is refused there. reschedule: resume with this config's
    learning-rate schedule (``RESCHEDULABLE``: optim.lr, optim.min_lr, optim.warmup_steps, optim.weight_decay and
    train.steps, e.g. a run given more steps) instead of refusing it: the restored scheduler keeps its step count
    and follows the new schedule from the resumed step on (megatron's override of the checkpoint's scheduler), so
    the learning rate may jump there; the run prints the old and new values. Adam's betas and eps, the seed, the
    precision and the optimizer sharding stay fixed."""

    interval: int = 100
    keep: int = 2
    resume: bool = True
    overwrite: bool = False
    accept_data_change: bool = False
    reschedule: bool = False

    def __post_init__(self):
        if self.interval < 0 or self.keep < 1:
            raise ValueError("checkpoint.interval must be >= 0 and checkpoint.keep >= 1")
        if self.overwrite and self.resume:
            raise ValueError("checkpoint.overwrite=true starts the run over, which contradicts checkpoint.resume=true "
                             "(the default): pass checkpoint.resume=false with it, or drop checkpoint.overwrite to "
                             "resume")
        refuse_unused_setting(self, "checkpoint.accept_data_change", used=self.resume, here="checkpoint.resume=false",
                              only_with="checkpoint.resume=true", why="when a resume meets changed data")
        refuse_unused_setting(self, "checkpoint.reschedule", used=self.resume, here="checkpoint.resume=false",
                              only_with="checkpoint.resume=true", why="when a resume changes the schedule")


@dataclass(frozen=True)
class LogConfig:
    """interval: log every N steps; tensorboard: write event files under <out>/tensorboard; wandb_project:
    also log to Weights & Biases (needs `pip install wandb` and WANDB_API_KEY), one W&B run per run directory: its
    id is recorded in <out>/wandb_run.json and every resumed segment continues it."""

    interval: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError("log.interval must be >= 1")
