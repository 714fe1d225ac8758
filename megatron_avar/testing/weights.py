"""Identical logical weights for megatron-core modules at any tensor/pipeline-parallel layout.

A parameter's *global name* is its name in the un-split model: local pipeline layer indexes become
global ones (``decoder.layers.0`` on the second of two 4-layer stages is ``decoder.layers.4``). Its
*logical tensor* is a deterministic function of (seed, global name, full shape). Every rank fills
its shard of that tensor, so a model built at TP=2 x PP=2 holds exactly the weights of the TP=1 x PP=1
model, and losses/gradients can be compared across layouts.

How a rank's shard is cut from the full tensor (the rules megatron's own ``sharded_state_dict`` uses):

* parameters with ``tensor_model_parallel=True`` are split along ``partition_dim`` with megatron's
  strided rule (``_initialize_affine_weight_cpu``): the full dim is cut into ``stride * tp_size``
  equal pieces and TP rank r holds pieces ``r, r + tp_size, ...`` concatenated. With stride 1 that is
  the contiguous chunk r. This is right for GQA ``linear_qkv``: its rows are grouped per query group
  (``[q heads of group g, k_g, v_g]`` for g = 0..G-1) and TP splits whole groups, so TP rank r owns
  groups ``[r*G/tp, (r+1)*G/tp)``, a contiguous row block (tests/test_megatron_parallel.py checks it,
  and that the [Q; K; V]-style slicing gives a different loss).
* ``linear_fc1`` of an MLP with ``gated_linear_unit`` (SwiGLU) holds rows ``[gate; up]`` in the full
  model but ``[gate chunk r; up chunk r]`` on TP rank r: stride 2. Megatron declares that with
  ``partition_stride=2`` on its own linears; the stride is forced to 2 for any gated ``linear_fc1``
  because megatron's ``MLP.sharded_state_dict`` applies this layout whatever the attribute says
  (Transformer Engine / kitchen linears keep ``partition_stride=1``).
* everything else (norms, row-parallel biases) is replicated.

Norm weights (owned by a module whose class name contains "Norm", or TE's ``layer_norm_weight``) are
``1 + std * N(0, 1)``; every other tensor is ``std * N(0, 1)``. Not handled: MoE expert parameters,
zero-centred-gamma norms (would want values near 0).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "global_named_parameters",
    "logical_tensor",
    "fill_logical_weights",
    "gather_full_tensors",
]

_LAYER_MODULE = re.compile(r"^(?:.*\.)?layers\.(\d+)$")


def global_named_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Yield ``(global_name, param)`` in ``module.named_parameters()`` order.

    A submodule named ``...layers.<i>`` with an integer ``layer_number`` (megatron's 1-based global
    layer number, pipeline and virtual-pipeline offsets included) is renamed ``...layers.<layer_number-1>``.
    A last-stage ``output_layer.weight`` marked ``shared_embedding`` (tied embeddings under PP) is
    named after the embedding it duplicates.
    """
    renamed = {}
    for name, sub in module.named_modules():
        layer_number = getattr(sub, "layer_number", None)
        if _LAYER_MODULE.match(name) and isinstance(layer_number, int):
            renamed[name] = name[: name.rfind(".") + 1] + str(layer_number - 1)
    for name, param in module.named_parameters():
        global_name = name
        for prefix, new_prefix in renamed.items():
            if name.startswith(prefix + "."):
                global_name = new_prefix + name[len(prefix):]
                break
        if global_name.endswith("output_layer.weight") and getattr(param, "shared_embedding", False):
            global_name = global_name[: -len("output_layer.weight")] + "embedding.word_embeddings.weight"
        yield global_name, param


def logical_tensor(global_name: str, full_shape: Iterable[int], *, seed: int, std: float,
                   is_norm_weight: bool = False) -> torch.Tensor:
    """The deterministic float32 CPU tensor for one global parameter; the same in every process."""
    # crc32, not hash(): Python's str hash is salted per process.
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{global_name}".encode()))
    values = torch.randn(tuple(full_shape), generator=generator) * std
    return values + 1.0 if is_norm_weight else values


