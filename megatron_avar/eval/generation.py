"""Generation backends for evaluation: Hugging Face ``generate`` (CPU or one GPU) and vLLM (GPU, see
`megatron_avar.eval.vllm_backend`). Both take :class:`~megatron_avar.eval.benchmarks.base.Sample` objects and
return the raw response text, `<think>`/`<answer>` tags kept (they are special tokens in AVAR checkpoints,
so decoding must not skip special tokens; the response is cut at the first end-of-turn token instead).

Prompts are rendered with `megatron_avar.roles.render_conversation(add_generation_prompt=True)`: one user
turn (images and text in the benchmark's order), no system turn (the template's default system prompt is
rendered, as Qwen2.5-VL and VLMEvalKit do), so image token counts come from the checkpoint's processor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from megatron_avar.config import SEED_LIMIT, VLLM_SEED_LIMIT, check_seed
from megatron_avar.models import hf_inference
from megatron_avar.models.hf_inference import DTYPES

__all__ = ["GenerationConfig", "HFGenerator", "make_generator", "applied_settings", "PromptDoesNotFitError"]

BACKENDS = ("hf", "vllm")
# field -> (the setting it needs to apply, its flag, the flag that gives that setting): a field set to another value
# than its default without that setting would change nothing but what run_config.json says the run did
_APPLIES_ONLY_WITH = {
    "temperature": ("do_sample", "--temperature", "--do-sample"),
    "top_p": ("do_sample", "--top-p", "--do-sample"),
    "top_k": ("do_sample", "--top-k", "--do-sample"),
    "seed": ("do_sample", "--seed", "--do-sample"),
    "alpha_img": ("intervene", "--alpha-img", "--intervene"),
    "alpha_sys": ("intervene", "--alpha-sys", "--intervene"),
    "intervene_mode": ("intervene", "--intervene-mode", "--intervene"),
    "intervene_layers": ("intervene", "--intervene-layers", "--intervene"),
    "tensor_parallel_size": ("vllm", "--tensor-parallel-size", "--backend vllm"),
    "max_model_len": ("vllm", "--max-model-len", "--backend vllm"),
}


def _applies(settings: dict, condition: str) -> bool:
    """Whether a run with ``settings`` (GenerationConfig fields) uses the fields that need ``condition``."""
    return settings.get("backend") == "vllm" if condition == "vllm" else bool(settings.get(condition))


def applied_settings(settings: dict) -> dict:
    """``settings`` (a GenerationConfig as a dict, e.g. a run_config.json's) without the fields that run did not use
    (the sampling fields of a greedy run, ...): what two runs must share to generate alike. A folder recorded before
    such fields were refused may hold values that never applied."""
    return {key: value for key, value in settings.items()
            if key not in _APPLIES_ONLY_WITH or _applies(settings, _APPLIES_ONLY_WITH[key][0])}


@dataclass(frozen=True)
class GenerationConfig:
    """How responses are generated (the same for every benchmark of a run).

    max_new_tokens: response length limit (VLMEvalKit uses 2048 for Qwen2.5-VL).
    do_sample: False = greedy (the default, as in VLMEvalKit); True samples with temperature / top_p / top_k
        (top_k 0 = off), reproducibly: the torch seed is reset to ``seed`` before every batch (0 <= seed < 2**63;
        vLLM: < 2**32).
    batch_size: prompts per ``generate`` call (HF backend; left padding). Greedy outputs do not depend on it.
    min_pixels / max_pixels: image preprocessing bounds; None keeps the checkpoint's processor config.
        VLMEvalKit's Qwen2.5-VL setting is 1280*28*28 / 16384*28*28 (small images are upscaled).
    dtype: model weights; "auto" = bfloat16 on CUDA, float32 on CPU.
    backend: "hf" (transformers generate) or "vllm" (GPU only). tensor_parallel_size: vLLM only.
    max_model_len: vLLM only: the tokens (prompt + response) of one sequence, what vLLM reserves KV cache for
        (without it, the model's whole context: 128k for Qwen2.5-VL). 0 = the longest prompt the run generates for
        + max_new_tokens, counted from the data before vLLM starts (`eval.vllm_backend.needed_max_model_len`). A
        prompt that does not fit with max_new_tokens is refused, naming it: responses are never cut short by it,
        so it changes no answer and a resume may use another value.
    intervene: apply the training-free attention intervention (docs/method.md, 'Training-free intervention'; hf
        backend) with alpha_img,
        alpha_sys, intervene_mode ("multiplicative" | "additive") in the decoder layers intervene_layers
        ("middle", "all", "A-B" or "i,j"), on the user-text and generated queries after the image.
    """

    max_new_tokens: int = 2048
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 1
    min_pixels: int | None = None
    max_pixels: int | None = None
    dtype: str = "auto"
    backend: str = "hf"
    tensor_parallel_size: int = 1
    max_model_len: int = 0
    intervene: bool = False
    alpha_img: float = 0.15
    alpha_sys: float = 0.05
    intervene_mode: str = "multiplicative"
    intervene_layers: str = "middle"

    def __post_init__(self):
        self._refuse_unused_settings()
        if self.intervene and self.backend != "hf":
            raise ValueError("generation.intervene needs the hf backend (vLLM has no per-role logit edits); "
                             "use --backend hf")
        if self.intervene:  # alphas and mode checked now, not after the model has loaded
            from megatron_avar.analysis.intervention import InterventionSpec

            InterventionSpec(alpha_img=self.alpha_img, alpha_sys=self.alpha_sys, mode=self.intervene_mode)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}")
        if self.backend == "vllm" and self.do_sample:  # checked now, not after vLLM has loaded the model
            from megatron_avar.grpo.vllm_requests import check_vllm_temperature

            check_vllm_temperature(self.temperature, prefix="generation.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_seed(self.seed, "generation.seed (--seed)", limit=VLLM_SEED_LIMIT if self.backend == "vllm" else
                   SEED_LIMIT, where=f" with the {self.backend} backend")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0 (0: derived from the data), got {self.max_model_len}")
        if self.max_model_len and self.max_model_len <= self.max_new_tokens:
            raise ValueError(f"max_model_len ({self.max_model_len}) must exceed max_new_tokens "
                             f"({self.max_new_tokens}): it holds the prompt and the response (or 0: derived from the "
                             "data)")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")

    def _refuse_unused_settings(self) -> None:
        """ValueError for a field set away from its default that this run would not use (a temperature without
        sampling, an alpha without the intervention, TP without vLLM): it would be ignored, yet recorded."""
        defaults = {f.name: f.default for f in fields(self)}
        settings = asdict(self)
        for name, (condition, flag, needed) in _APPLIES_ONLY_WITH.items():
            if settings[name] != defaults[name] and not _applies(settings, condition):
                raise ValueError(f"generation.{name}={settings[name]!r} ({flag}) applies only with {needed}, which "
                                 f"this run lacks: add {needed}, or leave {flag} out (it would be ignored)")

    def to_dict(self) -> dict:
        return asdict(self)


class PromptDoesNotFitError(ValueError):
    """A prompt that does not fit the vLLM engine: longer than its max_model_len with max_new_tokens, or with more
    images than it takes per prompt (the message names the sample; the runner adds the benchmark)."""


class HFGenerator:
    """Greedy or sampled generation with ``Qwen2_5_VLForConditionalGeneration.generate`` (model loading, stop and
    pad ids and left-padded batches from ``models.hf_inference``, shared with the rollout backend and intervene)."""

    def __init__(self, model_dir: str, config: GenerationConfig):
        from megatron_avar.platform import device_for_local_rank
        from megatron_avar.processor import load_processor

        self.config = config
        self.processor = load_processor(model_dir, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        self.device = device_for_local_rank()
        self.model = hf_inference.load_model(model_dir, device=self.device,
                                             dtype=hf_inference.resolve_dtype(config.dtype, self.device))
        tokenizer = self.processor.tokenizer
        self.stop_ids = set(hf_inference.stop_token_ids(tokenizer, self.model.generation_config))
        self.pad_id = hf_inference.pad_token_id(tokenizer, self.model.generation_config)
        # The decoding reported, whatever the checkpoint's generation_config.json holds (hf_inference.decoding_config).
        self.generation_config = hf_inference.decoding_config(
            max_new_tokens=config.max_new_tokens, pad_token_id=self.pad_id, stop_ids=self.stop_ids,
            do_sample=config.do_sample, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        self.intervention = None
        if config.intervene:
            from megatron_avar.analysis.intervention import InterventionSpec
            from megatron_avar.models.layer_sets import parse_layers

            layers = parse_layers(config.intervene_layers, self.model.config.get_text_config().num_hidden_layers)
            spec = InterventionSpec(alpha_img=config.alpha_img, alpha_sys=config.alpha_sys,
                                    mode=config.intervene_mode, layers=layers)
            # α = 0 edits nothing: Hugging Face's own generation, not the hook's kernels (whose bf16 rounding on a
            # GPU differs from HF's attention and could flip a greedy token against a plain `avar eval` baseline)
            self.intervention = None if spec.is_identity else spec

    def _batch(self, samples) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded input_ids / attention_mask / mm_token_type_ids [B, S] and concatenated images, and the
        token roles [B, S] (PAD = -1) for the intervention (``hf_inference.collate_left_padded``)."""
        from megatron_avar.roles import render_conversation

        rendered = [render_conversation([{"role": "user", "content": s.content}], self.processor,
                                        add_generation_prompt=True) for s in samples]
        batch, roles = hf_inference.collate_left_padded(rendered, pad_token_id=self.pad_id,
                                                        image_token_id=self.processor.image_token_id)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return {k: v.to(self.device) for k, v in batch.items()}, roles.to(self.device)

    def _decode(self, ids: list[int]) -> str:
        return self.processor.tokenizer.decode(hf_inference.cut_at_stop(ids, self.stop_ids), skip_special_tokens=False)

    @torch.inference_mode()
    def generate(self, samples) -> list[str]:
        """Responses for ``samples`` (in order), at most ``batch_size`` per ``generate`` call."""
        config, responses = self.config, []
        for start in range(0, len(samples), config.batch_size):
            batch, roles = self._batch(samples[start:start + config.batch_size])
            if config.do_sample:
                torch.manual_seed(config.seed)
            # (pyright: transformers types generate's self as a Protocol its own model classes do not meet)
            if self.intervention is None:
                output = self.model.generate(  # pyright: ignore[reportAttributeAccessIssue]
                    **batch, generation_config=self.generation_config)
            else:
                from megatron_avar.analysis.hf_attention import RoleAttentionHook

                with RoleAttentionHook(self.model) as hook:
                    hook.set_batch(roles, intervention=self.intervention)
                    output = self.model.generate(  # pyright: ignore[reportAttributeAccessIssue]
                        **batch, generation_config=self.generation_config)
            prompt_length = batch["input_ids"].shape[1]
            responses += [self._decode(row[prompt_length:].tolist()) for row in output]
        return responses


def make_generator(model_dir: str, config: GenerationConfig):
    """The backend ``config.backend`` names. vLLM needs a CUDA machine with vLLM installed (the ``gpu``
    extra); it is imported only then. A damaged weight file is named first (vLLM's own error names none; the hf
    backend's loader, ``models.hf_inference.load_model``, checks as it loads)."""
    if config.backend == "vllm":
        from megatron_avar import platform
        from megatron_avar.models.hf_weights import check_weights_readable

        check_weights_readable(model_dir)
        if not platform.vllm_available():
            raise ValueError("--backend vllm needs CUDA and vLLM (pip install -e .[gpu]); use --backend hf on this "
                             "machine")
        from megatron_avar.eval.vllm_backend import VLLMGenerator

        return VLLMGenerator(model_dir, config)
    return HFGenerator(model_dir, config)
