"""The config of `avar grpo`: every field documented, validated once. YAML files in examples/grpo/ override it.

Model, parallel layout, optimizer, checkpoint and logging sections are SFT's (``sft.config``); the GRPO
sections are the rollout (how responses are sampled), the reward (``grpo.rewards.RewardConfig``), the
advantage, the policy loss (``grpo.loss.PolicyLossConfig``) and the step shape (:class:`GRPOTrainConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_avar.config import SEED_LIMIT, VLLM_SEED_LIMIT, check_seed, refuse_unused_setting
from megatron_avar.grpo.advantages import ADVANTAGE_MODES
from megatron_avar.grpo.backends import backend_names, backends_reading
from megatron_avar.grpo.loss import PolicyLossConfig
from megatron_avar.grpo.prompts import GRPODataConfig
from megatron_avar.grpo.rewards import RewardConfig
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

__all__ = ["GRPOConfig", "RolloutConfig", "AdvantageConfig", "GRPOTrainConfig", "RESUME_FIXED"]

# What a resumed run must keep unchanged (see sft.config): the schedule's horizon here is
# train.steps * train.updates_per_step optimizer steps.
RESUME_FIXED = OPTIM_RESUME_FIXED + ("train.steps", "train.updates_per_step")


@dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled.

    backend: "local" (Hugging Face Qwen2.5-VL with a KV cache in the trainer's processes, weights refit in
        memory every step; CPU and small GPU runs) or "vllm" (GPU; colocated with the actor, sleeping while
        it trains). n: rollouts per prompt (the GRPO group; paper: 8). temperature / top_p / top_k (0 =
        off) / max_new_tokens: sampling; log-probs on both sides are of softmax(logits / temperature).
    seed: the sampling seed (0 <= seed < 2**63; vLLM: < 2**32); step s samples with seed + s, so a resumed run draws
    the same rollouts.
    batch_size: local backend, rows per generate call. vllm_gpu_memory_utilization: the fraction of GPU
    memory vLLM may take while awake. vllm_enable_sleep: release vLLM's weights and KV cache during the
    policy update (colocated runs need it unless the GPU holds both). A backend's own fields (these three) set
    away from their defaults with another backend are refused: the run would ignore them (``grpo.backends``
    declares which backend reads which). vLLM samples in bf16 whatever
    train.precision says; the local backend samples in the training precision (bf16 on a GPU). Either way the
    update's old log-probs are the trainer's own forward pass, in its precision.
    """

    backend: str = "local"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 2048
    seed: int = 0
    batch_size: int = 8
    vllm_gpu_memory_utilization: float = 0.5
    vllm_enable_sleep: bool = True

    def __post_init__(self):
        if self.backend not in backend_names():  # the registry of grpo.backends
            raise ValueError(f"rollout.backend={self.backend!r}: allowed {', '.join(backend_names())}")
        if not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"rollout.n must be an integer >= 2 (a GRPO group compares rollouts of one prompt), "
                             f"got {self.n!r}")
        if not 0 < self.temperature < math.inf or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("rollout needs a finite temperature > 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1; "
                             f"got {self.temperature}, {self.top_p}, {self.top_k}, {self.max_new_tokens}")
        check_seed(self.seed, "rollout.seed", limit=VLLM_SEED_LIMIT if self.backend == "vllm" else SEED_LIMIT,
                   where=f" with rollout.backend={self.backend}")  # (vLLM seeds numpy; the local backend hashes it)
        if self.batch_size < 1:
            raise ValueError(f"rollout.batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ValueError(f"rollout.vllm_gpu_memory_utilization must be in (0, 1), got "
                             f"{self.vllm_gpu_memory_utilization}")
        for name, readers in backends_reading().items():
            refuse_unused_setting(self, f"rollout.{name}", used=self.backend in readers,
                                  here=f"rollout.backend={self.backend}",
                                  only_with=" or ".join(f"rollout.backend={reader}" for reader in readers))