@torch.no_grad()
def fill_logical_weights(modules: torch.nn.Module | Iterable[torch.nn.Module], *, seed: int = 0,
                         std: float = 0.02, tp_group: dist.ProcessGroup | None = None) -> list[str]:
    """Overwrite every parameter with its shard of the logical tensor; return the global names filled.

    ``modules``: one model or the virtual-pipeline chunks of one rank. ``tp_group`` defaults to each
    module's ``tp_group`` attribute (megatron's LanguageModule sets it). Local, no communication.
    """
    modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    filled = []
    for module in modules:
        tp_rank, tp_size = _tp_rank_and_size(module, tp_group)
        glu_params = _gated_fc1_params(module)
        norm_params = _norm_weight_params(module)
        for global_name, param in global_named_parameters(module):
            split = _tp_split(global_name, param, glu_params)
            full_shape = list(param.shape)
            if split is not None:
                full_shape[split[0]] *= tp_size
            full = logical_tensor(global_name, full_shape, seed=seed, std=std,
                                  is_norm_weight=id(param) in norm_params)
            param.copy_(full if split is None else _shard(full, *split, tp_rank, tp_size))
            filled.append(global_name)
    return filled


@torch.no_grad()
def gather_full_tensors(module: torch.nn.Module, global_names: Iterable[str] | None = None, *,
                        grads: bool = False,
                        tp_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Full-shape copies of this rank's parameters (or their ``.grad``), keyed by global name.

    Collective over the tensor-parallel group: every rank of it must call this with the same names.
    ``global_names`` that this rank does not hold (another pipeline stage) are skipped; None = all.
    Undoes exactly the slicing of :func:`fill_logical_weights`. A missing ``.grad`` raises ValueError.
    """
    wanted = None if global_names is None else set(global_names)
    tp_rank, tp_size = _tp_rank_and_size(module, tp_group)
    group = tp_group if tp_group is not None else getattr(module, "tp_group", None)
    glu_params = _gated_fc1_params(module)
    gathered = {}
    for global_name, param in global_named_parameters(module):
        if wanted is not None and global_name not in wanted:
            continue
        local = param.grad if grads else param
        if local is None:
            raise ValueError(f"{global_name} has no .grad: run backward first, or pass grads=False")
        split = _tp_split(global_name, param, glu_params)
        if split is None or tp_size == 1:
            gathered[global_name] = local.detach().clone()
            continue
        dim, stride = split
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(shards, local.detach().contiguous(), group=group)
        pieces = [shard.chunk(stride, dim=dim) for shard in shards]  # [rank][stride piece]
        gathered[global_name] = torch.cat([pieces[r][k] for k in range(stride) for r in range(tp_size)], dim=dim)
    return gathered


def _tp_rank_and_size(module: torch.nn.Module, tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    group = tp_group if tp_group is not None else getattr(module, "tp_group", None)
    if group is None:
        raise ValueError(f"{type(module).__name__} has no `tp_group` attribute: pass tp_group= explicitly "
                         "(e.g. parallel_state.get_tensor_model_parallel_group())")
    return dist.get_rank(group), dist.get_world_size(group)


def _tp_split(global_name: str, param: torch.nn.Parameter, glu_params: set[int]) -> tuple[int, int] | None:
    """``(partition_dim, stride)`` of a tensor-parallel parameter; None if it is replicated."""
    if not getattr(param, "allreduce", True):
        raise ValueError(f"{global_name} is an expert-parallel (MoE) parameter: not supported")
    if not getattr(param, "tensor_model_parallel", False):
        return None
    # megatron sets partition_dim on its tensor-parallel Parameters (an attribute torch's Parameter does not declare)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)  # pyright: ignore[reportAttributeAccessIssue]
    if id(param) in glu_params:
        if dim != 0:
            raise ValueError(f"{global_name}: a gated linear_fc1 must be split along dim 0, got {dim}")
        stride = 2
    if param.shape[dim] % stride:
        raise ValueError(f"{global_name}: local size {param.shape[dim]} along dim {dim} is not a multiple "
                         f"of partition_stride={stride}")
    return dim, stride


def _shard(full: torch.Tensor, dim: int, stride: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    pieces = full.chunk(stride * tp_size, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def _gated_fc1_params(module: torch.nn.Module) -> set[int]:
    """ids of the ``linear_fc1`` weights/biases of MLPs whose config has ``gated_linear_unit``.

    This is the condition under which megatron's ``MLP.sharded_state_dict`` applies its SwiGLU layout.
    """
    ids = set()
    for sub in module.modules():
        config = getattr(sub, "config", None)
        fc1 = getattr(sub, "linear_fc1", None)
        if fc1 is not None and getattr(config, "gated_linear_unit", False):
            ids.update(id(p) for name, p in fc1.named_parameters() if name in ("weight", "bias"))
    return ids


def _norm_weight_params(module: torch.nn.Module) -> set[int]:
    ids = set()
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if name == "layer_norm_weight" or (name == "weight" and "Norm" in type(sub).__name__):
                ids.add(id(param))
    return ids
