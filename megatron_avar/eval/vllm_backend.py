"""vLLM generation backend (GPU only; imported only when `megatron_avar.platform.vllm_available()`).

UNTESTED: no machine this project is developed on has vLLM (it is a GPU-only extra). It follows vLLM's
documented offline multimodal API: ``LLM.generate([{"prompt": text, "multi_modal_data": {"image": [PIL,
...]}}], SamplingParams)``, where ``text`` is the chat template with ONE ``<|image_pad|>`` per image (vLLM
expands it), the same conversation `render_conversation` renders for the HF backend. Tensor parallelism
via ``tensor_parallel_size``; run one process per GPU group with disjoint ``--benchmarks`` for data
parallelism.
"""

from __future__ import annotations

import re

__all__ = ["VLLMGenerator"]


class VLLMGenerator:
    def __init__(self, model_dir: str, config):
        from vllm import LLM, SamplingParams

        from megatron_avar.models import hf_inference
        from megatron_avar.processor import load_processor

        self.config = config
        self.processor = load_processor(model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        mm_kwargs = {k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v}
        self.llm = LLM(model=model_dir, tensor_parallel_size=config.tensor_parallel_size, seed=config.seed,
                       dtype="bfloat16" if config.dtype == "auto" else config.dtype,
                       limit_mm_per_prompt={"image": 8}, mm_processor_kwargs=mm_kwargs or None)
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

        rendered = render_conversation([{"role": "user", "content": sample.content}], self.processor,
                                       add_generation_prompt=True)
        pad = self.processor.image_token
        text = re.sub(f"(?:{re.escape(pad)})+", pad, rendered.text)  # vLLM expands each image's single pad
        images = [item["image"] for item in sample.content if item["type"] == "image"]
        return {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}

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