@dataclass(frozen=True)
class AdvantageConfig:
    """mode: "grpo" ((r − mean) / (std + eps) within a prompt's group) or "dr_grpo" (r − mean);
    eps: the std guard (> 0; mode "grpo" only, refused away from its default with "dr_grpo", which would ignore it).
    See ``grpo.advantages``."""

    mode: str = "grpo"
    eps: float = 1e-6

    def __post_init__(self):
        if self.mode not in ADVANTAGE_MODES:
            raise ValueError(f"advantage.mode={self.mode!r}: allowed {', '.join(ADVANTAGE_MODES)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"advantage.eps must be a finite number > 0, got {self.eps}")
        refuse_unused_setting(self, "advantage.eps", used=self.mode == "grpo", here=f"advantage.mode={self.mode}",
                              only_with="advantage.mode=grpo", why="it divides by the group's std + eps")


@dataclass(frozen=True)
class GRPOTrainConfig:
    """steps: GRPO steps (each: generate, score, update). prompts_per_step: prompts over all data-parallel
    ranks per step (paper: 256; rollouts = prompts_per_step * rollout.n). updates_per_step: optimizer steps
    per rollout batch, each on an equal share of the prompts' groups (1 = on-policy; >1 reuses the rollouts
    with the clipped ratio). seq_length: tokens per packed row of the policy's forward passes (rollouts of
    up to max_prompt_length + max_new_tokens tokens are packed whole; default 0 = that sum rounded up to a
    multiple of what the layout splits rows by, ``ParallelConfig.row_multiple``; also vLLM's max_model_len).
    precision, recompute, seed: as in SFT (0 <= seed < 2**63).
    """

    steps: int = 100
    prompts_per_step: int = 256
    updates_per_step: int = 1
    seq_length: int = 0
    precision: str = "bf16"
    recompute: str = "none"
    seed: int = 1234

    def __post_init__(self):
        if self.steps < 1 or self.prompts_per_step < 1 or self.updates_per_step < 1 or self.seq_length < 0:
            raise ValueError("train.steps, train.prompts_per_step and train.updates_per_step must be >= 1, "
                             "train.seq_length >= 0")
        if self.prompts_per_step % self.updates_per_step:
            raise ValueError(f"train.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                             f"train.updates_per_step ({self.updates_per_step})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}: allowed {', '.join(PRECISIONS)}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"train.recompute={self.recompute!r}: allowed {', '.join(RECOMPUTE_MODES)}")
        check_seed(self.seed, "train.seed")


@dataclass(frozen=True)
class GRPOConfig:
    """out: the run directory (resolved config, metrics, TensorBoard, checkpoints under <out>/checkpoints).
    model.hf_path: the HF checkpoint the actor starts from (an exported AVAR SFT checkpoint); with
    loss.kl_coef > 0 it is also the frozen reference policy (a second copy of the weights, no optimizer)."""

    out: str
    model: ModelConfig
    data: GRPODataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    train: GRPOTrainConfig = field(default_factory=GRPOTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.loss.aggregation == "sequence_sum_norm" and self.loss.max_len != self.rollout.max_new_tokens:
            raise ValueError(f"loss.aggregation=sequence_sum_norm normalises by the response budget: set "
                             f"loss.max_len={self.rollout.max_new_tokens} (rollout.max_new_tokens)")
        if self.train.seq_length and self.train.seq_length < self.data.max_prompt_length + self.rollout.max_new_tokens:
            raise ValueError(f"train.seq_length ({self.train.seq_length}) must hold the longest rollout: "
                             f"data.max_prompt_length + rollout.max_new_tokens = "
                             f"{self.data.max_prompt_length + self.rollout.max_new_tokens} (or 0 for that sum)")
        if self.parallel.virtual_pipeline_model_parallel_size > 1:
            raise ValueError("parallel.virtual_pipeline_model_parallel_size > 1 is for avar sft: megatron's "
                             "interleaved schedule needs a number of micro-batches that fits the pipeline (a multiple "
                             "of pipeline_model_parallel_size), and a GRPO step has as many as its rollouts fill "
                             "rows; use 1 (the plain 1F1B schedule)")
        if self.train.seq_length:
            self.parallel.check_row_length(self.train.seq_length, field="train.seq_length")
        if self.parallel.context_parallel_size > 1 and self.model.mass_mode != "probe":
            raise ValueError(f"model.mass_mode={self.model.mass_mode} computes every row's masses in one kernel over "
                             "whole rows; with parallel.context_parallel_size > 1 use model.mass_mode=probe")
        if self.rollout.backend == "vllm":
            self._check_vllm()

    def _check_vllm(self) -> None:
        """What the vLLM backend cannot run, refused with the config (and by `avar plan`), not at the first
        rollout after minutes of start-up."""
        from megatron_avar.grpo.vllm_requests import check_vllm_sampling

        if self.parallel.pipeline_model_parallel_size != 1:
            raise ValueError("rollout.backend=vllm runs vLLM with the trainer's tensor parallelism and needs "
                             "parallel.pipeline_model_parallel_size=1")
        check_vllm_sampling(temperature=self.rollout.temperature, top_p=self.rollout.top_p, top_k=self.rollout.top_k,
                            prefix="rollout.")

    @property
    def seq_length(self) -> int:
        """Tokens per packed row of the policy's forward passes (train.seq_length, or the longest rollout rounded
        up to what the layout splits rows by: ``ParallelConfig.row_multiple``)."""
        if self.train.seq_length:
            return self.train.seq_length
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        multiple = self.parallel.row_multiple
        return -(-longest // multiple) * multiple
