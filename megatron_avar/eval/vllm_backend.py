"""vLLM generation backend (GPU only; imported only when `megatron_avar.platform.vllm_available()`).

UNTESTED: no machine this project is developed on has vLLM (it is a GPU-only extra). It follows vLLM 0.33's
offline multimodal API: ``LLM.generate([{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL, ...]}}],
SamplingParams)``, where ``ids`` are the conversation `render_conversation` renders for the HF backend with each
image's pads collapsed to one, and the images are rebuilt from its ``pixel_values``
(``megatron_avar.vllm_inputs``): vLLM sees the HF path's tokens and pixels, so the two backends' scores are
comparable. Tensor parallelism via ``tensor_parallel_size``. For data parallelism run one process per GPU group
with ``--num-shards N --shard-index i``, each with its own ``CUDA_VISIBLE_DEVICES``: vLLM does not read
LOCAL_RANK (with tensor_parallel_size 1 it takes the first visible GPU), and two engines on one GPU do not fit.
"""

from __future__ import annotations

__all__ = ["VLLMGenerator"]


class VLLMGenerator:
    def __init__(self, model_dir: str, config):
        from vllm import LLM, SamplingParams

        from megatron_avar.models import hf_inference
        from megatron_avar.processor import load_processor

        self.config = config
        self.processor = load_processor(model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        mm_kwargs = {k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v}
        self.image_token_id = int(self.processor.image_token_id)
        # normalised on the CPU in float32 like the HF path's processor (vLLM's default defers it to the GPU)
        self.llm = LLM(model=model_dir, tensor_parallel_size=config.tensor_parallel_size, seed=config.seed,
                       dtype="bfloat16" if config.dtype == "auto" else config.dtype,
                       limit_mm_per_prompt={"image": 8, "video": 0}, mm_processor_kwargs=mm_kwargs or None,
                       mm_device_do_normalize=False)
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
        from megatron_avar.roles import render_conversation
        from megatron_avar.vllm_inputs import token_prompt

        rendered = render_conversation([{"role": "user", "content": sample.content}], self.processor,
                                       add_generation_prompt=True)
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

