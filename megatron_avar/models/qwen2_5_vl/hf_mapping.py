"""Hugging Face Qwen2.5-VL weights <-> the megatron model here, both directions, at any tensor-parallel size.

Two layers:
* name/layout conversion between full (unsharded) state dicts: :func:`hf_to_megatron`, :func:`megatron_to_hf`.
  One table (:func:`param_mappings`) drives both directions, so they are exact inverses (the round trip
  only reshapes and concatenates: bit-exact).
* sharding for one tensor-parallel rank: :func:`load_hf_state_dict` cuts each full tensor the way the
  parameter is partitioned (``partition_dim``), :func:`export_hf_state_dict` gathers them back.

Layouts that differ from HF:
* attention ``linear_qkv`` (language model and vision): rows grouped per query group,
  ``[q heads of group g, k_g, v_g]`` for g = 0..G-1 (HF: separate q/k/v projections, or the vision tower's
  fused ``qkv`` with rows [all q; all k; all v]). Tensor parallelism splits whole groups, so a rank's shard is
  a contiguous row block of this layout.
* SwiGLU ``linear_fc1`` = ``[gate; up]``; tensor-parallel rank r holds ``[gate chunk r; up chunk r]``
  (megatron marks these parameters ``partition_stride=2``; sharding here follows each parameter's
  ``partition_dim`` and stride).
* the vision patch embedding is a Linear over the flattened patch (HF: the equivalent Conv3d weight).
* Transformer Engine layer specs fuse the pre-attention / pre-MLP norms into the next linear
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``): ``fused_layer_norms=True``.

HF names here are the transformers-5 in-memory layout (``model.language_model.*``, ``model.visual.*``,
``lm_head.*``). Every published Qwen2.5-VL checkpoint, and ``save_pretrained`` (transformers 4.x, and 5.x,
which converts back on save), uses the older layout (``model.embed_tokens``, ``model.layers.*``,
``model.norm``, ``visual.*``, ``lm_head.*``): both are accepted on input (:func:`canonical_hf_name`), and
:func:`hf_name_in_layout` renames for output. With tied embeddings no ``lm_head.weight`` is produced (what
``save_pretrained`` writes, and what the tied Hub checkpoints such as Qwen2.5-VL-3B hold).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_avar.models.qwen2_5_vl.config import Qwen25VLConfig

__all__ = ["ParamMapping", "param_mappings", "hf_to_megatron", "megatron_to_hf", "canonical_hf_name",
           "HF_LAYOUTS", "hf_name_in_layout", "load_hf_state_dict", "load_hf_tensors", "export_hf_state_dict",
           "iter_hf_tensors", "iter_gathered_hf_tensors", "full_megatron_state"]


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One megatron parameter and the HF tensors it is made of. kind: "copy", "qkv" (HF q, k, v -> grouped),
    "fused_qkv" (HF [q; k; v] rows -> grouped), "gate_up" (HF gate, up -> [gate; up]), "patch_embed"."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"
    num_groups: int = 0  # qkv kinds: query groups (= kv heads)
    head_dim: int = 0


def param_mappings(config: Qwen25VLConfig, *, fused_layer_norms: bool = False) -> list[ParamMapping]:
    """Every parameter of the full model, in a fixed order."""
    text, vision = config.text, config.vision
    pre_attn_norm = "self_attention.linear_qkv.layer_norm_weight" if fused_layer_norms else "input_layernorm.weight"
    pre_mlp_norm = "mlp.linear_fc1.layer_norm_weight" if fused_layer_norms else "pre_mlp_layernorm.weight"
    out = [ParamMapping("vision.patch_embed.weight", ("model.visual.patch_embed.proj.weight",), "patch_embed")]
    for i in range(vision.depth):
        m, h = f"vision.layers.{i}.", f"model.visual.blocks.{i}."
        out += [
            ParamMapping(m + "input_layernorm.weight", (h + "norm1.weight",)),
            ParamMapping(m + "pre_mlp_layernorm.weight", (h + "norm2.weight",)),
            *(ParamMapping(m + f"self_attention.linear_qkv.{p}", (h + f"attn.qkv.{p}",), "fused_qkv",
                           vision.num_heads, vision.head_dim) for p in ("weight", "bias")),
            *(ParamMapping(m + f"self_attention.linear_proj.{p}", (h + f"attn.proj.{p}",)) for p in ("weight", "bias")),
            *(ParamMapping(m + f"mlp.linear_fc1.{p}", (h + f"mlp.gate_proj.{p}", h + f"mlp.up_proj.{p}"), "gate_up")
              for p in ("weight", "bias")),
            *(ParamMapping(m + f"mlp.linear_fc2.{p}", (h + f"mlp.down_proj.{p}",)) for p in ("weight", "bias")),
        ]
    out.append(ParamMapping("vision.final_layernorm.weight", ("model.visual.merger.ln_q.weight",)))
    for fc, index in (("linear_fc1", 0), ("linear_fc2", 2)):
        out += [ParamMapping(f"vision.merger.encoder.{fc}.{p}", (f"model.visual.merger.mlp.{index}.{p}",))
                for p in ("weight", "bias")]
    out.append(ParamMapping("language_model.embedding.word_embeddings.weight",
                            ("model.language_model.embed_tokens.weight",)))
    for i in range(text.num_layers):
        m, h = f"language_model.decoder.layers.{i}.", f"model.language_model.layers.{i}."
        out += [
            ParamMapping(m + pre_attn_norm, (h + "input_layernorm.weight",)),
            *(ParamMapping(m + f"self_attention.linear_qkv.{p}",
                           tuple(h + f"self_attn.{x}_proj.{p}" for x in "qkv"), "qkv",
                           text.num_query_groups, text.head_dim) for p in ("weight", "bias")),
            ParamMapping(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
            ParamMapping(m + pre_mlp_norm, (h + "post_attention_layernorm.weight",)),
            ParamMapping(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                         "gate_up"),
            ParamMapping(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    out.append(ParamMapping("language_model.decoder.final_layernorm.weight", ("model.language_model.norm.weight",)))
    if not text.tie_word_embeddings:
        out.append(ParamMapping("language_model.output_layer.weight", ("lm_head.weight",)))
    return out


_LEGACY_TEXT = re.compile(r"^model\.(?!visual\.|language_model\.)")

# Layouts of HF tensor names. "published": every Qwen2.5-VL checkpoint on the Hub and what save_pretrained writes
# (model.embed_tokens / model.layers / model.norm, visual.*, lm_head); "transformers5": the in-memory module
# names of transformers >= 4.52 (model.language_model.*, model.visual.*, lm_head), the names used in this module.
HF_LAYOUTS = ("published", "transformers5")


def canonical_hf_name(name: str) -> str:
    """transformers-5 name of an HF Qwen2.5-VL tensor given in either layout."""
    if name.startswith("visual."):
        return "model." + name
    return _LEGACY_TEXT.sub("model.language_model.", name)


def hf_name_in_layout(name: str, layout: str) -> str:
    """The name of a tensor (given in either layout) in ``layout`` (one of :data:`HF_LAYOUTS`); inverse of
    :func:`canonical_hf_name` for "published". ``lm_head.*`` is the same in both."""
    if layout not in HF_LAYOUTS:
        raise ValueError(f"HF layout must be one of {HF_LAYOUTS}, got {layout!r}")
    name = canonical_hf_name(name)
    if layout == "transformers5":
        return name
    for prefix, published in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(prefix):
            return published + name[len(prefix):]
    return name


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], config: Qwen25VLConfig, *,
                   fused_layer_norms: bool = False) -> dict[str, torch.Tensor]:
    """Full megatron state (names of :class:`Qwen25VLModel`, unsharded) from a full HF state dict.

    Raises ValueError listing missing or unexpected HF tensors (a tied ``lm_head.weight`` is ignored)."""
    hf = {canonical_hf_name(k): v for k, v in hf_state.items()}
    if config.text.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    mappings = param_mappings(config, fused_layer_norms=fused_layer_norms)
    needed = {name for m in mappings for name in m.hf}
    missing, unexpected = sorted(needed - hf.keys()), sorted(hf.keys() - needed)
    if missing or unexpected:
        raise ValueError(f"HF state dict does not match the config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    return {m.megatron: _to_megatron(m, [hf[name] for name in m.hf]) for m in mappings}


def megatron_to_hf(megatron_state: Mapping[str, torch.Tensor], config: Qwen25VLConfig, *,
                   fused_layer_norms: bool = False) -> dict[str, torch.Tensor]:
    """Full HF state dict (transformers-5 names) from a full megatron state; inverse of :func:`hf_to_megatron`."""
    mappings = param_mappings(config, fused_layer_norms=fused_layer_norms)
    missing = sorted({m.megatron for m in mappings} - megatron_state.keys())
    if missing:
        raise ValueError(f"megatron state lacks {len(missing)} parameters, e.g. {missing[:8]}")
    out = {}
    for m in mappings:
        out.update(zip(m.hf, _to_hf(m, megatron_state[m.megatron], config)))
    return out


def _to_megatron(m: ParamMapping, tensors: list[torch.Tensor]) -> torch.Tensor:
    if m.kind == "copy":
        return tensors[0]
    if m.kind == "patch_embed":
        return tensors[0].reshape(tensors[0].shape[0], -1)  # Conv3d [out, c, t, p, p] -> [out, c*t*p*p]
    if m.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors if m.kind == "qkv" else tensors[0].chunk(3, dim=0)
    rest = q.shape[1:]
    groups = [x.reshape(m.num_groups, -1, *rest) for x in (q, k, v)]
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def _to_hf(m: ParamMapping, tensor: torch.Tensor, config: Qwen25VLConfig) -> tuple[torch.Tensor, ...]:
    if m.kind == "copy":
        return (tensor,)
    if m.kind == "patch_embed":
        v = config.vision
        return (tensor.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),)
    if m.kind == "gate_up":
        return tuple(tensor.chunk(2, dim=0))
    rest = tensor.shape[1:]
    grouped = tensor.reshape(m.num_groups, -1, m.head_dim, *rest)  # [G, heads_per_group + 2, D, ...]
    q, k, v = grouped.split([grouped.shape[1] - 2, 1, 1], dim=1)
    q, k, v = (x.reshape(-1, *rest) for x in (q, k, v))
    return (q, k, v) if m.kind == "qkv" else (torch.cat([q, k, v], dim=0),)


# ---- tensor-parallel loading / export -------------------------------------------------------------------

def load_hf_state_dict(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], config: Qwen25VLConfig, *,
                       tp_group: dist.ProcessGroup | None = None) -> None:
    """Copy a full HF state dict into this rank's parameters (its TP shard, its pipeline stage's layers).

    ``model``: a :class:`Qwen25VLModel`. ``tp_group`` defaults to the language model's. Local, no
    communication. Raises ValueError if a parameter of the model has no HF tensor or a shape disagrees."""
    params = dict(_global_named_parameters(model))
    full = hf_to_megatron(hf_state, config, fused_layer_norms=_has_fused_norms(params))
    rank, size = _rank_and_size(model, tp_group)
    strides = _partition_strides(model)
    with torch.no_grad():
        for name, param in params.items():
            if name not in full:
                raise ValueError(f"model parameter {name} has no HF counterpart")
            shard = _shard(full[name], param, strides[id(param)], rank=rank, size=size)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: HF gives {tuple(full[name].shape)} -> shard {tuple(shard.shape)} for "
                                 f"TP rank {rank}/{size}, the parameter is {tuple(param.shape)}")
            param.copy_(shard)


def load_hf_tensors(model: torch.nn.Module, hf_tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]],
                    config: Qwen25VLConfig, *, tp_group: dist.ProcessGroup | None = None,
                    cast_to_model_dtype: bool = False) -> None:
    """Streaming :func:`load_hf_state_dict`: ``hf_tensors`` yields ``(hf_name, read)`` pairs (e.g. the keys of
    safetensors shards, file by file); ``read()`` is called only for tensors this rank's parameters need, and
    a full tensor is kept only until the last HF tensor of its parameter has arrived.

    Local, no communication. Raises ValueError naming the tensor for an HF name the config does not have, a
    shape that does not fit the parameter, a dtype other than the parameter's (conversion must not round;
    training, which chooses its precision, passes ``cast_to_model_dtype=True``), and for parameters left
    without an HF tensor."""
    params = dict(_global_named_parameters(model))
    mappings = param_mappings(config, fused_layer_norms=_has_fused_norms(params))
    by_hf_name = {hf_name: m for m in mappings for hf_name in m.hf}
    rank, size = _rank_and_size(model, tp_group)
    strides = _partition_strides(model)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    filled = set()
    for raw_name, read in hf_tensors:
        name = canonical_hf_name(raw_name)
        if name == "lm_head.weight" and config.text.tie_word_embeddings:
            continue
        mapping = by_hf_name.get(name)
        if mapping is None:
            raise ValueError(f"HF tensor {raw_name!r} is not part of a Qwen2.5-VL model with this config")
        param = params.get(mapping.megatron)
        if param is None:  # another pipeline stage's parameter
            continue
        tensor = read()
        if tensor.dtype != param.dtype and cast_to_model_dtype:
            tensor = tensor.to(param.dtype)
        if tensor.dtype != param.dtype:
            raise ValueError(f"HF tensor {raw_name!r} is {tensor.dtype} but the model is built in {param.dtype}")
        parts = pending.setdefault(mapping.megatron, {})
        parts[name] = tensor
        if len(parts) < len(mapping.hf):
            continue
        del pending[mapping.megatron]
        try:
            full = _to_megatron(mapping, [parts[n] for n in mapping.hf])
        except RuntimeError as error:  # a reshape that does not fit
            raise ValueError(f"HF tensors {list(mapping.hf)} have shapes {[tuple(parts[n].shape) for n in mapping.hf]}"
                             f" that do not fit {mapping.megatron}: {error}") from None
        shard = _shard(full, param, strides[id(param)], rank=rank, size=size)
        if shard.shape != param.shape:
            raise ValueError(f"HF tensor(s) {list(mapping.hf)}: shape(s) {[tuple(parts[n].shape) for n in mapping.hf]}"
                             f" give {mapping.megatron} {tuple(full.shape)} -> shard {tuple(shard.shape)} for TP "
                             f"rank {rank}/{size}, but the parameter is {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(shard)
        filled.add(mapping.megatron)
    missing = sorted(params.keys() - filled)
    if missing:
        needed = [hf_name for m in mappings if m.megatron in missing for hf_name in m.hf]
        raise ValueError(f"the HF checkpoint lacks {len(needed)} tensors, e.g. {needed[:6]}")


def iter_hf_tensors(model: torch.nn.Module, config: Qwen25VLConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every parameter of a model without tensor or pipeline parallelism, one mapping at a
    time and without copying the model (views where the layout allows): for streaming export to files."""
    params = dict(_global_named_parameters(model))
    for m in param_mappings(config, fused_layer_norms=_has_fused_norms(params)):
        param = params.get(m.megatron)
        if param is None:
            raise ValueError(f"the model has no parameter {m.megatron}: export needs the whole model (TP=1, PP=1)")
        if getattr(param, "tensor_model_parallel", False) and _rank_and_size(model, None)[1] > 1:
            raise ValueError("iter_hf_tensors needs a model without tensor parallelism")
        yield from zip(m.hf, _to_hf(m, param.detach(), config))


