"""What VLLMGenerationBackend sends to vLLM 0.33 and how it reads the answers back: engine and request
arguments (the prompts themselves: ``megatron_avar.vllm_inputs``), sampled-token log-probs, rollout assembly,
HF-name checks of a refit. Pure functions, no vLLM import (the worker-side loader imports it lazily), so they
are tested on the CPU; the reasons behind each choice are in ``grpo.vllm_backend``'s docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from megatron_avar.grpo.interfaces import PromptBatch, Rollout, SamplingParams
from megatron_avar.roles import TokenRole
from megatron_avar.vllm_inputs import MAX_IMAGES_PER_PROMPT

__all__ = ["RefitStats", "engine_kwargs", "sampling_request_kwargs", "sampled_token_logprobs", "assemble_rollout",
           "checked_hf_names",
           "load_weights_on_worker", "LOGPROBS_MODE", "RESUME_HINT",
           "check_vllm_sampling", "check_vllm_temperature"]

LOGPROBS_MODE = "processed_logprobs"
DTYPES = ("bfloat16", "float16", "float32")
VLLM_MAX_TEMPERATURE = 2.0  # vllm.SamplingParams refuses temperature > 2
# vLLM samples greedily below 1e-5 (its _SAMPLING_EPS) and raises any temperature below 1e-2 (its _MAX_TEMP) to
# 1e-2 with a warning: the trainer's log-probs would use the requested one. So 1e-2 is the lowest accepted.
VLLM_MIN_TEMPERATURE = 1e-2
HF_PREFIXES = ("model.language_model.", "model.visual.", "lm_head.")
RESUME_HINT = "the run resumes from the last checkpoint (restart the job)"


def engine_kwargs(*, tensor_parallel_size: int, gpu_memory_utilization: float, max_model_len: int, seed: int,
                  enable_sleep_mode: bool, dtype: str, min_pixels: int, max_pixels: int, world_size: int,
                  distributed_initialized: bool) -> dict:
    """Keyword arguments of ``vllm.LLM`` (all names are vLLM 0.33 ``EngineArgs`` fields).

    world_size / distributed_initialized: the launcher's WORLD_SIZE and whether torch.distributed is set up.
    Any multi-process job (or an initialised process group) uses ``external_launcher``: ``world_size`` must
    divide by ``tensor_parallel_size`` and the trainer's process group must exist first (vLLM would otherwise
    create a world of only tensor_parallel_size ranks). A single process uses the in-process "uni" executor.
    """
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if world_size > 1 or distributed_initialized:
        if world_size % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size} must divide the world size {world_size} "
                             "(vLLM groups consecutive ranks into tensor-parallel engines)")
        if not distributed_initialized:
            raise ValueError("build the vLLM backend after torch.distributed.init_process_group (the trainer's "
                             "process group): vLLM's external_launcher reuses it")
        executor = "external_launcher"
    else:
        if tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs one process per GPU: launch with "
                             "torchrun (the backend is colocated with the trainer's ranks)")
        executor = "uni"
    return dict(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len, seed=seed, enable_sleep_mode=enable_sleep_mode, dtype=dtype,
                distributed_executor_backend=executor, logprobs_mode=LOGPROBS_MODE, enable_prefix_caching=True,
                limit_mm_per_prompt={"image": MAX_IMAGES_PER_PROMPT, "video": 0},
                mm_processor_kwargs={"min_pixels": int(min_pixels), "max_pixels": int(max_pixels)},
                # normalise on the CPU in float32 like the trainer's processor (vLLM's default defers it to the GPU)
                mm_device_do_normalize=False)


def check_vllm_sampling(*, temperature: float, top_p: float, top_k: int, prefix: str) -> None:
    """ValueError for sampling vLLM cannot do with the trainer's log-prob convention: top-p/top-k (vLLM returns
    log-probs after the truncation, not log_softmax(logits / T)) or a temperature outside
    [VLLM_MIN_TEMPERATURE, VLLM_MAX_TEMPERATURE]. ``prefix`` names the settings ("rollout.", "sampling.")."""
    if top_p < 1.0 or top_k > 0:
        raise ValueError(f"the vLLM backend samples with {prefix}top_p=1 and {prefix}top_k=0 only (got {top_p}, "
                         f"{top_k}): vLLM returns log-probs after top-p/top-k truncation, not the "
                         "log_softmax(logits / T) the trainer's ratio uses; use the local backend for truncated "
                         "sampling")
    check_vllm_temperature(temperature, prefix=prefix)


def check_vllm_temperature(temperature: float, *, prefix: str) -> None:
    """ValueError for a sampling temperature outside [VLLM_MIN_TEMPERATURE, VLLM_MAX_TEMPERATURE]: below it vLLM
    samples at another temperature (it raises it to the minimum), above it refuses."""
    if not VLLM_MIN_TEMPERATURE <= temperature <= VLLM_MAX_TEMPERATURE:
        raise ValueError(f"the vLLM backend needs {prefix}temperature in [{VLLM_MIN_TEMPERATURE}, "
                         f"{VLLM_MAX_TEMPERATURE}] (below it vLLM samples at another temperature than the "
                         f"one asked for, above it refuses), got {temperature}")


def sampling_request_kwargs(sampling: SamplingParams, *, seed: int, stop_token_ids: Sequence[int],
                            suppressed_token_ids: Sequence[int]) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` for ONE sample (n=1) seeded with ``seed``.

    logprobs=0: only the sampled token's log-prob (module docstring for its meaning). logit_bias -inf on the
    suppressed vision tokens: they can never be sampled. stop_token_ids: end of turn / eos; the stop token is
    part of ``token_ids``. detokenize=False: the response text is decoded here with special tokens kept.
    Refuses what vLLM cannot sample with the trainer's log-prob convention (top-p/top-k) or at all (T > 2).
    """
    check_vllm_sampling(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                        prefix="sampling.")
    return dict(n=1, temperature=float(sampling.temperature), top_p=1.0, top_k=0, min_p=0.0,
                repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, seed=int(seed),
                max_tokens=int(sampling.max_new_tokens), stop_token_ids=sorted(int(i) for i in stop_token_ids),
                logprobs=0, logit_bias={int(i): float("-inf") for i in suppressed_token_ids},
                skip_special_tokens=False, detokenize=False)


