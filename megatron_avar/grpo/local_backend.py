"""LocalGenerationBackend: GRPO rollouts with Hugging Face ``Qwen2_5_VLForConditionalGeneration.generate``
(KV cache) on the CPU or one small GPU, with weights refit in memory from the trainer.

It implements :class:`megatron_avar.grpo.interfaces.GenerationBackend` with the contract the vLLM backend
has, and is the reference that vLLM log-probs are checked against.

Sampling (one ``generate`` call per chunk of at most ``batch_size`` samples of ONE prompt: n identical rows,
no padding). HF's greedy loop is driven by one logits processor (:class:`_RowSampler`) that, per step, takes
the RAW logits [rows, V] and
  1. records ``log_softmax(logits / temperature)[token]`` of the token it picks (``generator_logprobs``);
  2. applies transformers' own processors in HF's order: suppress the vision tokens (``SUPPRESSED_TOKENS``),
     temperature, top-k (0 = off), top-p;
  3. draws the token of row k (an exponential race over the probabilities) from the row's own
     ``torch.Generator``, seeded with :func:`sample_seed` ``(sampling.seed, prompt_id, sample_index)``, and
     hands HF a one-hot score row, so HF's argmax takes exactly that token.
So a rollout depends only on (weights, prompt, sampling, seed, prompt_id, sample_index): never on the other
prompts of the batch, on ``batch_size``, on how prompts are split over data-parallel ranks, or on the global
torch RNG (identical tokens up to the float rounding of batched matmuls; CPU and CUDA generators give
different streams, so samples repeat on the same device type only). The seed is
``zlib.crc32(f"{seed}/{prompt_id}/{sample_index}")`` (stable across processes, unlike ``hash()``); the vLLM
backend seeds each sample's request with the same function.

Log-prob convention: ``generator_logprobs[t] = log_softmax(raw_logits_t / temperature)[token_t]``, the
distribution BEFORE suppression and top-p/top-k truncation. That is what the trainer computes
(``log_softmax(logits / temperature)``), so the two agree up to numerics when the weights are equal. They
are recorded in the sampler, not via ``output_logits=True``, which would keep every step's [rows, V] logits
(max_new_tokens * rows * V * 4 bytes: 10 GB at 2048 x 8 x 152k).

Decoding uses a fresh ``transformers.GenerationConfig`` (greedy over the one-hot scores, repetition penalty
1.0); the model's own ``generation_config`` is replaced at load, because ``generate`` fills every field left
None from it (Qwen2.5-VL-Instruct's generation_config.json says top_k=1, top_p=0.001, repetition 1.05).

Stop: the first stop id (``models.hf_inference.stop_token_ids``: the model's generation eos ids, the tokenizer's
eos, ``<|im_end|>``; the vLLM backend's set too) ends a response and is part of it (finish_reason "stop");
otherwise the response is all ``max_new_tokens`` tokens ("length"). ``response_text`` is decoded without
that stop token and with special tokens kept (`<think>`/`<answer>` tags).
"""

from __future__ import annotations

import gc
import zlib
from collections.abc import Iterable

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    LogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from megatron_avar.grpo.interfaces import PromptBatch, Rollout, SamplingParams
from megatron_avar.models import hf_inference
from megatron_avar.models.hf_inference import END_OF_TURN
from megatron_avar.roles import TokenRole

__all__ = ["LocalGenerationBackend", "sample_seed", "SUPPRESSED_TOKENS", "END_OF_TURN"]

