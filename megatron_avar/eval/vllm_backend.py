"""vLLM generation backend (GPU only; imported only when `megatron_avar.platform.vllm_available()`).

UNTESTED: no machine this project is developed on has vLLM (it is a GPU-only extra). It follows vLLM 0.33's
offline multimodal API: ``LLM.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL, ...]}}],
SamplingParams)``, where ``ids`` are the conversation `render_conversation` renders for the HF backend with each
image's pads collapsed to one, and the images are rebuilt from its ``pixel_values``
(``megatron_avar.vllm_inputs``): vLLM sees the HF path's tokens and pixels, so the two backends' scores are
comparable. Tensor parallelism via ``tensor_parallel_size``. For data parallelism run one process per GPU group
with ``--num-shards N --shard-index i``, each with its own ``CUDA_VISIBLE_DEVICES``: vLLM does not read
LOCAL_RANK (with tensor_parallel_size 1 it takes the first visible GPU), and two engines on one GPU do not fit.

Context length: vLLM reserves KV cache for ``max_model_len`` tokens (prompt + response) of a sequence, by default the
model's whole context (128k for Qwen2.5-VL: more memory than a benchmark's prompts need, or more than the GPU has).
The engine gets ``GenerationConfig.max_model_len``, by default what the run needs: the longest prompt it generates
for + max_new_tokens, counted from the image sizes before vLLM starts (:func:`needed_max_model_len`, the same count
as GRPO's prompts: `training.sample_plan`), as GRPO gives its engine prompt + response tokens. A prompt that does not
fit with max_new_tokens is refused before vLLM sees it (`generation.PromptDoesNotFitError`, naming the sample and the
fix): vLLM would stop its response at max_model_len, shorter than the HF backend's, or fail naming no sample.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_avar.eval.benchmarks.base import Sample

__all__ = ["VLLMGenerator", "check_image_count", "needed_max_model_len", "prompt_length"]



def prompt_length(content: list[dict], processor) -> int:
    """The number of tokens `roles.render_conversation` gives the user turn ``content`` (chat items, PIL images) with
    the generation prompt, image pads expanded: counted from each image's size (`training.sample_plan`'s image grid
    and renderer), without resizing or normalising any image."""
    from megatron_avar.roles import GENERATION_PROMPT
    from megatron_avar.training.sample_plan import image_grid, sample_roles

    sizes = [item["image"].size for item in content if item["type"] == "image"]  # (width, height)
    grids = [image_grid(width, height, processor.image_processor) for width, height in sizes]
    turn = int(sample_roles([{"role": "user", "content": content}], grids, processor).numel())
    return turn + len(processor.tokenizer(GENERATION_PROMPT, add_special_tokens=False)["input_ids"])


def check_image_count(sample: Sample) -> None:
    """PromptDoesNotFitError naming ``sample`` when it has more images than a vLLM engine takes per prompt
    (``vllm_inputs.MAX_IMAGES_PER_PROMPT``; vLLM's own refusal names no sample)."""
    from megatron_avar.eval.generation import PromptDoesNotFitError
    from megatron_avar.vllm_inputs import MAX_IMAGES_PER_PROMPT

    count = sum(item["type"] == "image" for item in sample.content)
    if count > MAX_IMAGES_PER_PROMPT:
        raise PromptDoesNotFitError(f"sample {sample.id!r} has {count} images; the vLLM backend takes at most "
                                 f"{MAX_IMAGES_PER_PROMPT} per prompt: use --backend hf for it")


def needed_max_model_len(model_dir: str, config, samples: Iterable[tuple[str, Sample]]) -> int:
    """``config.max_new_tokens`` + the longest prompt of ``samples`` ((benchmark name, Sample) pairs: those the run
    generates), counted with the checkpoint's processor under the config's pixel bounds; said on stderr. A sample
    whose image the processor refuses is named."""
    from megatron_avar.processor import load_processor

    processor = load_processor(model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    longest, where = 0, ""
    for benchmark, sample in samples:
        try:
            check_image_count(sample)
        except ValueError as error:  # (it names the sample)
            raise ValueError(f"{benchmark}: {error}") from None
        try:
            length = prompt_length(sample.content, processor)
        except ValueError as error:
            raise ValueError(f"{benchmark}: sample {sample.id!r}: {error}") from None
        if length > longest:
            longest, where = length, f"{benchmark} sample {sample.id!r}"
    needed = longest + config.max_new_tokens
    print(f"vLLM max_model_len {needed}: the longest prompt to generate ({where or 'none'}, {longest} tokens) + "
          f"--max-new-tokens {config.max_new_tokens} (--max-model-len N sets it without counting)", file=sys.stderr)
    return needed


class VLLMGenerator:
    """Responses of a vLLM engine (module docstring). config: a GenerationConfig whose max_model_len is set (the
    runner derives it when it is 0: :func:`needed_max_model_len`)."""

    def __init__(self, model_dir: str, config):
        from vllm import LLM, SamplingParams

        from megatron_avar.models import hf_inference
        from megatron_avar.processor import load_processor
        from megatron_avar.vllm_inputs import MAX_IMAGES_PER_PROMPT

        if config.max_model_len < 1:
            raise ValueError("VLLMGenerator needs generation.max_model_len (0 is resolved by the runner: "
                             "eval.vllm_backend.needed_max_model_len)")
        self.config = config
        self.processor = load_processor(model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        mm_kwargs = {k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v}
        self.image_token_id = int(self.processor.image_token_id)
        # normalised on the CPU in float32 like the HF path's processor (vLLM's default defers it to the GPU)
        self.llm = LLM(model=model_dir, tensor_parallel_size=config.tensor_parallel_size, seed=config.seed,
                       dtype="bfloat16" if config.dtype == "auto" else config.dtype,
                       max_model_len=config.max_model_len, limit_mm_per_prompt={"image": MAX_IMAGES_PER_PROMPT,
                                                                                "video": 0},
                       mm_processor_kwargs=mm_kwargs or None, mm_device_do_normalize=False)
        # the HF backend's stop ids (hf_inference.stop_token_ids: the checkpoint's eos, the tokenizer's and
        # <|im_end|>); vLLM alone stops at the first two only, and would write past the end of the turn
        stop = hf_inference.stop_token_ids(self.processor.tokenizer, _generation_config(model_dir))
        self.sampling = SamplingParams(
            max_tokens=config.max_new_tokens, seed=config.seed, skip_special_tokens=False, repetition_penalty=1.0,
            stop_token_ids=stop,
            temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p if config.do_sample else 1.0,
            top_k=(config.top_k or -1) if config.do_sample else -1,
        )

    def _prompt(self, sample) -> dict:
        """vLLM's token prompt of ``sample`` (module docstring); PromptDoesNotFitError where it does not fit."""
        from megatron_avar.eval.generation import PromptDoesNotFitError
        from megatron_avar.roles import render_conversation
        from megatron_avar.vllm_inputs import token_prompt

        check_image_count(sample)
        rendered = render_conversation([{"role": "user", "content": sample.content}], self.processor,
                                       add_generation_prompt=True)
        length, config = len(rendered.input_ids), self.config
        if length + config.max_new_tokens > config.max_model_len:
            raise PromptDoesNotFitError(
                f"sample {sample.id!r} has a {length}-token prompt: with --max-new-tokens {config.max_new_tokens} it "
                f"needs --max-model-len >= {length + config.max_new_tokens}, more than the {config.max_model_len} vLLM "
                "was started with. Raise --max-model-len (or leave it out: the default, 0, derives it from the data), "
                "or lower --max-pixels or --max-new-tokens")
        return token_prompt(rendered.input_ids, rendered.pixel_values, rendered.image_grid_thw,
                            self.processor.image_processor, self.image_token_id)

    def generate(self, samples) -> list[str]:
        outputs = self.llm.generate([self._prompt(s) for s in samples], self.sampling)
        return [output.outputs[0].text for output in outputs]


def _generation_config(model_dir: str):
    """The checkpoint's generation_config.json as transformers reads it, or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None

