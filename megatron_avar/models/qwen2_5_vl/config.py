"""Typed Qwen2.5-VL configuration, read from a Hugging Face config, and the megatron-core configs built from it.

    config = Qwen25VLConfig.from_hf("/path/to/Qwen2.5-VL-7B-Instruct")      # dir, config.json, dict or HF config
    configs = build_transformer_configs(config, MegatronSettings(tensor_model_parallel_size=2))
    configs.language, configs.vision, configs.merger                          # megatron TransformerConfigs

Only what the megatron implementation here reproduces exactly is accepted; anything else (sliding-window
attention, rope scaling, other activations, non-integer patch sizes) is refused with a ValueError naming the
field, instead of silently building a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_avar import platform

__all__ = [
    "Qwen25VLTextConfig",
    "Qwen25VLVisionConfig",
    "Qwen25VLConfig",
    "MegatronSettings",
    "Qwen25VLTransformerConfigs",
    "build_transformer_configs",
]

# The Qwen2.5-VL vision RMSNorms (blocks and merger.ln_q) hard-code eps=1e-6, independent of the text config.
VISION_RMS_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Qwen25VLTextConfig:
    """The language model (a Qwen2 decoder with multimodal rope)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # HF num_key_value_heads (GQA)
    ffn_hidden_size: int  # HF intermediate_size (SwiGLU)
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    mrope_section: tuple[int, ...]  # rotary frequencies given to (t, h, w): 3 sizes summing to head_dim / 2
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        _require_positive(self, "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                          "num_query_groups", "ffn_hidden_size", "max_position_embeddings")
        _require_divisible(self, "hidden_size", "num_attention_heads")
        _require_divisible(self, "num_attention_heads", "num_query_groups")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"text mrope_section={list(self.mrope_section)} must be 3 sizes summing to "
                             f"head_dim/2 = {self.head_dim // 2}")


