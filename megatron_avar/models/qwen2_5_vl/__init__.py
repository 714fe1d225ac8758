"""Qwen2.5-VL (3B-72B) on megatron-core: config, tensor-parallel vision encoder, language model, HF mapping.

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig, MegatronSettings, Qwen25VLModel
    config = Qwen25VLConfig.from_hf(hf_dir)
    model = Qwen25VLModel(config, MegatronSettings(tensor_model_parallel_size=2), pg_collection=pgs)
    load_hf_state_dict(model, hf_state_dict, config)        # hf_mapping: both directions, any TP

Modules that build megatron modules import megatron-core (seconds); they are loaded on first use, so the
config, position and mapping functions stay cheap to import.
"""

import importlib

from megatron_avar.models.qwen2_5_vl.config import (
    MegatronSettings,
    Qwen25VLConfig,
    Qwen25VLTextConfig,
    Qwen25VLVisionConfig,
    build_transformer_configs,
)
from megatron_avar.models.qwen2_5_vl.positions import image_token_counts, mrope_position_ids

_LAZY = {
    "Qwen25VLModel": "model",
    "language_block_spec": "model",
    "Qwen25VisionModel": "vision",
    "hf_to_megatron": "hf_mapping",
    "megatron_to_hf": "hf_mapping",
    "load_hf_state_dict": "hf_mapping",
    "export_hf_state_dict": "hf_mapping",
    "full_megatron_state": "hf_mapping",
}

# (the lazy names, loaded by __getattr__, are spliced in: pyright reads only a literal list)
__all__ = [  # pyright: ignore[reportUnsupportedDunderAll]
    "MegatronSettings",
    "Qwen25VLConfig",
    "Qwen25VLTextConfig",
    "Qwen25VLVisionConfig",
    "build_transformer_configs",
    "image_token_counts",
    "mrope_position_ids",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
