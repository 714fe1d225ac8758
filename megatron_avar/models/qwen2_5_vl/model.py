"""Qwen2.5-VL on megatron-core: the vision encoder feeding a megatron GPTModel configured as Qwen2 with mrope.

    model = Qwen25VLModel(config, MegatronSettings(tensor_model_parallel_size=tp), pg_collection=pgs)
    logits = model(input_ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)  # [B, S, V/tp]

Pipeline parallelism: the vision encoder and the embeddings exist only on the first stage
(``pre_process``), the output layer only on the last (``post_process``); every stage needs the 3-D position
ids and the padding mask, which are cheap functions of the batch (:func:`mrope_position_ids`).

AVAR layers: :func:`language_block_spec` builds the decoder's layer specs and puts the role-mass core
attention (:class:`~megatron_avar.models.role_mass_attention.RoleMassCoreAttention`, or any module given)
into exactly the layers listed in ``role_mass_layers`` (0-based global layer indexes); every other layer
gets :class:`~megatron_avar.models.role_mass_attention.PlainCoreAttention` (the same attention, no masses).
Called with ``token_roles`` (and a ``mass_sink``), those layers hand
their per-role attention masses to the sink as they run — on whichever pipeline stage holds them.

Packed rows (several samples back to back in one row, ``segment_ids``): attention never crosses samples;
pass the per-sample position ids (:func:`mrope_position_ids` per sample, concatenated).

Every decoder layer's core attention is this project's (``models.role_mass_attention``): AVAR layers
:class:`RoleMassCoreAttention`, the others :class:`PlainCoreAttention` — the platform's fastest causal attention
with padding and packing taken from the token roles and ``segment_ids``, memory O(S), no [B, 1, S, S] mask.

Context parallelism (``MegatronSettings.context_parallel_size`` > 1): every rank of the CP group is called with
the whole rows; each rank encodes its share of the images and the ranks all-gather the image features, the
embedding runs on the whole rows, then the language model keeps this rank's tokens (``models.context_parallel``).
Logits and per-token losses are of those tokens, in ``context_parallel.local_positions`` order (``output_rows``
index them in that order).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Collection, Sequence

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_avar import platform
from megatron_avar.models.context_parallel import ContextSplit, gather_image_features, split_images
from megatron_avar.models.qwen2_5_vl.config import (
    MegatronSettings,
    Qwen25VLConfig,
    build_transformer_configs,
)
from megatron_avar.models.qwen2_5_vl.language_model import LanguageModel, check_output_rows
from megatron_avar.models.qwen2_5_vl.norm import TorchNorm
from megatron_avar.models.qwen2_5_vl.positions import mrope_position_ids
from megatron_avar.models.qwen2_5_vl.vision import Qwen25VisionModel
from megatron_avar.models.role_mass_attention import (
    MassSink,
    PlainCoreAttention,
    RoleLogitEdits,
    RoleMassCoreAttention,
    RoleMassParams,
)
from megatron_avar.roles import NUM_ROLES

__all__ = ["Qwen25VLModel", "language_layer_spec", "language_block_spec", "scatter_image_features",
           "repeat_image_features"]


def language_layer_spec(core_attention: type):
    """ModuleSpec of one Qwen2 decoder layer: Transformer Engine modules when the platform has them, megatron's
    local modules otherwise, with ``core_attention`` (a core-attention class of ``models.role_mass_attention``, or
    a ModuleSpec) in place of megatron's."""
    if platform.transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        # megatron's local norm refuses sequence parallelism; ours marks its weights for the TP grad all-reduce
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TorchNorm  # pyright: ignore[reportAttributeAccessIssue]
    # (megatron types ModuleSpec.submodules as object; a GPT layer spec holds TransformerLayerSubmodules)
    attention = spec.submodules.self_attention.submodules  # pyright: ignore[reportAttributeAccessIssue]
    attention.core_attention = core_attention
    return spec