@dataclasses.dataclass(frozen=True)
class Qwen25VLVisionConfig:
    """The vision transformer with its 2x2 patch merger."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int  # SwiGLU MLP width of each block
    out_hidden_size: int  # merger output = the language model's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # in pixels; windows are window_size // (patch_size * spatial_merge_size) merged tokens wide
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # 0-based blocks attending over the whole image
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch (channels x temporal x patch x patch), as the processor emits it."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def window_merged_tokens(self) -> int:
        """Side of an attention window in merged (2x2-patch) tokens."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    def __post_init__(self):
        _require_positive(self, "depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                          "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels", "window_size")
        _require_divisible(self, "hidden_size", "num_heads")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be divisible by 4: the 2-D rotary embedding "
                             "gives head_dim/4 frequencies to each of the h and w axes")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"vision window_size={self.window_size} must be a multiple of patch_size * "
                             f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision fullatt_block_indexes {bad} are outside [0, depth={self.depth})")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: Qwen25VLTextConfig
    vision: Qwen25VLVisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size={self.vision.out_hidden_size} must equal the text "
                             f"hidden_size={self.text.hidden_size}: merged patches replace token embeddings")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} is outside the vocabulary "
                             f"[0, {self.text.vocab_size})")

    def check_layout(self, *, tp: int, pp: int, vpp: int = 1) -> None:
        """ValueError naming what does not split, when this model cannot be built at TP=tp x PP=pp (with vpp
        model chunks per pipeline rank): megatron's own checks are assertions inside every rank."""
        if tp < 1 or pp < 1 or vpp < 1:
            raise ValueError(f"tensor, pipeline and virtual pipeline sizes must be >= 1, got {tp}, {pp}, {vpp}")
        tensor = ("tensor-parallel ranks", "parallel.tensor_model_parallel_size (convert: --tp)")
        pipeline = (("pipeline stages x model chunks", "parallel.pipeline_model_parallel_size x "
                     "parallel.virtual_pipeline_model_parallel_size") if vpp > 1 else
                    ("pipeline stages", "parallel.pipeline_model_parallel_size (convert: --pp)"))
        splits = [(self.text.num_layers, pp * vpp, "language-model layers", pipeline),
                  (self.text.num_attention_heads, tp, "attention heads", tensor),
                  (self.text.num_query_groups, tp, "key/value heads", tensor),
                  (self.vision.num_heads, tp, "vision attention heads", tensor)]
        tensor_counts = math.gcd(*(count for count, _, _, split in splits if split is tensor))
        for count, ways, what, split in splits:
            if count % ways:
                over, setting = split
                fits = tensor_counts if split is tensor else count  # TP must divide every head count
                divisors = [d for d in range(1, fits + 1) if fits % d == 0]
                raise ValueError(f"this model's {count} {what} do not split over {ways} {over}: choose "
                                 f"{setting} among {divisors}")

    @classmethod
    def from_hf(cls, source: Any) -> Qwen25VLConfig:
        """Read a Hugging Face Qwen2.5-VL config: a model directory, a config.json path, its dict, or a
        `transformers.Qwen2_5_VLConfig`. Legacy hub layouts (text fields at the top level, `rope_scaling`
        with type "mrope") are normalised by transformers itself."""
        from transformers import Qwen2_5_VLConfig

        if isinstance(source, (str, Path)):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ValueError(f"{path} not found: a Qwen2.5-VL model folder holds config.json")
            try:
                source = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{path} is not a JSON config ({error}): give the model folder or its "
                                 "config.json") from None
            if not isinstance(source, Mapping):
                raise ValueError(f"{path} holds a JSON {type(source).__name__}, not a config object: give the model "
                                 "folder or its config.json")
        if isinstance(source, Mapping):
            if source.get("model_type") != "qwen2_5_vl":  # (missing: transformers would fill in its defaults)
                raise ValueError(f"model_type={source.get('model_type')!r}: only 'qwen2_5_vl' is supported (a "
                                 "Hugging Face Qwen2.5-VL config.json names it)")
            try:
                source = Qwen2_5_VLConfig(**source)
            except Exception as error:  # transformers' field checks (a string for an int, ...), of several types
                said = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or repr(error)
                raise ValueError(f"the Qwen2.5-VL config is refused by transformers ({said}): fix that field of "
                                 "config.json") from None
        if not isinstance(source, Qwen2_5_VLConfig):
            raise TypeError(f"expected a path, dict or transformers.Qwen2_5_VLConfig, got {type(source).__name__}")
        return cls(
            text=_text_from_hf(source.text_config, bool(source.tie_word_embeddings)),
            vision=_vision_from_hf(source.vision_config),
            image_token_id=source.image_token_id,
            video_token_id=source.video_token_id,
            vision_start_token_id=source.vision_start_token_id,
            vision_end_token_id=source.vision_end_token_id,
        )


def _text_from_hf(hf, tie_word_embeddings: bool) -> Qwen25VLTextConfig:
    if hf.hidden_act != "silu":
        raise ValueError(f"text hidden_act={hf.hidden_act!r}: only 'silu' (SwiGLU) is supported")
    if getattr(hf, "use_sliding_window", False):
        raise ValueError("text use_sliding_window=True: sliding-window attention is not supported")
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"text rope_type={rope['rope_type']!r}: only the default (unscaled) multimodal rope "
                         "is supported")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        raise ValueError(f"text head_dim={head_dim} must be hidden_size / num_attention_heads")
    return Qwen25VLTextConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads or hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        rope_theta=float(rope["rope_theta"]),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=tie_word_embeddings,
        mrope_section=tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=hf.max_position_embeddings,
    )