def sampled_token_logprobs(token_ids: Sequence[int], logprobs: Sequence) -> torch.Tensor:
    """float32 [len(token_ids)]: the log-prob of each generated token, from vLLM's per-position
    ``{token_id: Logprob}`` dicts (``CompletionOutput.logprobs`` with ``SamplingParams(logprobs=0)``)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {0 if logprobs is None else len(logprobs)} log-prob positions for "
                           f"{len(token_ids)} tokens (was SamplingParams.logprobs set?)")
    values = []
    for pos, (token, position) in enumerate(zip(token_ids, logprobs)):
        entry = position.get(int(token)) if position is not None else None
        if entry is None:
            raise RuntimeError(f"vLLM's log-probs at position {pos} do not include the sampled token {token}")
        values.append(float(entry.logprob))
    return torch.tensor(values, dtype=torch.float32)


def assemble_rollout(prompts: PromptBatch, p: int, sample_index: int, response_ids: Sequence[int],
                     logprobs: torch.Tensor, finish_reason: str, *, stop_token_ids: Sequence[int],
                     suppressed: dict[int, str], decode: Callable[[list[int]], str]) -> Rollout:
    """One :class:`Rollout` of prompt ``p``: prompt ids + response ids, roles (prompt roles, then RESPONSE),
    ``response_text`` = ``decode`` of the response without its final stop token. Raises ValueError if a
    suppressed vision token was generated, RuntimeError for an engine finish reason other than stop/length."""
    prompt_id = prompts.prompt_ids[p]
    response = torch.tensor([int(t) for t in response_ids], dtype=torch.long)
    found = sorted({name for token_id, name in suppressed.items() if bool((response == token_id).any())})
    if found:
        raise ValueError(f"prompt {prompt_id} sample {sample_index}: the response contains {found}, which would "
                         "break the trainer's image token/feature accounting; vLLM's logit_bias should have "
                         "forbidden them")
    if finish_reason not in ("stop", "length"):
        raise RuntimeError(f"prompt {prompt_id} sample {sample_index}: vLLM finished with {finish_reason!r}")
    ends_with_stop = response.numel() > 0 and int(response[-1]) in set(stop_token_ids)
    if finish_reason == "stop" and not ends_with_stop:
        raise RuntimeError(f"prompt {prompt_id} sample {sample_index}: finish_reason 'stop' without a stop token")
    text_ids = response[:-1] if finish_reason == "stop" else response
    prompt_ids = prompts.input_ids[p].to(torch.long).cpu()
    roles = torch.cat([prompts.roles[p].to(torch.long).cpu(),
                       torch.full((response.numel(),), int(TokenRole.RESPONSE), dtype=torch.long)])
    return Rollout(prompt_id=prompt_id, sample_index=sample_index, ground_truth=prompts.ground_truths[p],
                   input_ids=torch.cat([prompt_ids, response]), roles=roles, prompt_length=int(prompt_ids.numel()),
                   response_text=decode(text_ids.tolist()), generator_logprobs=logprobs.to(torch.float32),
                   finish_reason=finish_reason, pixel_values=prompts.pixel_values[p],
                   image_grid_thw=prompts.image_grid_thw[p], metadata={})


@dataclasses.dataclass
class RefitStats:
    """One :meth:`VLLMGenerationBackend.update_weights`: tensors and bytes handed over (Σ numel · element
    size, in the trainer's dtype), seconds (wake of the weights + load, synchronised), vLLM parameters loaded."""

    num_tensors: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    num_params_loaded: int = 0

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("nan")


def checked_hf_names(named_tensors: Iterable[tuple[str, torch.Tensor]], stats: RefitStats
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer's (name, tensor) pairs in transformers-5 HF names (``hf_mapping.canonical_hf_name``: vLLM's
    Qwen2.5-VL ``hf_to_vllm_mapper`` maps both layouts, this fixes one), counted into ``stats``. Raises
    ValueError for a name that is not an HF Qwen2.5-VL tensor (e.g. a megatron name)."""
    from megatron_avar.models.qwen2_5_vl.hf_mapping import canonical_hf_name

    for name, tensor in named_tensors:
        hf_name = canonical_hf_name(name)
        if not hf_name.startswith(HF_PREFIXES):
            raise ValueError(f"update_weights: {name!r} is not a Hugging Face Qwen2.5-VL tensor name (expected a "
                             f"prefix in {HF_PREFIXES}); export with hf_mapping.export_hf_state_dict")
        stats.num_tensors += 1
        stats.num_bytes += tensor.numel() * tensor.element_size()
        yield hf_name, tensor.detach()


def load_weights_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, list[str]]:
    """Runs inside the vLLM worker (``LLM.collective_rpc`` passes the worker first): the model's own
    ``load_weights`` (HF names, full tensors; each parameter's weight_loader takes its tensor-parallel shard).
    Returns the number of parameters loaded and the names of those never loaded."""
    from vllm.config import set_current_vllm_config

    model = worker.model_runner.get_model()  # unwrapped from vLLM's CUDA-graph wrapper
    with set_current_vllm_config(worker.vllm_config):
        loaded = model.load_weights(weights=weights)
    missing = sorted(set(name for name, _ in model.named_parameters()) - set(loaded or ()))
    return len(loaded or ()), missing