def language_block_spec(language_config, *, role_mass_layers: Collection[int] = (),
                        role_mass_core_attention: type | None = None, pp_rank: int = 0,
                        vp_stage: int | None = None):
    """`TransformerBlockSubmodules` for the decoder layers of one pipeline stage (``pp_rank``, ``vp_stage``).

    Layers whose 0-based global index is in ``role_mass_layers`` get ``role_mass_core_attention`` (default:
    :class:`RoleMassCoreAttention`), the others :class:`PlainCoreAttention`.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    role_mass_layers = frozenset(role_mass_layers)
    outside = sorted(i for i in role_mass_layers if not 0 <= i < language_config.num_layers)
    if outside:
        raise ValueError(f"role_mass_layers {outside} are outside [0, num_layers={language_config.num_layers})")
    num_local = get_num_layers_to_build(language_config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(language_config, vp_stage=vp_stage, pp_rank=pp_rank)
    standard = language_layer_spec(PlainCoreAttention)
    with_masses = (language_layer_spec(role_mass_core_attention or RoleMassCoreAttention) if role_mass_layers
                   else standard)
    layer_specs = [with_masses if offset + i in role_mass_layers else standard for i in range(num_local)]
    if platform.transformer_engine_available():
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        final_norm = TorchNorm
    # (megatron's own block specs pass the norm class; its annotation asks for a ModuleSpec or a module)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=final_norm)  # pyright: ignore[reportArgumentType]


def repeat_image_features(features: torch.Tensor, image_grid_thw: torch.Tensor, image_sources: Sequence[int],
                          spatial_merge_size: int) -> torch.Tensor:
    """The features [N, H] of distinct images (grids ``image_grid_thw``, in order) laid out as the batch's images:
    image k is distinct image ``image_sources[k]``. Slices joined by a cat, so the backward adds a repeated image's
    gradients in a fixed order (deterministic, unlike an index_select's atomic adds on GPUs). Reads the grid on
    the host: free for the host tensor GRPO passes."""
    sizes = (image_grid_thw.prod(-1) // spatial_merge_size**2).tolist()
    if any(not 0 <= source < len(sizes) for source in image_sources):
        raise ValueError(f"image_sources {list(image_sources)[:8]} must index the {len(sizes)} distinct images")
    parts = features.split(sizes)
    return torch.cat([parts[source] for source in image_sources]) if image_sources else features[:0]


def scatter_image_features(embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                           image_token_id: int) -> torch.Tensor:
    """Put image features at the image-token positions. embeddings [S, B, H] (megatron layout); input_ids
    [B, S]; features [N, H], in batch-major token order (sample 0's image tokens first). Differentiable in
    both; returns a new tensor."""
    batch_index, seq_index = torch.nonzero(input_ids == image_token_id, as_tuple=True)  # row-major over [B, S]
    if batch_index.numel() != features.shape[0]:
        raise ValueError(f"the batch has {batch_index.numel()} image tokens but the vision encoder produced "
                         f"{features.shape[0]} image features: image tokens and image_grid_thw disagree")
    return embeddings.index_put((seq_index, batch_index), features.to(embeddings.dtype))


def _restore_tensor_parallel_attributes(module: torch.nn.Module) -> None:
    """Mark split weights as megatron does when it initialises them.

    megatron-core 0.16.1 sets ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride`` on
    Column/RowParallelLinear and VocabParallelEmbedding weights only inside its initialisation routines, so
    with ``perform_initialization=False`` (weights loaded right after) the marks are missing, and everything
    that reads them (sharded loading here, grad-norm de-duplication, checkpointing) would treat a shard as a
    replicated tensor. Strides follow megatron's MLP: 2 for a SwiGLU ``linear_fc1`` ([gate_r; up_r] per rank).
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.transformer.mlp import MLP

    gated_fc1 = {id(sub.linear_fc1) for sub in module.modules()
                 if isinstance(sub, MLP) and sub.config.gated_linear_unit}
    for sub in module.modules():
        dim = {ColumnParallelLinear: 0, RowParallelLinear: 1, VocabParallelEmbedding: 0}.get(type(sub))
        weight = getattr(sub, "weight", None)
        if dim is not None and weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 2 if id(sub) in gated_fc1 else 1)


class Qwen25VLModel(MegatronModule):
    """Qwen2.5-VL: ``vision`` (first pipeline stage only) and ``language_model`` (a megatron GPTModel).

    pg_collection: megatron `ProcessGroupCollection` for the language model (tp, cp, pp, embd, ...); the
    vision encoder uses its tp (and cp) group. ``parallel_output``: logits stay split over the vocabulary
    across tensor-parallel ranks (what megatron's vocab-parallel cross entropy wants).
    """

    def __init__(self, config: Qwen25VLConfig, settings: MegatronSettings = MegatronSettings(), *,
                 pg_collection, pre_process: bool = True, post_process: bool = True, parallel_output: bool = True,
                 role_mass_layers: Collection[int] = (), role_mass_core_attention: type | None = None,
                 vp_stage: int | None = None):
        from megatron.core.enums import ModelType
        from megatron.core.utils import get_pg_rank, get_pg_size

        configs = build_transformer_configs(config, settings)
        super().__init__(config=configs.language)
        if get_pg_size(pg_collection.tp) != settings.tensor_model_parallel_size:
            raise ValueError(f"the tensor-parallel group has {get_pg_size(pg_collection.tp)} ranks but "
                             f"settings.tensor_model_parallel_size={settings.tensor_model_parallel_size}")
        self.qwen_config = config
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.pre_process, self.post_process = pre_process, post_process
        self.role_mass_layers = frozenset(role_mass_layers)
        block_spec = language_block_spec(
            configs.language, role_mass_layers=role_mass_layers, role_mass_core_attention=role_mass_core_attention,
            pp_rank=get_pg_rank(getattr(pg_collection, "pp", None)), vp_stage=vp_stage,
        )
        placement = torch.device("meta") if settings.init_on_meta_device else contextlib.nullcontext()
        with placement:
            self.vision = (Qwen25VisionModel(config.vision, configs.vision, configs.merger,
                                             pg_collection=pg_collection) if pre_process else None)
            # (megatron annotates transformer_layer_spec as a ModuleSpec and rotary_base as int; GPTModel takes block
            # submodules as well, and the base is used in float arithmetic)
            self.language_model = LanguageModel(
                configs.language, block_spec, vocab_size=config.text.vocab_size,  # pyright: ignore[reportArgumentType]
                max_sequence_length=config.text.max_position_embeddings, pre_process=pre_process,
                post_process=post_process, parallel_output=parallel_output,
                share_embeddings_and_output_weights=config.text.tie_word_embeddings,
                position_embedding_type="mrope", rotary_base=config.text.rope_theta,  # pyright: ignore[reportArgumentType]
                # Image features go in before the sequence-parallel scatter, so the scatter is done here.
                scatter_embedding_sequence_parallel=False,
                pg_collection=pg_collection, vp_stage=vp_stage,
            )

        # Under context parallelism the model hands megatron this rank's position ids already (forward);
        # megatron's own per-rank slicing of the rotary table (which also assumes CUDA) stays off.
        self.language_model.rotary_pos_emb.cp_group = None
        self._cp_group = pg_collection.cp if configs.language.context_parallel_size > 1 else None
        _restore_tensor_parallel_attributes(self)

    # megatron's finalize_model_grads all-reduces the tied embedding / output weight between the first and the
    # last pipeline stage through these two GPTModel members of the unwrapped model.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline parallelism: the hidden states a non-first stage receives."""
        self.language_model.set_input_tensor(input_tensor)

    def _blank_image_weighted_by_zero(self) -> torch.Tensor:
        """0 x the vision encoder's output on one blank merge group: a text-only micro-batch still gives every
        vision parameter a (zero) gradient, which megatron's overlapped gradient reduce waits for."""
        assert self.vision is not None
        side = self.qwen_config.vision.spatial_merge_size
        grid = torch.tensor([[1, side, side]])
        weight = self.vision.patch_embed.weight
        pixels = torch.zeros(side * side, self.qwen_config.vision.patch_dim, dtype=weight.dtype, device=weight.device)
        return self.vision(pixels, grid).sum() * 0.0

    def _images_over_context_parallel(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                                      split: ContextSplit) -> torch.Tensor:
        """The features of every image of the batch: each CP rank encodes its share of the images
        (``context_parallel.split_images``) and the ranks all-gather the merged tokens, so the vision encoder's
        work and activations are divided by CP. A rank without images encodes the blank merge group (weighted by
        0): every vision parameter still gets its gradient, and the rank takes part in the gather's backward."""
        assert self.vision is not None
        patches = image_grid_thw.prod(-1).tolist()  # one host read per batch (the vision packing reads it too)
        merge = self.qwen_config.vision.spatial_merge_size ** 2
        ranges = split_images(patches, split.size)
        first, end = ranges[split.rank]
        offsets = [0, *itertools.accumulate(patches)]
        weight = self.vision.patch_embed.weight
        if end > first:  # this rank's images only reach its device
            mine = self.vision(_to(pixel_values[offsets[first]:offsets[end]], weight.device),
                               image_grid_thw[first:end])
        else:
            mine = torch.zeros((0, self.qwen_config.vision.out_hidden_size), dtype=weight.dtype, device=weight.device)
            if torch.is_grad_enabled():  # in the graph, so this rank joins the gather's backward like the others
                mine = mine + self._blank_image_weighted_by_zero()
        counts = [(offsets[b] - offsets[a]) // merge for a, b in ranges]
        return gather_image_features(mine, counts, split.group)

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                token_roles: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                mass_sink: MassSink | None = None, logit_edits: RoleLogitEdits | None = None,
                role_attention_impl: str = "auto", mass_mode: str = "probe",
                num_roles: int = NUM_ROLES, image_sources: Sequence[int] | None = None,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids int [B, S]; attention_mask [B, S] (nonzero = real token, None = no padding);
        pixel_values [num_patches, patch_dim] and image_grid_thw [num_images, 3] for the images of the whole
        batch; position_ids [3, B, S] (default: :func:`mrope_position_ids`; packed rows must pass theirs);
        labels int [B, S]. segment_ids int [B, S]: packed rows, the sample index of each token (-1 on padding).
        token_roles int [B, S] (TokenRole): needed with ``mass_sink`` or ``logit_edits``; the AVAR layers report
        their masses to ``mass_sink`` and apply ``logit_edits``; ``role_attention_impl`` as in role_attention (the
        kernel family of every layer's attention, ``ops.causal_attention.PLAIN_ATTENTION_FOR``); ``mass_mode``
        "probe" or "fused" (``models.role_mass_attention``). ``num_roles``: token_roles lie in [-1, num_roles);
        more than TokenRole's when an analysis gives some tokens a role of their own (VAS's attention sink).
        pixel_values may stay on the host (pinned on a GPU machine): only the first pipeline stage copies them to
        its device, as each micro-batch starts (under context parallelism only this rank's images); later stages
        never touch them.
        ``image_sources``: pixel_values / image_grid_thw hold distinct images, each encoded once, and the batch's
        images (in token order) are these: image k is distinct image ``image_sources[k]`` (GRPO's rollouts of one
        prompt share its images); needs position_ids. None: the batch's images are pixel_values' in order.
        ``output_rows``: int [N] on the device, flat positions b·S' + i of this rank's tokens (S' = S / cp under
        context parallelism, in ``context_parallel.local_positions`` order): the last stage computes logits (and
        losses) there only (``models.qwen2_5_vl.language_model``); None: everywhere.

        Returns logits [B, S, vocab / tp] (last stage, no labels), per-token loss [B, S] (last stage, with
        labels) — [N, vocab / tp] and [N] with output_rows — or the hidden states [S, B, H] for the next stage.
        """
        cfg = self.qwen_config
        _check_shapes(input_ids, attention_mask=attention_mask, labels=labels, token_roles=token_roles,
                      segment_ids=segment_ids, position_ids=position_ids)
        check_output_rows(output_rows)
        if bool((input_ids == cfg.video_token_id).any()):
            raise ValueError(f"video tokens (id {cfg.video_token_id}) are not supported, only images")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pass pixel_values and image_grid_thw together")
        if image_grid_thw is not None and image_grid_thw.numel() == 0 and pixel_values is not None \
                and pixel_values.shape[0] == 0:
            pixel_values = image_grid_thw = None  # no images (an empty batch of them)
        split = None if self._cp_group is None else ContextSplit.build(self._cp_group, input_ids.shape[1],
                                                                          input_ids.device)
        local_seq = input_ids.shape[1] // (split.size if split is not None else 1)
        if self.config.sequence_parallel and local_seq % self.config.tensor_model_parallel_size:
            raise ValueError(f"sequence parallelism splits every row over the {self.config.tensor_model_parallel_size}"
                             f" tensor-parallel ranks, but each rank's rows have {local_seq} tokens: make the row "
                             "length a multiple of tensor_model_parallel_size (x 2 x context_parallel_size)")
        if position_ids is None:
            if image_sources is not None:
                raise ValueError("image_sources (repeated images) needs the rows' position_ids")
            if segment_ids is not None:
                raise ValueError("packed rows (segment_ids) need their per-sample position_ids")
            position_ids, _ = mrope_position_ids(input_ids, image_grid_thw, image_token_id=cfg.image_token_id,
                                                 spatial_merge_size=cfg.vision.spatial_merge_size,
                                                 attention_mask=attention_mask)
        decoder_input = None
        if self.pre_process:
            # The vision encoder runs before the embedding: modules run in the order their parameters were
            # registered, which is the order megatron's overlapped weight gather fetches them in.
            assert self.vision is not None  # built on the first pipeline stage (pre_process)
            features = blank = None
            if pixel_values is not None and image_grid_thw is not None and split is not None:
                features = self._images_over_context_parallel(pixel_values, image_grid_thw, split)
            elif pixel_values is not None:
                features = self.vision(_to(pixel_values, self.vision.patch_embed.weight.device), image_grid_thw)
            elif bool((input_ids == cfg.image_token_id).any()):
                raise ValueError(f"the batch has {int((input_ids == cfg.image_token_id).sum())} image tokens "
                                 "but no pixel_values")
            elif torch.is_grad_enabled():
                blank = self._blank_image_weighted_by_zero()
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
            if features is not None and image_sources is not None:
                assert image_grid_thw is not None  # (features come from the images)
                features = repeat_image_features(features, image_grid_thw, image_sources,
                                                 cfg.vision.spatial_merge_size)
            if features is not None:
                decoder_input = scatter_image_features(decoder_input, input_ids, features, cfg.image_token_id)
            if blank is not None:
                decoder_input = decoder_input + blank
            if split is not None:
                decoder_input = split.local(decoder_input, 0)
            if self.config.sequence_parallel:
                from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                tp_group = self.language_model.pg_collection.tp
                decoder_input = scatter_to_sequence_parallel_region(decoder_input, group=tp_group)
        if token_roles is None and (mass_sink is not None or logit_edits is not None):
            raise ValueError("mass_sink and logit_edits need token_roles (TokenRole per token)")
        # Every layer takes padding and packing from the key roles (-1: never attended): without token roles,
        # every real token has role 0.
        key_roles = token_roles if token_roles is not None else torch.zeros_like(input_ids)
        if attention_mask is not None:
            key_roles = key_roles.masked_fill(attention_mask == 0, -1)
        if segment_ids is not None:
            key_roles = key_roles.masked_fill(segment_ids < 0, -1)
        role_params = RoleMassParams(key_roles=key_roles, segment_ids=segment_ids, edits=logit_edits,
                                     sink=mass_sink, impl=role_attention_impl, mass_mode=mass_mode, context=split,
                                     num_roles=num_roles, output_rows=output_rows)
        if split is not None:  # the language model sees this rank's tokens only
            input_ids, position_ids = split.local(input_ids, 1), split.local(position_ids, 2)
            labels = None if labels is None else split.local(labels, 1)
        return self.language_model(input_ids, position_ids, None,
                                   decoder_input=decoder_input, labels=labels, packed_seq_params=role_params)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: without waiting from pinned host memory (a no-op when it is there already)."""
    return tensor.to(device, non_blocking=True)


def _check_shapes(input_ids: torch.Tensor, *, position_ids: torch.Tensor | None, **per_token: torch.Tensor | None):
    """ValueError naming the argument whose shape does not fit ``input_ids`` [B, S] (each per-token input is
    [B, S], position_ids [3, B, S]): shapes only, nothing read from the device."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    for name, value in per_token.items():
        if value is not None and tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(value.shape)}")
    if position_ids is not None and tuple(position_ids.shape) != (3, *input_ids.shape):
        raise ValueError(f"position_ids must be [3, batch, seq] = {(3, *input_ids.shape)} (t, h, w of the "
                         f"multimodal rope), got {tuple(position_ids.shape)}")

