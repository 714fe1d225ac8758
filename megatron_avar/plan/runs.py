"""The plan of an `avar sft` or `avar grpo` run: its config turned into a layout and a step shape, the memory of
every stage (``plan.memory``), the step's FLOPs and time at a stated MFU, and a verdict per GPU (``plan.gpus``).

What a config does not say is an :class:`Assumptions` field, printed with every plan: the world size, the share of
a row that is image tokens, the mean packed sample length (attention FLOPs, GRPO's rows), the AGTO query rows,
the labelled share of an SFT row (the output layer runs on those positions only) and the MFU. FLOPs are the
trainer's own formula (``training.metrics.training_flops``) over full rows.

GRPO, per step: the update is an SFT-like step over the rollouts (one row per micro-batch, the response loss),
the old-log-prob pass and the reference pass (``loss.kl_coef > 0``) are forward passes over the same rows, and
generation is not timed. Memory: the reference model is a second copy of the weights (frozen: no DDP wrapper,
no gradient buffer, ``training.megatron_setup.build_model(trainable=False)``); a colocated vLLM engine
sleeps during the update (weights to host memory, KV cache freed; :data:`VLLM_ASLEEP_BYTES` assumed left on
the GPU) and takes ``rollout.vllm_gpu_memory_utilization`` of the card while it generates, next to the trainer's
weights, gradients and optimizer states; the local backend keeps a full Hugging Face copy of the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from megatron_avar.plan.gpus import GPU, GPUS, Verdict, verdict
from megatron_avar.plan.memory import KERNELS, MemoryPlan, Parallelism, StepShape, memory_plan, stage_parameters

__all__ = ["Assumptions", "RunPlan", "plan_sft", "plan_grpo", "plan_config", "load_model_config", "detect_command",
           "microbatch_row_counts", "VLLM_ASLEEP_BYTES"]

# What a sleeping vLLM engine keeps on the GPU (CUDA-graph pool, sampler buffers): an assumption, not measured.
VLLM_ASLEEP_BYTES = 10**9
GRPO_SECTIONS = ("rollout", "reward", "advantage", "loss")


@dataclass(frozen=True)
class Assumptions:
    """gpus: ranks of the job (None: the smallest multiple of tp x pp that fills an 8-GPU node). image_fraction:
    share of a row's tokens that are image tokens (4 vision patches each). sample_tokens: mean tokens per packed
    sample (None: min(2048, seq_length) for SFT; the longest rollout, prompt + response, for GRPO).
    query_fraction: share of a row that AGTO reads masses of (user text after the image). response_fraction: share
    of an SFT row's tokens that are labelled (the responses: the output layer and the LM loss run on these only;
    GRPO's are its rollouts' responses). mfu: the model FLOPs utilisation the step time is predicted at. kernels:
    the kernel family (``plan.memory.KERNELS``): "gpu" (with or without Transformer Engine) or "cpu"."""

    gpus: int | None = None
    image_fraction: float = 0.5
    sample_tokens: int | None = None
    query_fraction: float = 0.1
    response_fraction: float = 0.35
    mfu: float = 0.4
    kernels: str = "gpu"

    def __post_init__(self):
        if self.gpus is not None and self.gpus < 1:
            raise ValueError(f"gpus must be >= 1, got {self.gpus}")
        for name in ("image_fraction", "query_fraction", "response_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.sample_tokens is not None and self.sample_tokens < 1:
            raise ValueError(f"sample_tokens must be >= 1, got {self.sample_tokens}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r}: allowed {', '.join(KERNELS)}")


def microbatch_row_counts(microbatch, *, image_token_id: int, exclude_sink: bool) -> tuple[int, int, int]:
    """(image tokens, AGTO query rows, labelled tokens) of one row of an SFT micro-batch (``training.sft_data``):
    the row with the most image and labelled tokens, the two shares the plan's memory grows with. What a plan is
    told about a measured step's rows (``Assumptions.image_fraction`` / ``query_fraction`` / ``response_fraction``
    = these / seq_length)."""
    import torch

    from megatron_avar.roles import IGNORE_INDEX
    from megatron_avar.training.objective import QuerySets

    queries = QuerySets(microbatch.roles, microbatch.segment_ids, exclude_sink=exclude_sink)
    rows, seq = microbatch.input_ids.shape
    image = (microbatch.input_ids == image_token_id).sum(1)
    labelled = (microbatch.labels != IGNORE_INDEX).sum(1)
    query = torch.bincount(queries.q_index // seq, minlength=rows)
    row = int(torch.argmax(image + labelled))
    return int(image[row]), int(query[row]), int(labelled[row])


@dataclass(frozen=True)
class RunPlan:
    """command: "sft" or "grpo"; model: where the dimensions came from; parameters: the model's total.
    flops_per_step: model FLOPs of one step over the world (``training_flops``; GRPO: update + forward passes).
    GRPO: rollout_engine ("vllm" / "local"); rollout_peak: bytes the trainer holds while the engine generates;
    engine_fraction: the share of the card a vLLM engine takes awake; engine_sleeps: whether it gives it back
    during the update; refit_peak: bytes during the weight refit (trainer, its gathered weights, and a vLLM
    engine's weights, awake without their KV cache)."""

    command: str
    model: str
    parameters: int
    parallel: Parallelism
    shape: StepShape
    memory: MemoryPlan
    flops_per_step: float
    assumptions: Assumptions
    sample_tokens: int
    rollout_engine: str | None = None
    rollout_peak: int | None = None
    engine_fraction: float = 0.0
    engine_sleeps: bool = True
    refit_peak: int | None = None

    def step_seconds(self, gpu: GPU) -> float:
        """The step time at ``assumptions.mfu`` on ``gpu`` (GRPO: without generation)."""
        peak = gpu.peak_tflops[self.shape.precision] * 1e12
        return self.flops_per_step / (self.parallel.world_size * peak * self.assumptions.mfu)

    def verdicts(self, gpus: tuple[GPU, ...] | None = None) -> list[Verdict]:
        """The verdict on each of ``gpus`` (default: every GPU of ``plan.gpus.GPUS``)."""
        return [verdict(gpu, self.memory.peak, rollout_peak=self.rollout_peak, engine_fraction=self.engine_fraction,
                        engine_sleeps=self.engine_sleeps, refit_peak=self.refit_peak,
                        step_seconds=self.step_seconds(gpu))
                for gpu in gpus or GPUS.values()]

    def as_dict(self, gpus: tuple[GPU, ...] | None = None) -> dict:
        return {"command": self.command, "model": self.model, "parameters": self.parameters,
                "parallel": dataclasses.asdict(self.parallel), "step": dataclasses.asdict(self.shape),
                "assumptions": dataclasses.asdict(self.assumptions), "sample_tokens": self.sample_tokens,
                "flops_per_step": self.flops_per_step, "memory": self.memory.as_dict(),
                "rollout": {"engine": self.rollout_engine, "trainer_bytes": self.rollout_peak,
                            "engine_fraction": self.engine_fraction, "engine_sleeps": self.engine_sleeps,
                            "refit_bytes": self.refit_peak},
                "verdicts": [v.as_dict() for v in self.verdicts(gpus)]}


def load_model_config(hf_path: str, preset: str | None):
    """``Qwen25VLConfig`` from ``hf_path``/config.json when it exists here, else from the published ``preset``
    (3b / 7b / 72b); returns (config, where it came from)."""
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.published import PUBLISHED

    if preset is not None and preset.lower() not in PUBLISHED:  # (checked even where config.json decides)
        raise ValueError(f"--model {preset!r}: allowed {', '.join(PUBLISHED)}")
    config_json = Path(hf_path) / "config.json"
    if config_json.is_file():
        return Qwen25VLConfig.from_hf(config_json), str(config_json)
    if preset is None:
        raise ValueError(f"model.hf_path={hf_path} has no config.json on this machine: pass --model "
                         f"{'|'.join(PUBLISHED)} to plan with a published Qwen2.5-VL size")
    return Qwen25VLConfig.from_hf(PUBLISHED[preset.lower()]), f"published Qwen2.5-VL-{preset.upper()} config"


def _layout(parallel_config, gpus: int | None) -> Parallelism:
    tp, pp = parallel_config.tensor_model_parallel_size, parallel_config.pipeline_model_parallel_size
    cp = parallel_config.context_parallel_size
    model_parallel = tp * pp * cp
    world = gpus if gpus is not None else model_parallel * math.ceil(8 / model_parallel)
    if world % model_parallel:
        raise ValueError(f"--gpus {world} is not a multiple of tensor x pipeline x context parallel size = "
                         f"{model_parallel}")
    return Parallelism(tp=tp, pp=pp, dp=world // model_parallel, cp=cp,
                       sequence_parallel=parallel_config.sequence_parallel,
                       virtual_pipeline=parallel_config.virtual_pipeline_model_parallel_size,
                       distributed_optimizer=parallel_config.distributed_optimizer)


def _flops(qwen_config, *, samples: int, sample_tokens: int, patches: int, output_tokens: int) -> float:
    """training_flops of ``samples`` packed samples of ``sample_tokens`` tokens, each with one image of
    ``patches // samples`` patches (the planned rows' image tokens, at the assumed image fraction), given as copies
    of one sample: a list of them held billions of items at seq_length=1e12 (a MemoryError)."""
    from megatron_avar.training.metrics import training_flops

    return training_flops(qwen_config, sample_lengths=[sample_tokens], image_patches=[patches // samples] if samples
                          else [], output_tokens=output_tokens, copies=samples)


def _check_sample_tokens(assumptions: Assumptions, seq: int, row_length: str) -> None:
    """ValueError for an assumed sample longer than the run's rows: a packed sample lies within one row, and planning
    with a shorter one than asked for would be a plan of other samples than the ones stated."""
    if assumptions.sample_tokens is not None and assumptions.sample_tokens > seq:
        raise ValueError(f"--sample-tokens {assumptions.sample_tokens} exceeds the run's rows of {seq} tokens "
                         f"({row_length}): a packed sample lies within one row; give at most {seq}")


def _total_parameters(qwen_config) -> int:
    return stage_parameters(qwen_config, Parallelism(), 0)[0]


def plan_sft(config, qwen_config, model: str, assumptions: Assumptions = Assumptions()) -> RunPlan:
    """The plan of `avar sft` with ``config`` (``SFTConfig``) on a model of ``qwen_config``."""
    parallel = _layout(config.parallel, assumptions.gpus)
    qwen_config.check_layout(tp=parallel.tp, pp=parallel.pp, vpp=parallel.virtual_pipeline)
    data, train = config.data, config.train
    if train.global_batch_size % (parallel.dp * data.micro_batch_size):
        raise ValueError(f"train.global_batch_size={train.global_batch_size} does not split into micro-batches of "
                         f"data.micro_batch_size={data.micro_batch_size} over the {parallel.dp} data-parallel "
                         f"replicas of {parallel.world_size} GPUs")
    microbatches = train.global_batch_size // parallel.dp // data.micro_batch_size
    if parallel.virtual_pipeline > 1 and microbatches % parallel.pp:
        raise ValueError(f"the interleaved pipeline schedule runs micro-batches in groups of "
                         f"pipeline_model_parallel_size={parallel.pp}, but a step has {microbatches} per "
                         f"data-parallel rank: make it a multiple of {parallel.pp}")
    seq = data.seq_length
    _check_sample_tokens(assumptions, seq, "data.seq_length")
    if assumptions.image_fraction + assumptions.response_fraction > 1:
        raise ValueError(f"image fraction {assumptions.image_fraction:g} + response fraction "
                         f"{assumptions.response_fraction:g} exceed 1: image tokens are never labelled, so the two "
                         "shares of an SFT row add up to at most 1 (lower --response-fraction)")
    image_tokens = round(assumptions.image_fraction * seq)
    agto_trains = config.avar.alpha > 0 or config.avar.beta > 0
    shape = StepShape(seq_length=seq, micro_batch_size=data.micro_batch_size,
                      num_microbatches=microbatches,
                      image_tokens=image_tokens,
                      mass_rows=round(assumptions.query_fraction * seq) if agto_trains else 0,
                      loss="lm", loss_rows=round(assumptions.response_fraction * seq),
                      precision=train.precision, recompute=train.recompute,
                      avar_layers=config.avar.layer_indexes(qwen_config.text.num_layers))
    memory = memory_plan(qwen_config, parallel, shape, kernels=KERNELS[assumptions.kernels])
    sample_tokens = min(assumptions.sample_tokens or 2048, seq)  # (the default only: a longer one is refused)
    rows = train.global_batch_size
    merge = qwen_config.vision.spatial_merge_size ** 2
    flops = _flops(qwen_config, samples=rows * seq // sample_tokens, sample_tokens=sample_tokens,
                   patches=rows * image_tokens * merge, output_tokens=rows * shape.output_rows)
    return RunPlan(command="sft", model=model, parameters=_total_parameters(qwen_config), parallel=parallel,
                   shape=shape, memory=memory, flops_per_step=flops, assumptions=assumptions,
                   sample_tokens=sample_tokens)


def plan_grpo(config, qwen_config, model: str, assumptions: Assumptions = Assumptions()) -> RunPlan:
    """The plan of `avar grpo` with ``config`` (``GRPOConfig``) on a model of ``qwen_config``."""
    parallel = _layout(config.parallel, assumptions.gpus)
    qwen_config.check_layout(tp=parallel.tp, pp=parallel.pp)
    train, rollout = config.train, config.rollout
    seq = config.seq_length
    per_update = train.prompts_per_step // train.updates_per_step
    if per_update % parallel.dp:
        raise ValueError(f"train.prompts_per_step / updates_per_step = {per_update} prompts do not split over the "
                         f"{parallel.dp} data-parallel replicas of {parallel.world_size} GPUs")
    _check_sample_tokens(assumptions, seq, "train.seq_length" if train.seq_length else
                         "data.max_prompt_length + rollout.max_new_tokens, rounded up")
    # (within a row: GRPOConfig refuses a train.seq_length shorter than the longest rollout)
    sample_tokens = assumptions.sample_tokens or config.data.max_prompt_length + rollout.max_new_tokens
    rollouts_per_rank = per_update // parallel.dp * rollout.n
    rows = math.ceil(rollouts_per_rank * sample_tokens / seq)
    image_tokens = round(assumptions.image_fraction * seq)
    layers = config.reward.layer_indexes(qwen_config.text.num_layers)
    shape = StepShape(seq_length=seq, micro_batch_size=1, num_microbatches=rows, image_tokens=image_tokens,
                      mass_rows=0, loss="response", loss_rows=seq - image_tokens, precision=train.precision,
                      recompute=train.recompute, avar_layers=layers)
    value = shape.bytes_per_value
    params = max(stage_parameters(qwen_config, parallel, s)[0] for s in range(parallel.pp))
    total = _total_parameters(qwen_config)
    extra = {}
    if config.loss.kl_coef > 0:
        extra["reference_model"] = params * value
    vllm = rollout.backend == "vllm"
    if vllm and rollout.vllm_enable_sleep:
        extra["rollout_engine_asleep"] = VLLM_ASLEEP_BYTES
    elif not vllm:
        extra["rollout_model_copy"] = total * value
    memory = memory_plan(qwen_config, parallel, shape, kernels=KERNELS[assumptions.kernels], extra_static=extra)
    # While the engine generates it is awake (its share, not its sleeping remainder, is beside the trainer).
    trainer_static = sum(memory.worst.static.values()) + extra.get("reference_model", 0) + extra.get(
        "rollout_model_copy", 0)
    # The refit, beside the trainer: the policy's weights gathered over TP (one tensor at a time, with its HF
    # pieces, under PP=1; a stage's whole copy under PP) and a vLLM engine's TP shard of the weights (awake, its
    # KV cache not yet), besides what the sleeping engine keeps.
    whole = [stage_parameters(qwen_config, Parallelism(pp=parallel.pp, virtual_pipeline=parallel.virtual_pipeline), s)
             for s in range(parallel.pp)]
    gathered = 2 * max(largest for _, largest in whole) if parallel.pp == 1 else max(count for count, _ in whole)
    refit_peak = (trainer_static + gathered * value + extra.get("rollout_engine_asleep", 0)
                  + (total * value // parallel.tp if vllm else 0))
    if vllm:
        rollout_peak = trainer_static
    else:  # the local backend generates with the HF copy: + a KV cache of batch_size rollouts, last-position logits
        text = qwen_config.text
        kv = rollout.batch_size * seq * 2 * text.num_layers * text.num_query_groups * text.head_dim * value
        rollout_peak = trainer_static + kv + rollout.batch_size * text.vocab_size * 4
    samples = rollouts_per_rank * parallel.dp * train.updates_per_step
    merge = qwen_config.vision.spatial_merge_size ** 2
    update = _flops(qwen_config, samples=samples, sample_tokens=sample_tokens,
                    patches=samples * round(assumptions.image_fraction * sample_tokens) * merge,
                    output_tokens=samples * min(rollout.max_new_tokens, sample_tokens))
    forward_passes = 1 + (config.loss.kl_coef > 0)  # old log-probs (+ the reference's): a third of fwd + bwd each
    return RunPlan(command="grpo", model=model, parameters=total, parallel=parallel, shape=shape, memory=memory,
                   flops_per_step=update * (1 + forward_passes / 3), assumptions=assumptions,
                   sample_tokens=sample_tokens, rollout_engine=rollout.backend, rollout_peak=rollout_peak,
                   engine_fraction=rollout.vllm_gpu_memory_utilization if vllm else 0.0,
                   engine_sleeps=not vllm or rollout.vllm_enable_sleep, refit_peak=refit_peak)


def detect_command(config_path: str | None, overrides: list[str]) -> str:
    """"grpo" when the YAML file or the overrides set a GRPO-only section (rollout, reward, advantage, loss) or
    a key only GRPO's sections have (``train.prompts_per_step``, ``data.max_prompt_length``), else "sft"."""
    import typing

    from megatron_avar.config import read_config_file
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.sft.config import SFTConfig

    keys = {override.split("=", 1)[0] for override in overrides}
    for section, values in read_config_file(config_path).items():
        keys |= {f"{section}.{key}" for key in values} if isinstance(values, dict) else {str(section)}
    if {key.split(".")[0] for key in keys} & set(GRPO_SECTIONS):
        return "grpo"

    def fields(cls, section: str) -> set[str]:
        hint = typing.get_type_hints(cls).get(section)
        return {f.name for f in dataclasses.fields(hint)} if dataclasses.is_dataclass(hint) else set()

    for key in keys:
        section, _, name = key.partition(".")
        if name and name.split(".")[0] in fields(GRPOConfig, section) - fields(SFTConfig, section):
            return "grpo"
    return "sft"


def plan_config(config_path: str | None, overrides: list[str], *, command: str | None = None,
                preset: str | None = None, assumptions: Assumptions = Assumptions()) -> RunPlan:
    """Load the `avar sft` / `avar grpo` config (``command``: None detects it) and plan it."""
    from megatron_avar.config import load_config

    command = command or detect_command(config_path, overrides)
    if command == "sft":
        from megatron_avar.sft.config import SFTConfig

        config = load_config(SFTConfig, config_path, overrides)
        qwen_config, model = load_model_config(config.model.hf_path, preset)
        return plan_sft(config, qwen_config, model, assumptions)
    if command == "grpo":
        from megatron_avar.grpo.config import GRPOConfig

        config = load_config(GRPOConfig, config_path, overrides)
        qwen_config, model = load_model_config(config.model.hf_path, preset)
        return plan_grpo(config, qwen_config, model, assumptions)
    raise ValueError(f"command={command!r}: allowed sft, grpo")