def _vision_from_hf(hf) -> Qwen25VLVisionConfig:
    if hf.hidden_act != "silu":
        raise ValueError(f"vision hidden_act={hf.hidden_act!r}: only 'silu' (SwiGLU blocks) is supported")
    for name in ("patch_size", "temporal_patch_size"):
        if not isinstance(getattr(hf, name), int):
            raise ValueError(f"vision {name}={getattr(hf, name)!r}: only a single int is supported")
    rope = dict(hf.rope_parameters or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ValueError(f"vision rope_type={rope['rope_type']!r}: only 'axial' is supported")
    return Qwen25VLVisionConfig(
        depth=hf.depth,
        hidden_size=hf.hidden_size,
        num_heads=hf.num_heads,
        intermediate_size=hf.intermediate_size,
        out_hidden_size=hf.out_hidden_size,
        patch_size=hf.patch_size,
        temporal_patch_size=hf.temporal_patch_size,
        spatial_merge_size=hf.spatial_merge_size,
        in_channels=hf.in_channels,
        window_size=hf.window_size,
        fullatt_block_indexes=tuple(int(i) for i in hf.fullatt_block_indexes),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


RECOMPUTE_MODES = ("none", "selective", "full")
INIT_DEVICES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class MegatronSettings:
    """How the megatron modules are built, independent of the architecture."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    params_dtype: torch.dtype = torch.float32  # also the compute dtype: bf16 turns on megatron's bf16 mode
    # GPU fusions (bias+SwiGLU, bias+dropout+add; grad-accumulation where apex's / megatron's compiled
    # extension is installed). None: on exactly when CUDA is present (platform); on CPU they would fall back to
    # torch.compile (+14 s, no gain). RoPE is never fused: Transformer Engine's fused THD rope indexes the
    # frequencies by position inside each packed sample, which is not Qwen2.5-VL's multimodal (3-D) rotary
    # position of each token.
    fused_kernels: bool | None = None
    perform_initialization: bool = True  # False when weights are loaded right after (saves time)
    # Where megatron allocates (and, with perform_initialization, randomly initialises) the parameters:
    # "cpu": each weight's whole master copy is drawn on the host and split by tensor-parallel rank (the same
    # weights at any TP size), at host speed: ~35 s for 2B parameters on this project's 2-core machine, and
    # every rank draws every full weight of its stage (72B at PP=4: ~18B draws per rank, minutes; a resume draws
    # none: perform_initialization=False). Conversion and CPU runs build here.
    # "cuda": on the current GPU, each tensor-parallel rank drawing its own shard from megatron's per-rank RNG
    # streams (the same distribution, other values at another TP size), in seconds, with no host copy.
    # Either way each pipeline stage draws from its own seed, train.seed + 100 x its pipeline rank (megatron's
    # rule; ``build.init_model_parallel``).
    init_device: str = "cpu"
    init_on_meta_device: bool = False  # build without memory, e.g. to count parameters of a 72B model
    # Activation recompute of the decoder: "none"; "selective" (megatron's core-attention recompute);
    # "full" (every decoder layer's activations recomputed in the backward pass: the 72B setting).
    recompute: str = "none"
    # megatron's sequence parallelism (needs tensor_model_parallel_size > 1): norms, residuals and dropout-free
    # activations between the tensor-parallel regions hold 1/tp of the sequence, in the language model and in
    # the vision encoder; attention still sees every token (the qkv projection gathers the sequence).
    sequence_parallel: bool = False
    # model chunks per pipeline rank (megatron's interleaved schedule); 1: one stage per rank
    virtual_pipeline_model_parallel_size: int = 1
    # context parallelism of the language model (models.qwen2_5_vl.context_parallel); the vision encoder runs
    # whole on every context-parallel rank
    context_parallel_size: int = 1

    def __post_init__(self):
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("sequence_parallel splits the sequence over tensor-parallel ranks: it needs "
                             "tensor_model_parallel_size > 1")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={self.recompute!r}: allowed {', '.join(RECOMPUTE_MODES)}")
        if min(self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size) < 1:
            raise ValueError("tensor_model_parallel_size, pipeline_model_parallel_size and context_parallel_size "
                             f"must be >= 1, got {self.tensor_model_parallel_size}, "
                             f"{self.pipeline_model_parallel_size} and {self.context_parallel_size}")
        if self.params_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"params_dtype={self.params_dtype}: allowed torch.float32, torch.bfloat16")
        if self.init_device not in INIT_DEVICES:
            raise ValueError(f"init_device={self.init_device!r}: allowed {', '.join(INIT_DEVICES)}")


@dataclasses.dataclass(frozen=True)
class Qwen25VLTransformerConfigs:
    language: Any  # megatron TransformerConfig of the decoder
    vision: Any  # of the vision blocks (never pipelined: the vision tower lives on the first stage)
    merger: Any  # of the 2x2 patch merger MLP (hidden_size = its output size)


def build_transformer_configs(config: Qwen25VLConfig, settings: MegatronSettings = MegatronSettings()
                              ) -> Qwen25VLTransformerConfigs:
    """megatron TransformerConfigs for the language model, the vision blocks and the merger.

    Raises ValueError when a size does not split over ``settings.tensor_model_parallel_size``.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = settings.tensor_model_parallel_size
    text, vision = config.text, config.vision
    for owner, field, value in (
        ("text", "vocab_size", text.vocab_size), ("text", "num_query_groups", text.num_query_groups),
        ("text", "ffn_hidden_size", text.ffn_hidden_size), ("vision", "num_heads", vision.num_heads),
        ("vision", "intermediate_size", vision.intermediate_size),
    ):
        if value % tp:
            raise ValueError(f"{owner} {field}={value} does not split over tensor_model_parallel_size={tp}")
    chunks = settings.pipeline_model_parallel_size * settings.virtual_pipeline_model_parallel_size
    if settings.virtual_pipeline_model_parallel_size > 1 and text.num_layers % chunks:
        raise ValueError(f"text num_layers={text.num_layers} does not split into pipeline_model_parallel_size x "
                         f"virtual_pipeline_model_parallel_size = {chunks} model chunks of equal size")
    fused = platform.cuda_available() if settings.fused_kernels is None else settings.fused_kernels
    # The settings both TransformerConfigs share (keyword arguments of differing types: hence Any).
    common: dict[str, Any] = dict(
        params_dtype=settings.params_dtype,
        pipeline_dtype=settings.params_dtype,
        bf16=settings.params_dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        sequence_parallel=settings.sequence_parallel,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=settings.init_device == "cpu",
        perform_initialization=settings.perform_initialization and not settings.init_on_meta_device,
        init_model_with_meta_device=settings.init_on_meta_device,
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=False,  # no layer runs megatron's DotProductAttention (models.role_mass_attention)
        apply_rope_fusion=False,
        gradient_accumulation_fusion=fused and platform.cuda_extension_available("fused_weight_gradient_mlp_cuda"),
    )
    language = TransformerConfig(
        num_layers=text.num_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_query_groups,
        kv_channels=text.head_dim,
        ffn_hidden_size=text.ffn_hidden_size,
        layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        mrope_section=list(text.mrope_section),
        pipeline_model_parallel_size=settings.pipeline_model_parallel_size,
        context_parallel_size=settings.context_parallel_size,
        virtual_pipeline_model_parallel_size=(settings.virtual_pipeline_model_parallel_size
                                              if settings.virtual_pipeline_model_parallel_size > 1 else None),
        # gloo pairs a batch of sends and receives between the same two ranks in the order they are posted, and
        # megatron's batched order is not the same on both sides: with two pipeline ranks the interleaved schedule
        # (activation and gradient in flight to the same peer) would swap them. Its unbatched p2p posts in an
        # order that pairs on either backend.
        batch_p2p_comm=platform.distributed_backend() == "nccl",
        **_recompute_options(settings.recompute),
        **common,
    )
    vision_config = TransformerConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.intermediate_size,
        layernorm_epsilon=VISION_RMS_NORM_EPS,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        # Full recompute also recomputes each vision block (Qwen25VisionModel.forward); selective recompute has
        # nothing to do there (window attention keeps no scores).
        **(_recompute_options("full") if settings.recompute == "full" else {}),
        **common,
    )
    merger = dataclasses.replace(
        vision_config,
        num_layers=1,
        hidden_size=vision.out_hidden_size,
        ffn_hidden_size=vision.hidden_size * vision.spatial_merge_size**2,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as torch.nn.GELU() in the HF merger
        # megatron's fused bias+GELU is the tanh approximation (4.7e-4 off per activation, its gradient too): the
        # merger would differ from HF's on every GPU run. SwiGLU's fusion, elsewhere, is exact.
        bias_activation_fusion=False,
    )
    return Qwen25VLTransformerConfigs(language=language, vision=vision_config, merger=merger)


def _require_positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name}={value!r} must be a positive int")


def _require_divisible(obj, numerator, denominator):
    a, b = getattr(obj, numerator), getattr(obj, denominator)
    if a % b:
        raise ValueError(f"{type(obj).__name__}.{numerator}={a} must be divisible by {denominator}={b}")


def _recompute_options(mode: str) -> dict[str, Any]:
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}
