"""VLLMGenerationBackend: GRPO rollouts with vLLM 0.33, colocated with the Megatron actor (same processes,
same GPUs), implementing :class:`megatron_avar.grpo.interfaces.GenerationBackend` with the contract of
:class:`megatron_avar.grpo.local_backend.LocalGenerationBackend` (the CPU reference).

UNTESTED HERE: vLLM is a GPU-only extra (docs/installation.md, 'Not yet proven on GPU'). Every vLLM name used below
was read in the vLLM 0.33.0 wheel's own source (``vllm/entrypoints/llm.py``, ``vllm/sampling_params.py``,
``vllm/v1/executor/uniproc_executor.py``, the default Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``,
``vllm/v1/worker/gpu/sample/sampler.py``), ``vllm/model_executor/models/qwen2_5_vl.py``,
``vllm/multimodal/processing/processor.py``); the GPU tests in ``tests/grpo/test_vllm_backend.py`` check the
behaviour. The request building and output decoding live in
``grpo.vllm_requests`` (pure, no vLLM import) and are tested on the CPU.

Colocation. Under torchrun the engine is built with ``distributed_executor_backend="external_launcher"``: one
vLLM worker inside each trainer process, on ``cuda:LOCAL_RANK``, reusing the trainer's default process group;
vLLM cuts the world into tensor-parallel groups of consecutive ranks (its "external data parallel" layout), so
every rank builds the backend, and all ranks of one vLLM TP group must call :meth:`generate` with the same
prompts and sampling (checked). The engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which
external_launcher requires; set here for the single-process case too), so ``LLM.collective_rpc`` runs the
weight loader in this process with the trainer's tensors by reference: no serialization, no disk.

Prompts. The trainer's ``input_ids`` hold image pads already expanded (one ``<|image_pad|>`` per merged patch);
``megatron_avar.vllm_inputs`` collapses them to one per image and rebuilds each image exactly from its
``pixel_values``, and vLLM, given the same min/max pixels, re-derives the same grid and expands the pads back;
every rollout checks that vLLM's expanded prompt ids equal the trainer's ids.

Log-probs. ``logprobs_mode="processed_logprobs"``: vLLM returns log_softmax of the logits after logit bias
and temperature and after top-k/top-p truncation; with top_p=1 and top_k=0 (the only sampling accepted,
:func:`sampling_request_kwargs`) that is ``log_softmax(logits / T)`` over the vocabulary minus the five
suppressed vision tokens. The trainer (and the local backend) normalise over the full vocabulary: the two
differ by ``-log(1 - P_vision)`` >= 0 per token (P_vision = the suppressed tokens' probability at T), which
is negligible while the model gives vision tokens little probability inside a response (the GPU test
reports it on a random toy model). No vLLM 0.33 mode gives the untruncated distribution under top-p/top-k
("raw_*" modes are before temperature), so truncated sampling is refused rather than returning different
numbers.

Caches across refits. :meth:`update_weights` resets the prefix cache (``LLM.reset_prefix_cache``) and the
encoder cache (``LLMEngine.reset_encoder_cache``: vision-tower outputs keyed by image hash, computed with the
old weights), and every prompt carries ``cache_salt`` = the weight version (a second guard for the prefix
cache), so no KV block and no vision embedding computed before a refit is reused after it. (vLLM's sleep also
clears its multimodal processor cache, so each step's images are processed again: time, not correctness.)

Refit. The loader calls the model's ``load_weights`` directly, not vLLM's ``reload_weights`` route with its
per-layer post-processing: right for the bf16, unquantized CUDA engine built here (no post-processing changes an
unquantized weight on CUDA); a quantized model or an fp8 KV cache would need that route.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import time
from collections.abc import Iterable

import torch

from megatron_avar.grpo.interfaces import PromptBatch, Rollout, SamplingParams
from megatron_avar.grpo.local_backend import SUPPRESSED_TOKENS, sample_seed
from megatron_avar.grpo.vllm_requests import (
    RESUME_HINT,
    RefitStats,
    assemble_rollout,
    checked_hf_names,
    engine_kwargs,
    load_weights_on_worker,
    sampled_token_logprobs,
    sampling_request_kwargs,
)
from megatron_avar.models import hf_inference
from megatron_avar.vllm_inputs import MAX_IMAGES_PER_PROMPT, token_prompt

__all__ = ["VLLMGenerationBackend"]


class VLLMGenerationBackend:
    """vLLM rollouts colocated with the trainer (module docstring: colocation, prompts, log-probs, caches).

    hf_path: the HF Qwen2.5-VL checkpoint directory the engine starts from (tokenizer, processor config);
    the trainer replaces its weights with :meth:`update_weights`. processor: ``processor.load_processor`` of
    the checkpoint, the one that rendered the prompts (its min/max pixels are passed to vLLM; decodes the
    responses). tensor_parallel_size: vLLM TP (divides WORLD_SIZE under torchrun). gpu_memory_utilization:
    the fraction of the whole GPU vLLM takes for weights + KV cache while awake; vLLM refuses to start unless
    that much is free when the backend is built (build it before the trainer's optimizer state exists, or
    lower it). Every rank must build the backend (vLLM's start-up runs collectives). max_model_len: prompt + response
    tokens. seed: the engine seed (every sample also has its own request seed). enable_sleep_mode: allows
    :meth:`sleep` / :meth:`wake_up` (vLLM's cumem allocator). dtype: the engine's weights/activations.

    Lifecycle of a colocated step (``grpo.trainer``): ``update_weights`` on the sleeping engine, which wakes
    the weights only, so the KV cache is not allocated while the trainer's gathered tensors exist ->
    ``wake_up()`` (``prepare_generation``: the KV cache) -> ``generate`` -> ``sleep()`` -> trainer step.
    ``generate`` refuses to run asleep rather than waking silently.
    """

    def __init__(self, hf_path: str, processor, *, tensor_parallel_size: int, gpu_memory_utilization: float = 0.5,
                 max_model_len: int, seed: int = 0, enable_sleep_mode: bool = True, dtype: str = "bfloat16"):
        from megatron_avar import platform

        if not platform.vllm_available():
            raise RuntimeError("VLLMGenerationBackend needs CUDA and vLLM (the gpu extra: pip install -e .[gpu] on "
                               "a GPU machine); on this machine use grpo.local_backend.LocalGenerationBackend")
        size = processor.image_processor.size
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._engine_args = engine_kwargs(
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, enable_sleep_mode=enable_sleep_mode, dtype=dtype,
            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"],
            world_size=torch.distributed.get_world_size() if distributed else 1, distributed_initialized=distributed)
        self.processor, self.max_model_len, self.enable_sleep_mode = processor, max_model_len, enable_sleep_mode
        self.image_token_id = int(processor.image_token_id)
        self.suppressed = {hf_inference.token_id(processor.tokenizer, t): t for t in SUPPRESSED_TOKENS}
        self.stop_ids = self._stop_token_ids(hf_path)
        self.last_refit: RefitStats | None = None
        self._weight_version = 0
        self._asleep: set[str] = set()
        self._stale: str | None = None
        # The engine core and its worker must live in this process (module docstring); external_launcher
        # asserts it, the single-process "uni" executor needs it for collective_rpc to pass tensors by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self._llm = LLM(model=hf_path, **self._engine_kwargs())
        self._tp_group = None
        if tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tp_group

            self._tp_group = get_tp_group().cpu_group

    def _engine_kwargs(self) -> dict:
        """The ``vllm.LLM`` keyword arguments (a subclass may add some, e.g. the refit benchmark's
        ``load_format="dummy"``)."""
        return dict(self._engine_args)

    def _stop_token_ids(self, hf_path: str) -> list[int]:
        """The local backend's stop set (``hf_inference.stop_token_ids``) of the checkpoint's generation config."""
        from transformers import AutoConfig, GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(hf_path)
        except OSError:  # no generation_config.json: HF derives it from the model config
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(hf_path))
        return hf_inference.stop_token_ids(self.processor.tokenizer, generation)

    def _ready_llm(self):
        """The engine, when it may generate: not closed, and no failed update_weights since the last good one."""
        if self._llm is None:
            raise RuntimeError("VLLMGenerationBackend is closed; build a new one")
        if self._stale is not None:
            raise RuntimeError(f"the engine's weights are inconsistent after a failed update_weights ({self._stale}); "
                               "call update_weights again with the complete state")
        return self._llm

    # ------------------------------------------------------------------ generation
    def _request(self, prompts: PromptBatch, p: int) -> dict:
        """A ``vllm.TokensPrompt`` dict (``vllm_inputs.token_prompt``: collapsed pads, the rebuilt images) with the
        weight version as cache salt."""
        prompt_id, ids, grid = prompts.prompt_ids[p], prompts.input_ids[p], prompts.image_grid_thw[p]
        if ids.numel() >= self.max_model_len:
            raise ValueError(f"prompt {prompt_id} has {ids.numel()} tokens, max_model_len is {self.max_model_len}: "
                             "raise max_model_len or filter long prompts")
        if grid is not None and grid.shape[0] > MAX_IMAGES_PER_PROMPT:
            raise ValueError(f"prompt {prompt_id} has {grid.shape[0]} images; the vLLM backend allows "
                             f"{MAX_IMAGES_PER_PROMPT} (MAX_IMAGES_PER_PROMPT)")
        try:
            request = token_prompt(ids, prompts.pixel_values[p], grid, self.processor.image_processor,
                                   self.image_token_id)
        except ValueError as error:
            raise ValueError(f"prompt {prompt_id}: {error}") from None
        return {**request, "cache_salt": f"avar-weights-{self._weight_version}"}

    def _check_same_step_on_tp_group(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> None:
        """All ranks of a vLLM tensor-parallel group run one engine: they must submit identical requests."""
        if self._tp_group is None:
            return
        digest = hashlib.sha256(repr((prompts.prompt_ids, n, dataclasses.astuple(sampling))).encode())
        for ids in prompts.input_ids:
            digest.update(ids.to(torch.int64).cpu().numpy().tobytes())
        gathered = [None] * torch.distributed.get_world_size(self._tp_group)
        torch.distributed.all_gather_object(gathered, digest.hexdigest(), group=self._tp_group)
        if len(set(gathered)) != 1:
            raise ValueError("the ranks of one vLLM tensor-parallel group called generate with different prompts or "
                             "sampling: give every rank of a TP group the same PromptBatch (shard prompts over "
                             "data-parallel groups only)")

    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> list[Rollout]:
        """``len(prompts) * n`` rollouts, rollout ``p * n + k`` = sample k of prompt p, each one vLLM request
        (n=1) seeded with ``local_backend.sample_seed(sampling.seed, prompt_id, k)``: reproducible per sample as
        far as vLLM's numerics allow (a sample's logits can change in the last bits with the batch it runs in).
        Raises RuntimeError naming the step's prompts when the engine fails (the run resumes from the last
        checkpoint), ValueError for prompts or sampling the backend cannot serve."""
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        llm = self._ready_llm()
        if self._asleep:
            raise RuntimeError(f"the vLLM engine is asleep ({sorted(self._asleep)} released); call wake_up() before "
                               "generate()")
        from vllm import SamplingParams as VllmSamplingParams

        requests, params = [], []
        for p in range(len(prompts)):
            request = self._request(prompts, p)
            for k in range(n):
                requests.append(dict(request))
                params.append(VllmSamplingParams(**sampling_request_kwargs(
                    sampling, seed=sample_seed(sampling.seed, prompts.prompt_ids[p], k),
                    stop_token_ids=self.stop_ids, suppressed_token_ids=sorted(self.suppressed))))
        self._check_same_step_on_tp_group(prompts, n, sampling)
        try:
            outputs = llm.generate(requests, params, use_tqdm=False)
        except Exception as error:
            shown = ", ".join(prompts.prompt_ids[:8]) + (" ..." if len(prompts) > 8 else "")
            raise RuntimeError(f"the vLLM rollout engine failed on this step's {len(prompts)} prompts x {n} samples "
                               f"(prompt ids {shown}): {type(error).__name__}: {error}; {RESUME_HINT}") from error
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests; {RESUME_HINT}")
        decode = lambda ids: self.processor.tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        rollouts = []
        for index, output in enumerate(outputs):
            p, k = divmod(index, n)
            if list(output.prompt_token_ids) != prompts.input_ids[p].tolist():
                raise ValueError(f"prompt {prompts.prompt_ids[p]}: vLLM's expanded prompt ids differ from the "
                                 f"trainer's ({len(output.prompt_token_ids)} vs {prompts.input_ids[p].numel()} "
                                 "tokens), e.g. its image processor resized an image: compare min_pixels/max_pixels "
                                 "of the checkpoint's processor config with the processor passed here")
            completion = output.outputs[0]
            logprobs = sampled_token_logprobs(completion.token_ids, completion.logprobs)
            rollouts.append(assemble_rollout(prompts, p, k, completion.token_ids, logprobs, completion.finish_reason,
                                             stop_token_ids=self.stop_ids, suppressed=self.suppressed, decode=decode))
        return rollouts

    # ------------------------------------------------------------------ weights and memory
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's full weights (HF names, full unsharded tensors, any device/dtype) into the engine
        in place through ``LLM.collective_rpc`` -> the model's ``load_weights`` (module docstring), then
        invalidate the prefix and encoder caches. The iterable is consumed once, lazily (the trainer may gather
        one tensor at a time). Timing and sizes go to :attr:`last_refit`. A sleeping engine gets its weights
        woken first (its KV cache stays released). Raises ValueError for a non-HF name or when some vLLM
        parameters were never given (``generate`` then refuses until a complete refit)."""
        if self._llm is None:
            raise RuntimeError("VLLMGenerationBackend is closed; build a new one")
        stats = RefitStats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        if "weights" in self._asleep:
            self._llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        self._stale = "update in progress"
        try:
            (num_loaded, missing), *_ = self._llm.collective_rpc(
                load_weights_on_worker, args=(checked_hf_names(named_tensors, stats),))
        except ValueError:
            raise
        except Exception as error:
            raise RuntimeError(f"vLLM failed loading the refit weights after {stats.num_tensors} tensors: "
                               f"{type(error).__name__}: {error}; {RESUME_HINT}") from error
        torch.cuda.synchronize()
        stats.seconds, stats.num_params_loaded = time.perf_counter() - start, num_loaded
        if missing:
            self._stale = f"{len(missing)} vLLM parameters never given"
            raise ValueError(f"update_weights: {len(missing)} vLLM parameters were not loaded, e.g. {missing[:5]}; a "
                             "refit must pass the full HF state")
        self._stale = None
        self._weight_version += 1  # new cache salt: no prefix block of the old weights can match
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after the refit (requests still running?); "
                               f"{RESUME_HINT}")
        self._llm.llm_engine.reset_encoder_cache()  # vision embeddings computed with the old weights
        self.last_refit = stats

    def sleep(self) -> None:
        """Release the engine's GPU memory for the trainer: ``LLM.sleep(level=1)`` moves the weights to pinned
        CPU memory and discards the KV cache (and the prefix cache). Level 1, not 2: a partial refit after a
        level-2 sleep would leave garbage weights. Idempotent."""
        llm = self._ready_llm()
        if not self.enable_sleep_mode:
            raise ValueError("this backend was built with enable_sleep_mode=False; build it with True to sleep")
        if not self._asleep:
            llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        """Restore what :meth:`sleep` released (``LLM.wake_up(tags=...)``: weights first, then the KV cache)."""
        if self._llm is None:
            raise RuntimeError("VLLMGenerationBackend is closed; build a new one")
        for tag in ("weights", "kv_cache"):
            if tag in self._asleep:
                self._llm.wake_up(tags=[tag])
                self._asleep.discard(tag)

    def prepare_generation(self) -> None:
        """GenerationBackend protocol, after a step's refit: :meth:`wake_up` (the KV cache; nothing when awake)."""
        self.wake_up()

    def finish_generation(self) -> None:
        """GenerationBackend protocol, after a step's rollouts and once after start-up: :meth:`sleep`, giving the
        colocated trainer the GPU memory, when built with ``enable_sleep_mode``; otherwise nothing."""
        if self.enable_sleep_mode:
            self.sleep()

    def close(self) -> None:
        """Shut the engine down (its in-process engine core and worker) and free its GPU memory. Idempotent."""
        if self._llm is None:
            return
        try:
            self._llm.llm_engine.engine_core.shutdown()
        finally:
            self._llm = None
            gc.collect()
            torch.cuda.empty_cache()
