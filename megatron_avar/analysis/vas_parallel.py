"""Feeding VAS from a parallel model: packed (THD) masses and pipeline stages that each hold some layers.

- Packed rows: role_attention with ``cu_seqlens`` returns mass [H, T, R] for T packed tokens. The VAS
  accumulator works on padded [B, H, S, R]; :func:`unpack_thd` turns mass and roles into that layout
  (right padding, PAD = -1), one row per packed sample.
- Pipeline parallelism: each stage feeds its own layers into its own VASAccumulator over the same batches;
  :func:`merge_stage_states` joins their ``state_dict()`` into the state of one accumulator over all layers
  (then ``VASAccumulator.merge([state]).result()``). Data shards are joined by ``VASAccumulator.merge``.
- Tensor parallelism: the accumulator needs every head (per-head VAS): all-gather mass over the TP group
  along the head dimension, in global head order, before ``add_layer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_avar.analysis.vas import VARIANTS
from megatron_avar.segments import check_cu_seqlens

__all__ = ["unpack_thd", "merge_stage_states"]


def unpack_thd(cu_seqlens: torch.Tensor, roles_t: torch.Tensor, mass_htr: torch.Tensor | None = None):
    """(roles [N, S_max], mass [N, H, S_max, R] or None) from packed roles [T] and mass [H, T, R].

    cu_seqlens: int [N + 1], 0 = cu[0] <= ... <= cu[N] = T (as role_attention's). Padding: role -1, mass 0.
    """
    check_cu_seqlens(cu_seqlens, roles_t.shape[0])
    bounds = [int(x) for x in cu_seqlens.tolist()]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    num, longest = len(lengths), max(lengths)
    roles = torch.full((num, longest), -1, dtype=torch.long, device=roles_t.device)
    mass = None
    if mass_htr is not None:
        if mass_htr.dim() != 3 or mass_htr.shape[1] != roles_t.shape[0]:
            raise ValueError(f"mass must be [H, T={roles_t.shape[0]}, R], got {tuple(mass_htr.shape)}")
        mass = mass_htr.new_zeros(num, mass_htr.shape[0], longest, mass_htr.shape[2])
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        roles[n, :end - start] = roles_t[start:end]
        if mass is not None and mass_htr is not None:
            mass[n, :, :end - start] = mass_htr[:, start:end]
    return roles, mass


def merge_stage_states(states: Sequence[dict]) -> dict:
    """One accumulator state from pipeline stages' states: same samples in the same order, disjoint layers."""
    if not states:
        raise ValueError("no stage states to merge")
    first = states[0]
    for index, state in enumerate(states[1:], 1):
        for key in ("num_heads", "eps", "sample_ids", "skipped", "num_queries"):
            if state[key] != first[key]:
                raise ValueError(f"stage {index} differs from stage 0 in {key}: every stage must accumulate the "
                                 "same batches in the same order")
    layers = [layer for state in states for layer in state["layers"]]
    if len(set(layers)) != len(layers):
        shared = sorted({x for x in layers if layers.count(x) > 1})
        raise ValueError(f"stages share layers {shared}; a layer belongs to one stage")
    separated = {s["sink_separated"] for s in states} - {None}
    if len(separated) > 1:
        raise ValueError("stages disagree on whether masses separate the sink role")
    order = sorted(range(len(layers)), key=layers.__getitem__)

    def rows(name, variant=None):
        stacked = [row for s in states for row in (s[name] if variant is None else s[name][variant])]
        return [stacked[k] for k in order]

    total = len(layers)
    return dict(
        layers=sorted(layers), num_heads=first["num_heads"], eps=first["eps"],
        sink_separated=separated.pop() if separated else None,
        sample_ids=list(first["sample_ids"]), skipped=list(first["skipped"]), num_queries=list(first["num_queries"]),
        img_sum=rows("img_sum"),
        ratio_sum={v: rows("ratio_sum", v) for v in VARIANTS},
        sys_sum={v: rows("sys_sum", v) for v in VARIANTS},
        hist={v: [sum(col) for col in zip(*(s["hist"][v] for s in states))] for v in VARIANTS},
        # per-sample VAS is a mean over (layer, head): weight each stage by its share of the layers
        sample_vas={v: [sum(s["sample_vas"][v][k] * len(s["layers"]) for s in states) / total
                        for k in range(len(first["sample_ids"]))] for v in VARIANTS},
    )
