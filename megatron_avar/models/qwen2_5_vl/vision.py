"""The Qwen2.5-VL vision encoder in megatron-core terms, tensor-parallel.

    vision = Qwen25VisionModel(config.vision, configs.vision, configs.merger, pg_collection=pgs)
    features = vision(pixel_values, image_grid_thw)     # [num_image_tokens, out_hidden_size]

Structure (the same maths as HF's `Qwen2_5_VisionTransformerPretrainedModel`):
* patch embedding: HF's Conv3d has kernel = stride = (temporal_patch, patch, patch) over a patch that the
  processor already flattened in (channel, t, y, x) order, so it is one bias-free linear map of the flattened
  patch. Replicated on every tensor-parallel rank (it is small and its input is the same everywhere).
* blocks: megatron `TransformerLayer`s from a ModuleSpec: RMSNorm, self-attention with column-parallel qkv
  (with bias) and row-parallel proj, RMSNorm, SwiGLU MLP with bias. Attention is non-causal within a
  segment: a window of ``window_merged_tokens`` x ``window_merged_tokens`` merged tokens, or the whole frame
  in the blocks listed in ``fullatt_block_indexes``.
* 2-D rotary embedding: head_dim/4 frequencies rotate by the patch row, the next head_dim/4 by the column,
  applied with megatron's own (non-interleaved) rotary code from per-patch angles.
* merger: RMSNorm (the block stack's final norm), 4 neighbouring patches concatenated, MLP
  (column-parallel fc1 + GELU + row-parallel fc2) to the language model's hidden size.

Packing: every patch of every image goes into one sequence ([num_patches, 1, hidden], megatron's
[s, b, h]). Patches are reordered once so that each window is contiguous (whole 2x2 merge groups move
together, so the merger still sees its 4 patches side by side); full-attention segments (frames) are
contiguous in that order too. Segments reach the core attention through megatron's ``packed_seq_params``
argument, as :class:`VisionSegments` (a `PackedSeqParams` with ``qkv_format="sbhd"``, so megatron's
attention applies rope per token and does not reinterpret the layout), and the core attention runs each group
of equal-length segments as one batched `scaled_dot_product_attention`: exact variable-length attention
without an S x S mask. (On GPUs a flash-attention varlen kernel can take the same cumulative lengths.)

Sequence parallelism (``sequence_parallel`` in the TransformerConfig): the packed sequence is padded to a
multiple of merge_size^2 x tp patches (the padding is a segment of its own, attended by nothing real) and
split over the tensor-parallel ranks, so each holds whole merge groups through the blocks and the merger; the
merged tokens are gathered back, without the padding, before they go into the language model.

Activation recompute: with the decoder's full recompute (``recompute_granularity="full"`` in the vision
TransformerConfig) each block keeps only its input and is recomputed in the backward pass (megatron's
``tensor_parallel.checkpoint``, which restores the RNG states).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import (
    checkpoint,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule

from megatron_avar.models.qwen2_5_vl.config import Qwen25VLVisionConfig
from megatron_avar.models.qwen2_5_vl.norm import TorchNorm
from megatron_avar.models.qwen2_5_vl.positions import check_image_grids

__all__ = ["Qwen25VisionModel", "VisionSegmentAttention", "VisionSegments", "vision_layer_spec", "vision_packing"]


class VisionPacking:
    """Where each patch goes in the packed, window-ordered sequence, and the segment boundaries.

    order: int64 [P], packed position -> original patch index; inverse_merged_order: int64 [P / m^2], maps
    merged tokens back to processor order; cu_windows / cu_frames: int32 [num_segments + 1] cumulative
    lengths of windows / frames in packed order; rotary_hw: int64 [P, 2] (row, column) of each patch, in
    packed order.
    """

    def __init__(self, order, inverse_merged_order, cu_windows, cu_frames, rotary_hw):
        self.order, self.inverse_merged_order = order, inverse_merged_order
        self.cu_windows, self.cu_frames, self.rotary_hw = cu_windows, cu_frames, rotary_hw


def vision_packing(grid_thw: torch.Tensor, config: Qwen25VLVisionConfig) -> VisionPacking:
    """Packing of the patches of the images in ``grid_thw`` ([num_images, 3]: T, H, W in patches).

    The processor emits an image's patches frame by frame, in row-major order of 2x2 merge groups, row-major
    inside a group. Windows tile each frame's merged-token grid from the top-left corner; edge windows are
    smaller. In packed order windows follow each other row-major, and inside a window merge groups stay in
    row-major order.
    """
    merge, side = config.spatial_merge_size, config.window_merged_tokens
    unit = merge * merge
    merged_order, window_lengths, frame_lengths, rows, columns = [], [], [], [], []
    offset = 0  # merged tokens of the previous images
    for t, h, w in check_image_grids(grid_thw, merge):
        mh, mw = h // merge, w // merge
        row, column = torch.meshgrid(torch.arange(mh), torch.arange(mw), indexing="ij")
        windows_per_row = -(-mw // side)
        window_id = ((row // side) * windows_per_row + column // side).flatten()  # per merged token
        within_frame = torch.argsort(window_id, stable=True)  # stable: row-major inside each window
        lengths = torch.bincount(window_id)
        for frame in range(t):
            merged_order.append(offset + frame * mh * mw + within_frame)
            window_lengths.append(lengths[lengths > 0])
            frame_lengths.append(torch.tensor([mh * mw]))
        # Patch (row, column) in processor order: merge group (r, c), then (i, j) inside the group.
        r, c, i, j = torch.meshgrid(torch.arange(mh), torch.arange(mw), torch.arange(merge), torch.arange(merge),
                                    indexing="ij")
        rows.append((r * merge + i).flatten().repeat(t))
        columns.append((c * merge + j).flatten().repeat(t))
        offset += t * mh * mw
    merged_order = torch.cat(merged_order)
    order = (merged_order[:, None] * unit + torch.arange(unit)).flatten()
    hw = torch.stack([torch.cat(rows), torch.cat(columns)], dim=-1)[order]
    return VisionPacking(
        order=order,
        inverse_merged_order=torch.argsort(merged_order),
        cu_windows=_cumulative(torch.cat(window_lengths) * unit),
        cu_frames=_cumulative(torch.cat(frame_lengths) * unit),
        rotary_hw=hw,
    )


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


@dataclasses.dataclass
class VisionSegments(PackedSeqParams):
    """Segment boundaries for :class:`VisionSegmentAttention`, with the segments already grouped by length.

    ``equal_length_groups``: one int64 [num_segments_of_that_length, length] index tensor (positions in the
    packed sequence, on the compute device) per distinct length; computed once per forward, used by every
    layer. ``qkv_format`` is "sbhd" so that megatron's attention applies rope per token and leaves the layout.
    """

    equal_length_groups: tuple[torch.Tensor, ...] = ()

    @classmethod
    def from_cumulative(cls, cu_seqlens: torch.Tensor, device) -> VisionSegments:
        cu = cu_seqlens.cpu().long()
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        groups = tuple((starts[lengths == length][:, None] + torch.arange(length)).to(device)
                       for length in lengths.unique().tolist() if length > 0)
        cu_device = cu_seqlens.to(device=device, dtype=torch.int32)
        return cls(qkv_format="sbhd", cu_seqlens_q=cu_device, cu_seqlens_kv=cu_device,
                   max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()), equal_length_groups=groups)


class VisionSegmentAttention(torch.nn.Module):
    """Core attention (megatron's interface) over contiguous, independent, non-causal segments.

    The segments come as :class:`VisionSegments` in ``packed_seq_params``. query/key/value:
    [s, 1, heads_per_rank, head_dim] -> [s, 1, heads_per_rank * head_dim]. Segments of equal length are
    batched into one `scaled_dot_product_attention` call (windows mostly share a length), so no S x S mask
    is ever formed.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        if config.context_parallel_size != 1:
            raise ValueError("the vision encoder does not support context parallelism")
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as HF

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not isinstance(packed_seq_params, VisionSegments):
            raise TypeError("vision attention needs its segments as VisionSegments in packed_seq_params, got "
                            f"{type(packed_seq_params).__name__}")
        if query.shape[1] != 1:
            raise ValueError(f"vision attention expects one packed sequence (batch 1), got {query.shape[1]}")
        q, k, v = (x[:, 0] for x in (query, key, value))  # [s, heads, dim]
        out = torch.empty_like(q)
        for index in packed_seq_params.equal_length_groups:  # [n, length]
            batch = [x[index].transpose(1, 2) for x in (q, k, v)]  # [n, heads, length, dim]
            attended = F.scaled_dot_product_attention(*batch, scale=self.softmax_scale)
            out[index.flatten()] = attended.transpose(1, 2).flatten(0, 1)
        return out.flatten(1).unsqueeze(1)


def vision_layer_spec():
    """ModuleSpec of one vision block (local megatron modules + :class:`VisionSegmentAttention`)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=VisionSegmentAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            # (megatron's own specs pass this factory; its annotation asks for a ModuleSpec or a class)
            self_attn_bda=get_bias_dropout_add,  # pyright: ignore[reportArgumentType]
            pre_mlp_layernorm=TorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,  # pyright: ignore[reportArgumentType]
        ),
    )


def _run_block(layer, hidden: torch.Tensor, rotary: torch.Tensor, *, packed_seq_params) -> torch.Tensor:
    return layer(hidden, attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=packed_seq_params)[0]


class Qwen25VisionModel(MegatronModule):
    """Pixel patches of several images -> one LM-sized embedding per merged 2x2 patch group.

    ``transformer_config`` / ``merger_config``: from :func:`build_transformer_configs` (``.vision``,
    ``.merger``). ``pg_collection``: megatron `ProcessGroupCollection` with at least ``tp`` and ``cp``; the
    vision tower is never pipelined, so its layers see no pipeline group.
    """

    rotary_inv_freq: torch.Tensor  # float32 [head_dim / 4]: a non-persistent buffer (registered in __init__)

    def __init__(self, config: Qwen25VLVisionConfig, transformer_config, merger_config, *, pg_collection):
        super().__init__(config=transformer_config)
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.spec_utils import build_module

        self.vision_config = config
        self.tp_group = pg_collection.tp
        vision_groups = ProcessGroupCollection(tp=pg_collection.tp, cp=pg_collection.cp, pp=None)
        self.patch_embed = torch.nn.Linear(config.patch_dim, config.hidden_size, bias=False,
                                           dtype=transformer_config.params_dtype)
        spec = vision_layer_spec()
        # (megatron's build_module is typed to return any callable; given a layer spec it builds a module)
        self.layers = torch.nn.ModuleList(
            build_module(spec, config=transformer_config, layer_number=i + 1, pg_collection=vision_groups)  # pyright: ignore[reportArgumentType]
            for i in range(config.depth)
        )
        self.final_layernorm = TorchNorm(transformer_config, config.hidden_size,
                                                eps=transformer_config.layernorm_epsilon)
        self.merger = MultimodalProjector(
            merger_config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            projector_type="mlp", input_size=merger_config.ffn_hidden_size, tp_group=pg_collection.tp,
        )
        head_quarter = config.head_dim // 4
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(head_quarter, dtype=torch.float32) / head_quarter)
        self.register_buffer("rotary_inv_freq", inv_freq, persistent=False)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Checkpoint metadata (megatron dist_checkpointing). The blocks sit in a plain ModuleList, which
        megatron's default would describe as replicated tensors (local shapes as global ones); each block
        describes its own tensor-parallel split instead."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        sharded = {}
        for name, child in self.named_children():
            if name == "layers":
                for i, layer in enumerate(self.layers):  # megatron TransformerLayers (torch types them as Module)
                    sharded.update(layer.sharded_state_dict(prefix=f"{prefix}layers.{i}.",  # pyright: ignore[reportCallIssue]
                                                            sharded_offsets=sharded_offsets, metadata=metadata))
            else:
                sharded.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets, metadata,
                                                          tp_group=self.merger.encoder.linear_fc1.tp_group))
        return sharded

    def rotary_angles(self, rotary_hw: torch.Tensor) -> torch.Tensor:
        """[P, 1, 1, head_dim] angles for megatron's rotate-half rope: (rows, columns) frequencies, twice."""
        half = (rotary_hw[..., None].float() * self.rotary_inv_freq.to(rotary_hw.device)).flatten(1)
        return torch.cat([half, half], dim=-1)[:, None, None, :]

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values: [num_patches, patch_dim] as the Qwen2.5-VL processor emits them (all images
        concatenated); image_grid_thw: int [num_images, 3]. Returns [num_patches / merge**2, out_hidden_size],
        images in order, each image's merged tokens in the order its image tokens appear in the text."""
        expected = int(image_grid_thw.prod(-1).sum())
        if pixel_values.shape != (expected, self.vision_config.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, image_grid_thw needs "
                             f"({expected}, {self.vision_config.patch_dim})")
        packing = vision_packing(image_grid_thw.cpu(), self.vision_config)
        device = pixel_values.device
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)[packing.order.to(device)])
        hidden = hidden.unsqueeze(1)  # [s, b=1, h]
        rotary_hw, cu_windows, cu_frames = packing.rotary_hw, packing.cu_windows, packing.cu_frames
        sequence_parallel = self.config.sequence_parallel
        if sequence_parallel:
            # Each tensor-parallel rank holds a slice of whole merge groups (the merger's rows). The padding
            # patches form one more segment, so no real patch attends to them; they are dropped at the end.
            tp = self.config.tensor_model_parallel_size
            unit = self.vision_config.spatial_merge_size ** 2
            pad = -hidden.shape[0] % (unit * tp)
            if pad:
                hidden = F.pad(hidden, (0, 0, 0, 0, 0, pad))
                rotary_hw = F.pad(rotary_hw, (0, 0, 0, pad))
                cu_windows, cu_frames = (torch.cat([cu, cu.new_tensor([hidden.shape[0]])])
                                         for cu in (cu_windows, cu_frames))
            hidden = scatter_to_sequence_parallel_region(hidden, group=self.tp_group)
        rotary = self.rotary_angles(rotary_hw.to(device))
        segments = {True: VisionSegments.from_cumulative(cu_windows, device),
                    False: VisionSegments.from_cumulative(cu_frames, device)}
        full_attention = set(self.vision_config.fullatt_block_indexes)
        recompute = self.config.recompute_granularity == "full" and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            block = functools.partial(_run_block, layer, packed_seq_params=segments[index not in full_attention])
            # full recompute: keep only each block's input; its activations are recomputed in the backward pass
            hidden = checkpoint(block, False, hidden, rotary) if recompute else block(hidden, rotary)
        hidden = self.final_layernorm(hidden)
        merged = hidden.reshape(-1, 1, self.merger.encoder.linear_fc1.input_size)  # 2x2 groups are contiguous
        features = self.merger(merged)
        if sequence_parallel:
            # Downstream (the language model's embedding) every rank computes the same full-sequence tensor, so
            # each rank's gradient of these features is the whole gradient: the backward takes this rank's slice.
            features = gather_from_sequence_parallel_region(features, tensor_parallel_output_grad=False,
                                                            group=self.tp_group)
            features = features[:packing.inverse_merged_order.shape[0]]
        return features[:, 0][packing.inverse_merged_order.to(device)]
