"""A toy Qwen2.5-VL checkpoint: the real tokenizer and processor around tiny random weights.

No weights can be downloaded on the machines this project is developed and tested on, yet every stage
(SFT, VAS, interventions, GRPO, eval, the quickstart) starts from "an HF Qwen2.5-VL checkpoint directory".
:func:`write_toy_checkpoint` writes one that every stage reads exactly like a real one: safetensors +
config.json with the real special-token ids (image pad 151655, vision start/end 151652/151653) and a
vocabulary covering the real tokenizer, plus the tokenizer, chat template and image-processor files.

    avar-style:  write_toy_checkpoint("runs/toy-qwen2.5-vl")      # ~40 MB, a few seconds on a CPU
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ToyModelConfig", "toy_hf_config", "write_toy_checkpoint"]

# Real Qwen2.5-VL special-token ids (the toy model must read real rendered conversations).
_IMAGE_TOKEN_ID, _VIDEO_TOKEN_ID = 151655, 151656
_VISION_START_ID, _VISION_END_ID = 151652, 151653
_ENDOFTEXT_ID, _IM_END_ID = 151643, 151645
_TOY_VOCAB_SIZE = 151936  # Qwen2.5-VL-3B's padded vocabulary: holds the 151665 real tokens + 4 reasoning tokens


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy model; defaults exercise GQA, several layers, windowed + full vision attention.

    num_layers: language decoder layers. hidden_size / num_heads / num_kv_heads: the LM attention shape
    (head dim = hidden_size // num_heads; mrope sections are derived from it). vision_depth: vision blocks,
    the last one full attention. min_pixels / max_pixels: image preprocessing bounds written into the
    checkpoint (small, so an image costs 4-64 patches). seed: the weights' random seed.
    """

    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 32
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    seed: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) and "
                             f"num_heads by num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 8:
            raise ValueError(f"head dim {self.hidden_size // self.num_heads} must be a multiple of 8 (mrope sections)")
        if self.vision_depth < 1 or self.num_layers < 1:
            raise ValueError("num_layers and vision_depth must be at least 1")


def toy_hf_config(toy: ToyModelConfig = ToyModelConfig()):
    """The transformers `Qwen2_5_VLConfig` of the toy model (real token ids, tiny sizes, tied embeddings)."""
    from transformers import Qwen2_5_VLConfig

    half_rotary = toy.hidden_size // toy.num_heads // 2
    temporal = half_rotary // 4  # Qwen2.5-VL splits the rotary half as 1/4 t, 3/8 h, 3/8 w ([16, 24, 24] of 64)
    mrope_section = [temporal, (half_rotary - temporal) // 2, half_rotary - temporal - (half_rotary - temporal) // 2]
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=_TOY_VOCAB_SIZE, hidden_size=toy.hidden_size, intermediate_size=toy.intermediate_size,
            num_hidden_layers=toy.num_layers, num_attention_heads=toy.num_heads,
            num_key_value_heads=toy.num_kv_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
            bos_token_id=_ENDOFTEXT_ID, eos_token_id=_IM_END_ID, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": mrope_section, "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=toy.vision_depth, hidden_size=toy.vision_hidden_size, intermediate_size=2 * toy.vision_hidden_size,
            num_heads=2, out_hidden_size=toy.hidden_size, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[toy.vision_depth - 1],
        ),
        image_token_id=_IMAGE_TOKEN_ID, video_token_id=_VIDEO_TOKEN_ID, vision_start_token_id=_VISION_START_ID,
        # (transformers 5 configs take other fields through __post_init__(**kwargs), which their typed __init__ hides)
        vision_end_token_id=_VISION_END_ID, bos_token_id=_ENDOFTEXT_ID, eos_token_id=_IM_END_ID,  # pyright: ignore[reportCallIssue]
        pad_token_id=_ENDOFTEXT_ID, tie_word_embeddings=True,  # pyright: ignore[reportCallIssue]
    )


def write_toy_checkpoint(out_dir: str | Path, toy: ToyModelConfig = ToyModelConfig(), *,
                         reasoning_tokens: bool = True, overwrite: bool = False) -> Path:
    """Write a toy HF Qwen2.5-VL checkpoint directory (fp32 safetensors, config, tokenizer, processor).

    Weights are drawn with std 0.08 (norms 1 + 0.1·noise) so that attention is far from uniform and every
    layer matters. ``reasoning_tokens``: the tokenizer carries `<think>`/`</think>`/`<answer>`/`</answer>`
    (inside the vocabulary, no resize). Refuses an existing non-empty directory unless ``overwrite``.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.processor import load_processor

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; choose another directory or pass overwrite=True")
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is drawn below: HF's own initialisation would be thrown away (~30 s at 7B)
        model = Qwen2_5_VLForConditionalGeneration(toy_hf_config(toy))
    model.tie_weights()
    generator = torch.Generator().manual_seed(toy.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.08 * noise)
    model.generation_config.eos_token_id = [_IM_END_ID, _ENDOFTEXT_ID]
    model.generation_config.pad_token_id = _ENDOFTEXT_ID
    model.save_pretrained(out)
    processor = load_processor(None, min_pixels=toy.min_pixels, max_pixels=toy.max_pixels,
                               reasoning_tokens=reasoning_tokens)
    processor.save_pretrained(out)
    (out / "avar_toy.json").write_text(json.dumps({"toy_model_config": toy.__dict__}, indent=2) + "\n")
    return out
