"""megatron-core core attention for AVAR layers: attention, plus the per-role masses of the layer.

AVAR's losses, metrics and rewards are functions of m_IMG and m_SYS, the attention mass each query puts on
IMAGE and SYSTEM keys (docs/method.md, 'Attention mass'). In the layers listed as AVAR layers, the model's core
attention is :class:`RoleMassCoreAttention` (chosen through megatron's layer spec, see
``models.qwen2_5_vl.model.language_block_spec``); it never forms the S x S matrix, and hands the layer's
masses to a :class:`MassSink` (the AGTO loss, a VAS meter, the GRPO visual reward), which may attach an
auxiliary loss to the layer's output.

Two ways to get the masses (``RoleMassParams.mass_mode``):
  "probe" (default): ``out`` from the platform's fastest causal attention
      (:func:`megatron_avar.ops.causal_attention`) and the masses of only the rows the sink reads
      (``MassSink.query_rows``) from :func:`megatron_avar.ops.role_mass`; with no sink, no masses at all.
  "fused": :func:`megatron_avar.ops.role_attention` computes ``out`` and every row's masses in one kernel.
Either way a sink that declares ``query_rows`` receives float32 [N, heads of this TP rank, R] for those rows,
and one that does not receives [B, heads of this TP rank, S, R] (computed fused). The training-free
intervention's logit edits change ``out``, so an edited layer always runs fused.

How the per-batch inputs reach every layer: megatron hands one per-batch object down to every core
attention call, ``packed_seq_params`` — through the transformer block, full-layer activation recompute
(the recomputed forward sees the same object, by closure) and every pipeline schedule. Its subclass
:class:`RoleMassParams` carries the token roles, the packing of samples into rows, the logit edits of the
training-free intervention and the sink.

Standard (non-AVAR) layers run :class:`PlainCoreAttention`: the same attention for ``out``, reporting no masses.
No layer runs megatron's own core attentions: the local one forms S x S scores, and Transformer Engine's (under a
``causal`` mask type) would ignore the dense mask that holds padding and packing. A model called without token
roles gives every real token role 0 (its params then only mark padding and packing): no layer ever needs the dense
[B, 1, S, S] mask.

Under context parallelism (``RoleMassParams.context``) each rank holds part of every row: every layer gathers the
row's keys and values over the CP group and the sink gets the exact masses of all its rows on every CP rank
(``models.context_parallel``). Masses come from the probe there: the fused kernel, the intervention's edits and
sinks without ``query_rows`` are refused.

Under tensor parallelism each rank holds ``Hq / tp`` query heads: masses are per local head, and a sink
that averages over heads divides the local sum by the global head count (``LayerHeads``), which makes
the sum over TP ranks the exact head mean and each rank's gradient exact for its own heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from megatron_avar.models.context_parallel import ContextRows, ContextSplit, local_rows_attention, local_rows_masses
from megatron_avar.ops import role_attention, role_mass
from megatron_avar.ops.causal_attention import (
    PLAIN_ATTENTION_FOR,
    AttentionSpans,
    attention_spans,
    causal_attention,
)
from megatron_avar.ops.role_mass import masses_at_rows
from megatron_avar.roles import NUM_ROLES
from megatron_avar.segments import segment_cu_seqlens

__all__ = ["RoleMassParams", "RoleLogitEdits", "LayerHeads", "MassSink", "RoleMassCoreAttention",
           "PlainCoreAttention", "MASS_MODES"]

MASS_MODES = ("probe", "fused")


@dataclass(frozen=True)
class LayerHeads:
    """Which query heads of a layer this rank holds: ``first`` .. ``first + local - 1`` of ``total``."""

    first: int
    local: int
    total: int


class MassSink(Protocol):
    """Receives the masses of every AVAR layer as the layer runs.

    ``query_rows`` (optional attribute): int64 [N] on the batch's device, the rows the sink reads, as indices
    into the row-major flattened [B * S] token stream, set once per batch (e.g. AGTO's queries). Then ``mass``
    is float32 [N, heads.local, R] for those rows, in that order; without it (or None), [B, heads.local, S, R].
    ``layer_index``: 0-based global decoder layer; ``mass`` is differentiable with respect to the layer's q
    and k; ``out``: the layer's attention output [S, B, heads.local * D]. Returns ``out`` or a tensor equal
    to it carrying an auxiliary loss (see ``training.aux_loss``). Under activation recompute the same layer
    is reported twice per step (the first time with grad disabled); a sink keeps per-layer results keyed by
    ``layer_index`` so the second report replaces the first.
    """

    def __call__(self, layer_index: int, mass: torch.Tensor, out: torch.Tensor, heads: LayerHeads) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class RoleLogitEdits:
    """The training-free intervention (docs/method.md, 'Training-free intervention') as role_attention logit edits.

    query_mask: bool [B, S], the query rows edited (queries after the first image, generated ones included);
    scale / bias: float [R] or [Hq, R] over the GLOBAL query heads (each TP rank takes its slice); either may
    be None. layers: 0-based global decoder layers where the edits apply; None: every AVAR layer. Standard layers
    never apply them.
    """

    query_mask: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    layers: frozenset[int] | None = None

    def for_heads(self, heads: LayerHeads) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        def local(table):
            if table is None or table.dim() == 1:
                return table
            if table.shape[0] != heads.total:
                raise ValueError(f"a per-head logit edit table has {table.shape[0]} rows but the layer has "
                                 f"{heads.total} query heads")
            return table[heads.first:heads.first + heads.local]

        return local(self.scale), local(self.bias)


@dataclass
class RoleMassParams(PackedSeqParams):
    """Per-batch inputs of every decoder layer's core attention, passed to megatron as ``packed_seq_params`` (sbhd
    format); the sink, the edits and the mass mode concern the AVAR layers only, ``output_rows`` the output layer.

    key_roles: int [B, S], TokenRole of every token, -1 on padding (never attended).
    segment_ids: int [B, S] or None: packed rows, the sample index of every token within its row (-1 on
        padding); attention never crosses samples. None: each row is one sample.
    edits: the intervention's logit edits, or None.
    sink: where each AVAR layer's masses go, or None (no masses are needed).
    impl: kernel family ("auto": Triton on GPU, the CPU path otherwise; "triton", "blockwise", "reference").
    mass_mode: "probe" (fast attention + the probe on the sink's rows) or "fused" (module docstring); standard
        layers run the plain attention in either mode.
    context: the rows' split over the context-parallel group, or None (each rank holds whole rows). Under it,
        key_roles and segment_ids are those of the whole rows (the same on every CP rank).
    num_roles: the key roles' count R (masses are [..., R]): TokenRole's by default; the VAS analysis passes
        ``analysis.vas.MASS_NUM_ROLES`` with each sample's attention sink as a role of its own.
    output_rows: int [N] or None: the positions (b·S + i of this rank's tokens) the last stage computes logits
        at (``models.qwen2_5_vl.language_model``); None: every position.
    Built once per batch: key_roles' values are checked here, so no layer waits on the device for them.
    """

    key_roles: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    edits: RoleLogitEdits | None = None
    sink: MassSink | None = None
    impl: str = "auto"
    mass_mode: str = "probe"
    context: ContextSplit | None = None
    num_roles: int = NUM_ROLES
    output_rows: torch.Tensor | None = None
    _cu_seqlens: torch.Tensor | None = field(default=None, repr=False)
    _context_rows: ContextRows | None = field(default=None, repr=False)
    _spans: AttentionSpans | None = field(default=None, repr=False)

    def __post_init__(self):
        self.qkv_format = "sbhd"  # megatron's rotary / TE code paths must not read this as a THD batch
        if self.key_roles is None:
            raise ValueError("RoleMassParams needs key_roles (int [B, S], TokenRole per token, -1 on padding)")
        if self.mass_mode not in MASS_MODES:
            raise ValueError(f"mass_mode={self.mass_mode!r}: allowed {', '.join(MASS_MODES)}")
        if self.impl not in ("auto", "triton", "blockwise", "reference"):
            raise ValueError(f"impl={self.impl!r}: allowed auto, triton, blockwise, reference")
        if self.num_roles < NUM_ROLES:
            raise ValueError(f"num_roles={self.num_roles}: the key roles include TokenRole's {NUM_ROLES}")
        if self.key_roles.numel():
            low, high = (int(x) for x in torch.aminmax(self.key_roles))
            if low < -1 or high >= self.num_roles:
                raise ValueError(f"key_roles must lie in [-1, {self.num_roles}) (TokenRole, -1 padding), got "
                                 f"{low}..{high}")
        self._check_sink_rows()
        if self.segment_ids is not None and self._cu_seqlens is None:
            self._cu_seqlens = segment_cu_seqlens(self.segment_ids)  # here, not in the first layer (a host sync)
        if self.context is None and PLAIN_ATTENTION_FOR[self.impl] in ("auto", "sdpa"):
            # the spans the plain attention (standard layers; AVAR layers in probe mode) may run SDPA over
            # (ops.causal_attention), read on the host once per batch
            self._spans = attention_spans(self.key_roles.reshape(-1) if self._cu_seqlens is not None
                                          else self.key_roles, self._cu_seqlens)
        if self.context is not None:
            if self.mass_mode != "probe" or self.edits is not None:
                raise ValueError("context parallelism computes AVAR masses with the probe only: use "
                                 "model.mass_mode=probe and no logit edits (interventions run with "
                                 "context_parallel_size=1)")
            if self.key_roles.shape[1] != self.context.seq:
                raise ValueError(f"key_roles has {self.key_roles.shape[1]} tokens per row but the context-parallel "
                                 f"split is of {self.context.seq}-token rows")
            if self.sink is not None:
                rows = getattr(self.sink, "query_rows", None)
                if rows is None:
                    raise ValueError("under context parallelism a mass sink must declare its query_rows")
                self._context_rows = ContextRows.build(self.context, rows, self.key_roles.shape[0])

    def _check_sink_rows(self) -> None:
        """The sink's query rows (flat token indices into key_roles, b·S + i) are read by index in every layer,
        unchecked there (no host sync per layer): checked here, once per batch."""
        rows = None if self.sink is None else getattr(self.sink, "query_rows", None)
        roles = self.key_roles
        if rows is None or roles is None:
            return
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype.is_floating_point \
                or rows.dtype == torch.bool:
            got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise TypeError(f"the mass sink's query_rows must be a 1-D integer tensor of token indices, got {got}")
        if rows.numel():
            low, high = (int(x) for x in torch.aminmax(rows))
            if low < 0 or high >= roles.numel():
                raise ValueError(f"the mass sink's query_rows must lie in [0, {roles.numel()}) (flat indices "
                                 f"b*S + i into this batch's {tuple(roles.shape)} tokens), got {low}..{high}")

    def context_rows(self) -> ContextRows:
        """The sink's rows over the CP group (built with the params; needs ``context`` and a sink)."""
        if self._context_rows is None:
            raise ValueError("context_rows: these params have no context-parallel split with a mass sink")
        return self._context_rows

    def sdpa_spans(self) -> AttentionSpans | None:
        """The spans of real tokens the plain attention may run SDPA over (``ops.causal_attention``), worked out
        with the params; None under context parallelism and for the kernel families whose plain attention never
        runs SDPA (triton, reference)."""
        return self._spans

    def packed_cu_seqlens(self) -> torch.Tensor | None:
        """cu_seqlens over the row-major flattened [B * S] token stream, one segment per sample (and per
        run of padding), computed once per batch (None: one sample per row)."""
        return self._cu_seqlens


class RoleMassCoreAttention(MegatronModule):
    """Drop-in megatron core attention (DotProductAttention's constructor and forward signature) computing
    causal attention with role_attention and reporting the layer's per-role masses to the batch's sink.

    Inputs query [S, B, Hq_local, D], key / value [S, B, Hkv_local, D] (GQA kept, no repeat); output
    [S, B, Hq_local * D]. Padding and packing come from ``packed_seq_params`` (a :class:`RoleMassParams`,
    required), not from the dense attention mask.
    """

    reports_masses = True  # False: a standard layer (PlainCoreAttention)

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, impl: str | None = None):
        super().__init__(config=config)
        from megatron.core.utils import get_pg_rank, get_pg_size

        if attention_type != "self":
            raise ValueError(f"role-mass attention is self-attention only, got attention_type={attention_type!r}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"role-mass attention has no attention dropout; set attention_dropout=0 (got {dropout})")
        if pg_collection is None:
            raise ValueError("RoleMassCoreAttention needs the model's pg_collection (explicit process groups)")
        tp_size, tp_rank = get_pg_size(pg_collection.tp), get_pg_rank(pg_collection.tp)
        if config.num_attention_heads % tp_size or config.num_query_groups % tp_size:
            raise ValueError(f"{config.num_attention_heads} query heads / {config.num_query_groups} kv heads do "
                             f"not divide over tensor_model_parallel_size={tp_size}")
        local = config.num_attention_heads // tp_size
        self.layer_index = layer_number - 1  # megatron's layer_number is 1-based and global (offset included)
        self.heads = LayerHeads(first=tp_rank * local, local=local, total=config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.impl = impl

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if not isinstance(packed_seq_params, RoleMassParams):
            raise ValueError(f"decoder layer {self.layer_index}'s core attention takes padding and packing from "
                             "RoleMassParams as packed_seq_params (Qwen25VLModel.forward builds them); got "
                             f"{type(packed_seq_params).__name__}")
        if attention_bias is not None:
            raise ValueError("role-mass attention takes no attention_bias")
        params = packed_seq_params
        assert params.key_roles is not None  # RoleMassParams requires it
        if params.context is not None:
            return self._context_parallel(query, key, value, params)
        seq, batch = query.shape[:2]
        if tuple(params.key_roles.shape) != (batch, seq):
            raise ValueError(f"key_roles has shape {tuple(params.key_roles.shape)} but the layer sees "
                             f"[batch={batch}, seq={seq}] (sequence parallel layouts are not supported here)")
        query_mask = scale = bias = None
        edits = params.edits if self.reports_masses else None  # a standard layer: plain attention, always
        if edits is not None and (edits.layers is None or self.layer_index in edits.layers):
            query_mask = edits.query_mask
            scale, bias = edits.for_heads(self.heads)
        sink = params.sink if self.reports_masses else None
        rows = getattr(sink, "query_rows", None) if sink is not None else None
        cu_seqlens = params.packed_cu_seqlens()
        fused = self.reports_masses and (params.mass_mode == "fused" or query_mask is not None
                                         or (sink is not None and rows is None))
        if fused:
            out, mass = self._fused(query, key, value, params, cu_seqlens, query_mask, scale, bias)
            if rows is not None:
                mass = masses_at_rows(mass, rows)  # [N, H, R]
        else:
            out, mass = self._probe(query, key, value, params, cu_seqlens, rows)
        out = out.transpose(0, 1).reshape(seq, batch, -1)
        if sink is not None:
            assert mass is not None  # a sink without query rows takes the fused path, which returns every mass
            out = sink(self.layer_index, mass, out, self.heads)
        return out

    def _context_parallel(self, query, key, value, params: RoleMassParams) -> torch.Tensor:
        """This CP rank's rows: attention over the gathered row, and the sink's masses (``models.context_parallel``)."""
        split = params.context
        assert split is not None and params.key_roles is not None
        seq, batch = query.shape[:2]
        if seq * split.size != split.seq or params.key_roles.shape[0] != batch:
            raise ValueError(f"the layer sees {seq} tokens of {batch} rows on each of {split.size} context-parallel "
                             f"ranks, but the batch's rows have {split.seq} tokens ({params.key_roles.shape[0]} rows)")
        key, value = split.gather(key), split.gather(value)
        out = local_rows_attention(query, key, value, split, key_roles=params.key_roles,
                                   segment_ids=params.segment_ids, softmax_scale=self.softmax_scale)
        out = out.transpose(0, 1).reshape(seq, batch, -1)
        sink = params.sink if self.reports_masses else None
        if sink is None:
            return out
        cu_seqlens = params.packed_cu_seqlens()
        mass = local_rows_masses(query, key, split, params.context_rows(), key_roles=params.key_roles,
                                 cu_seqlens=cu_seqlens if cu_seqlens is not None else
                                 _whole_rows(batch, split.seq, query.device), num_roles=params.num_roles,
                                 softmax_scale=self.softmax_scale, impl=self.impl or params.impl)
        return sink(self.layer_index, mass, out, self.heads)

    def _fused(self, query, key, value, params, cu_seqlens, query_mask, scale, bias):
        """role_attention: out [B, S, H, D] and every row's masses [B, H, S, R]."""
        seq, batch = query.shape[:2]
        common: dict[str, Any] = dict(num_roles=params.num_roles, causal=True, softmax_scale=self.softmax_scale,
                                      role_logit_scale=scale, role_logit_bias=bias, impl=self.impl or params.impl,
                                      check_values=False)
        if cu_seqlens is None:
            return role_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                  params.key_roles, query_mask=query_mask, **common)
        # packed rows: one THD problem over the flattened B * S stream, one segment per sample
        flat = lambda x: x.transpose(0, 1).reshape(batch * seq, *x.shape[2:])  # noqa: E731
        out, mass = role_attention(flat(query), flat(key), flat(value), params.key_roles.reshape(-1),
                                   query_mask=None if query_mask is None else query_mask.reshape(-1),
                                   cu_seqlens=cu_seqlens, **common)
        out = out.view(batch, seq, *out.shape[1:])
        return out, mass.view(mass.shape[0], batch, seq, mass.shape[-1]).transpose(0, 1)  # [B, H, S, R]

    def _probe(self, query, key, value, params, cu_seqlens, rows):
        """causal_attention's out [B, S, H, D] and role_mass at ``rows`` [N, H, R] (None without rows)."""
        seq, batch = query.shape[:2]
        impl = self.impl or params.impl
        attention_impl = PLAIN_ATTENTION_FOR[impl]
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))         # [B, S, H, D]
        if cu_seqlens is None:
            out = causal_attention(q, k, v, params.key_roles, softmax_scale=self.softmax_scale, impl=attention_impl,
                                   check_values=False, spans=params.sdpa_spans())
        else:
            flat = lambda x: x.reshape(batch * seq, *x.shape[2:])  # noqa: E731
            out = causal_attention(flat(q), flat(k), flat(v), params.key_roles.reshape(-1),
                                   softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens, impl=attention_impl,
                                   check_values=False, spans=params.sdpa_spans()).view(batch, seq, *q.shape[2:])
        if rows is None:
            return out, None
        mass = role_mass(q.reshape(batch * seq, *q.shape[2:]), k.reshape(batch * seq, *k.shape[2:]),
                         params.key_roles.reshape(-1), rows, num_roles=params.num_roles,
                         softmax_scale=self.softmax_scale,
                         cu_seqlens=cu_seqlens if cu_seqlens is not None else _whole_rows(batch, seq, q.device),
                         impl=impl, check_values=False)
        return out, mass


class PlainCoreAttention(RoleMassCoreAttention):
    """The core attention of a standard (non-AVAR) layer: an AVAR layer's attention for ``out`` (also under context
    parallelism), reporting no masses."""

    reports_masses = False


def _whole_rows(batch: int, seq: int, device) -> torch.Tensor:
    """cu_seqlens of a padded batch seen as one THD stream: each row one sample (padding keys are masked)."""
    return torch.arange(0, (batch + 1) * seq, seq, device=device, dtype=torch.int32)