def export_hf_state_dict(model: torch.nn.Module, config: Qwen25VLConfig, *,
                         tp_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """HF tensors of the parameters this pipeline stage holds, gathered over tensor parallelism.

    Collective over ``tp_group`` (every rank of it must call). With one pipeline stage: the whole HF state
    dict. Tensors are copies on the parameters' device, in their dtype."""
    return dict(iter_gathered_hf_tensors(model, config, tp_group=tp_group))


def iter_gathered_hf_tensors(model: torch.nn.Module, config: Qwen25VLConfig, *,
                             tp_group: dist.ProcessGroup | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`export_hf_state_dict`'s (HF name, tensor) pairs one megatron parameter at a time: besides the model,
    only the parameter being gathered (and its HF pieces) exists at once, where the dict holds a whole copy of
    the stage (145 GB per rank for 72B). Collective over ``tp_group``: every rank of it iterates to the end."""
    _, size = _rank_and_size(model, tp_group)
    group = tp_group if tp_group is not None else model.language_model.pg_collection.tp  # pyright: ignore[reportAttributeAccessIssue]
    strides = _partition_strides(model)
    params = dict(_global_named_parameters(model))
    for m in param_mappings(config, fused_layer_norms=_has_fused_norms(params)):
        if m.megatron in params:
            full = _full_tensor(params[m.megatron], params[m.megatron].detach(), size, group, strides)
            yield from zip(m.hf, _to_hf(m, full, config))


def full_megatron_state(model: torch.nn.Module, *, tp_group: dist.ProcessGroup | None = None,
                        grads: bool = False) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) copies of this rank's parameters, or of their ``.grad``, by global name (decoder
    layer indexes counted over all pipeline stages). Collective over ``tp_group``."""
    _, size = _rank_and_size(model, tp_group)
    # (torch types a submodule reached by attribute as Tensor | Module)
    group = tp_group if tp_group is not None else model.language_model.pg_collection.tp  # pyright: ignore[reportAttributeAccessIssue]
    strides = _partition_strides(model)
    full = {}
    for name, param in _global_named_parameters(model):
        local = param.grad if grads else param
        if local is None:
            raise ValueError(f"{name} has no .grad: run backward first, or pass grads=False")
        full[name] = _full_tensor(param, local.detach(), size, group, strides)
    return full


def _full_tensor(param, local: torch.Tensor, size: int, group, strides: dict[int, int]) -> torch.Tensor:
    """A copy of ``local`` (``param`` or its gradient) gathered over the ``size`` ranks of ``group`` when ``param``
    is tensor-parallel. Collective over ``group`` then."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local.contiguous(), group=group)
    # megatron sets partition_dim on its tensor-parallel Parameters (an attribute torch does not declare)
    return _unshard(shards, param.partition_dim, strides[id(param)])  # pyright: ignore[reportAttributeAccessIssue]


def _shard(full: torch.Tensor, param, stride: int, *, rank: int, size: int) -> torch.Tensor:
    """This rank's piece, megatron's way: the full tensor is cut into ``stride`` blocks along
    ``partition_dim`` (SwiGLU fc1: stride 2, the [gate; up] halves), and the rank takes its chunk of each."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(stride, dim)], dim)


def _unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    pieces = [shard.chunk(stride, dim) for shard in shards]
    return torch.cat([pieces[rank][block] for block in range(stride) for rank in range(len(shards))], dim)


def _global_named_parameters(model: torch.nn.Module):
    """(name, param) with pipeline-local decoder layer indexes replaced by global ones (megatron's 1-based
    ``layer_number``), and a last-stage copy of tied embeddings named after the embedding."""
    renamed = {}
    for name, sub in model.named_modules():
        number = getattr(sub, "layer_number", None)
        if name.startswith("language_model.decoder.layers.") and name.count(".") == 3 and isinstance(number, int):
            renamed[name + "."] = f"language_model.decoder.layers.{number - 1}."
    for name, param in model.named_parameters():
        for prefix, new in renamed.items():
            if name.startswith(prefix):
                name = new + name[len(prefix):]
                break
        if name == "language_model.output_layer.weight" and getattr(param, "shared_embedding", False):
            name = "language_model.embedding.word_embeddings.weight"
        yield name, param


def _has_fused_norms(params: Mapping[str, torch.nn.Parameter]) -> bool:
    return any(name.endswith("linear_qkv.layer_norm_weight") for name in params)


def _partition_strides(model: torch.nn.Module) -> dict[int, int]:
    """Stride of every parameter by id: 2 for the weight/bias of a SwiGLU ``linear_fc1`` whatever the
    parameter declares (each rank computes gate * up from its own [gate_r; up_r] rows, so that is the layout
    even where a linear implementation reports ``partition_stride=1``), else the declared stride."""
    from megatron.core.transformer.mlp import MLP

    strides = {id(p): getattr(p, "partition_stride", 1) for p in model.parameters()}
    for sub in model.modules():
        if isinstance(sub, MLP) and sub.config.gated_linear_unit:
            strides.update((id(p), 2) for name, p in sub.linear_fc1.named_parameters() if name in ("weight", "bias"))
    return strides


def _rank_and_size(model, tp_group) -> tuple[int, int]:
    group = tp_group if tp_group is not None else model.language_model.pg_collection.tp
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