# Never generated: each would change the number of image tokens the trainer matches to vision features.
SUPPRESSED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The RNG seed of sample ``sample_index`` of prompt ``prompt_id`` (32 bits, identical in every process)."""
    return zlib.crc32(f"{seed}/{prompt_id}/{sample_index}".encode())


class _RowSampler:
    """The last (and only) logits processor of a greedy ``generate``: samples each row with its own generator
    and returns scores that are 0 at the chosen token and -inf elsewhere; records the chosen tokens and their
    log-probs ``log_softmax(raw / temperature)`` (module docstring)."""

    def __init__(self, generators: list[torch.Generator], sampling: SamplingParams, suppressed: list[int],
                 device: torch.device):
        self.generators = generators
        self.temperature = sampling.temperature
        self.warpers: list[LogitsProcessor] = [SuppressTokensLogitsProcessor(suppressed, device=str(device))]
        if sampling.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        self.tokens: list[torch.Tensor] = []  # per step, [rows]
        self.logprobs: list[torch.Tensor] = []  # per step, float32 [rows]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raw = scores.float()
        warped = raw
        for warper in self.warpers:
            # transformers annotates input_ids as torch.LongTensor, a legacy class a plain Tensor does not match
            warped = warper(input_ids, warped)  # pyright: ignore[reportArgumentType]
        probs = torch.softmax(warped, dim=-1)
        # Exponential race (Gumbel-max): argmax p_v / E_v with E_v ~ Exp(1) is a draw from p; one RNG call per row,
        # ~20x faster than torch.multinomial over a 152k vocabulary on a CPU.
        race = torch.stack([torch.empty_like(probs[row]).exponential_(generator=g)
                            for row, g in enumerate(self.generators)])
        chosen = (probs / race).argmax(dim=-1)
        logp = torch.log_softmax(raw / self.temperature, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        self.tokens.append(chosen)
        self.logprobs.append(logp)
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, chosen[:, None], 0.0)


class LocalGenerationBackend:
    """HF KV-cache generation for GRPO rollouts (module docstring: sampling, seeding, log-prob convention).

    hf_path: an HF Qwen2.5-VL checkpoint directory; its weights are only the starting point, the trainer
    replaces them with :meth:`update_weights` (a truncated or damaged weight file there is a ValueError naming it
    and the fix: ``hf_inference.load_model`` checks the files first). processor:
    ``megatron_avar.processor.load_processor`` of the checkpoint (decodes responses; gives the stop and suppressed
    token ids). device: default ``platform.device_for_local_rank()``. dtype: model weights (float32 for log-prob
    checks). batch_size: at most this many rows per ``generate`` call (a prompt's n samples are split into chunks).
    """

    def __init__(self, hf_path: str, processor, *, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is None:
            from megatron_avar.platform import device_for_local_rank

            device = device_for_local_rank()
        self.device, self.dtype, self.batch_size, self.processor = torch.device(device), dtype, batch_size, processor
        self.model = hf_inference.load_model(hf_path, device=self.device, dtype=dtype)
        tokenizer = processor.tokenizer
        self.image_token_id = int(processor.image_token_id)
        self.stop_ids = hf_inference.stop_token_ids(tokenizer, self.model.generation_config)
        self.suppressed = {hf_inference.token_id(tokenizer, t): t for t in SUPPRESSED_TOKENS}
        self.pad_id = hf_inference.pad_token_id(tokenizer, self.model.generation_config)
        # Replace the checkpoint's generation config: generate() fills every None field from it (docstring).
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        # In-memory parameter name -> parameter, tied aliases included (``lm_head.weight`` when tied).
        self._params: dict[str, torch.nn.Parameter] = dict(self.model.named_parameters(remove_duplicate=False))
        self._stale: str | None = None  # why the weights are unusable (a failed update_weights)

    def _ready_model(self):
        """The model, when it may generate: not closed, and no failed update_weights since the last good one."""
        if self.model is None:
            raise RuntimeError("LocalGenerationBackend is closed; build a new one")
        if self._stale is not None:
            raise RuntimeError(f"the weights are inconsistent after a failed update_weights ({self._stale}); "
                               "call update_weights again with the complete state")
        return self.model

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: PromptBatch, n: int, sampling: SamplingParams) -> list[Rollout]:
        """``len(prompts) * n`` rollouts, rollout ``p * n + k`` = sample k of prompt p (see module docstring)."""
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        self._ready_model()
        config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False, num_beams=1,
                                  repetition_penalty=1.0, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                  use_cache=True)
        rollouts: list[Rollout] = []
        for p in range(len(prompts)):
            for start in range(0, n, self.batch_size):
                rollouts += self._generate_chunk(prompts, p, range(start, min(n, start + self.batch_size)),
                                                 sampling, config)
        return rollouts

    def _model_inputs(self, prompts: PromptBatch, p: int, rows: int) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / mm_token_type_ids [rows, L] (identical rows: no padding) and the images x
        rows."""
        ids = prompts.input_ids[p].to(dtype=torch.long)
        inputs = {k: v.to(self.device) for k, v in hf_inference.left_padded_inputs(
            [ids] * rows, pad_token_id=self.pad_id, image_token_id=self.image_token_id).items()}
        pixel_values, grid = prompts.pixel_values[p], prompts.image_grid_thw[p]
        if (pixel_values is None) != (grid is None):
            raise ValueError(f"prompt {prompts.prompt_ids[p]}: pixel_values and image_grid_thw must both be given "
                             "or both be None")
        if pixel_values is not None and grid is not None:
            inputs["pixel_values"] = pixel_values.to(self.device, self._ready_model().dtype).repeat(rows, 1)
            inputs["image_grid_thw"] = grid.to(self.device, torch.long).repeat(rows, 1)
        return inputs

    def _generate_chunk(self, prompts: PromptBatch, p: int, samples: range, sampling: SamplingParams,
                        config: GenerationConfig) -> list[Rollout]:
        prompt_id = prompts.prompt_ids[p]
        inputs = self._model_inputs(prompts, p, len(samples))
        generators = [torch.Generator(device=self.device).manual_seed(sample_seed(sampling.seed, prompt_id, k))
                      for k in samples]
        sampler = _RowSampler(generators, sampling, sorted(self.suppressed), self.device)
        # transformers types generate's self as a Protocol its own model classes do not meet
        sequences = self._ready_model().generate(  # pyright: ignore[reportAttributeAccessIssue]
            **inputs, generation_config=config, logits_processor=LogitsProcessorList([sampler]))
        prompt_length = inputs["input_ids"].shape[1]
        generated = sequences[:, prompt_length:].cpu()
        tokens, logprobs = torch.stack(sampler.tokens, 1).cpu(), torch.stack(sampler.logprobs, 1).cpu()
        stop_ids = torch.tensor(self.stop_ids)
        out = []
        for row, k in enumerate(samples):
            is_stop = torch.isin(generated[row], stop_ids)
            if bool(is_stop.any()):
                length, finish = int(is_stop.nonzero()[0, 0]) + 1, "stop"
            else:
                length, finish = generated.shape[1], "length"
                assert length == sampling.max_new_tokens, "generate ended a row without a stop token"
            response = generated[row, :length]
            assert torch.equal(response, tokens[row, :length]), "HF did not take the sampler's tokens"
            self._check_no_vision_tokens(response, prompt_id, k)
            text_ids = response[:-1] if finish == "stop" else response
            prompt_roles = prompts.roles[p].to(torch.long).cpu()
            out.append(Rollout(
                prompt_id=prompt_id, sample_index=k, ground_truth=prompts.ground_truths[p],
                input_ids=torch.cat([prompts.input_ids[p].to(torch.long).cpu(), response]),
                roles=torch.cat([prompt_roles, torch.full((length,), int(TokenRole.RESPONSE), dtype=torch.long)]),
                prompt_length=prompt_length,
                response_text=self.processor.tokenizer.decode(text_ids.tolist(), skip_special_tokens=False),
                generator_logprobs=logprobs[row, :length].to(torch.float32).clone(), finish_reason=finish,
                pixel_values=prompts.pixel_values[p], image_grid_thw=prompts.image_grid_thw[p], metadata={}))
        return out

    def _check_no_vision_tokens(self, response: torch.Tensor, prompt_id: str, sample_index: int) -> None:
        found = [name for token_id, name in self.suppressed.items() if bool((response == token_id).any())]
        if found:
            raise ValueError(f"prompt {prompt_id} sample {sample_index}: the response contains {found}, which would "
                             "break the trainer's image token/feature accounting; they must be suppressed during "
                             "sampling (check that SUPPRESSED_TOKENS reach the logits processor)")

    # ------------------------------------------------------------------ weights
    def prepare_generation(self) -> None:
        """Nothing to take back: the model stays where it is between steps (GenerationBackend protocol)."""

    def finish_generation(self) -> None:
        """Nothing to release: the model stays where it is between steps (GenerationBackend protocol)."""

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's full weights into the model in place (``param.copy_``: one copy per tensor, cast
        to the model's dtype and device; nothing touches the disk).

        Names: Hugging Face names in either layout, as checkpoint files spell them (``model.layers.*``,
        ``visual.*``: hub / ``save_pretrained`` files) or as transformers 5 names the modules
        (``model.language_model.*``, ``model.visual.*``: ``hf_mapping.export_hf_state_dict``); mapped with
        ``hf_mapping.canonical_hf_name``. ``lm_head.weight`` may be left out when the embeddings are tied (it
        is the embedding; if given, it is copied into it too). Raises ValueError naming the tensor for an
        unknown name or a shape mismatch, and after the iteration for parameters never given; after such an
        error the model holds a mix of weights and ``generate`` refuses to run until a complete refit.
        """
        from megatron_avar.models.qwen2_5_vl.hf_mapping import canonical_hf_name

        if self.model is None:
            raise RuntimeError("LocalGenerationBackend is closed; build a new one")
        self._stale = "update in progress"
        filled: set[int] = set()
        for name, tensor in named_tensors:
            param = self._params.get(canonical_hf_name(name))
            if param is None:
                self._stale = f"unknown tensor {name}"
                raise ValueError(f"update_weights: unknown tensor {name!r} (as {canonical_hf_name(name)!r}); expected "
                                 f"Hugging Face Qwen2.5-VL names such as {next(iter(self._params))!r}")
            if tuple(tensor.shape) != tuple(param.shape):
                self._stale = f"shape mismatch for {name}"
                raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                                 f"parameter has {tuple(param.shape)}: a different model configuration?")
            param.data.copy_(tensor.detach())
            filled.add(id(param))
        missing = [n for n, p in self._params.items() if id(p) not in filled]
        if missing:
            self._stale = f"{len(missing)} parameters never given"
            raise ValueError(f"update_weights: {len(missing)} model parameters were not given, e.g. {missing[:5]}; "
                             "a refit must pass the full state")
        self._stale = None

    def close(self) -> None:
        """Free the model (and the CUDA cache); the backend cannot be used afterwards."""
        self.model, self._params = None, {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
