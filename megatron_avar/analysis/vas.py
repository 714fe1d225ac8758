"""Visual Attention Score (docs/method.md, 'Visual Attention Score (VAS)') as pure functions over per-layer role masses.

Any attention source feeds the same accumulator: the Hugging Face hook (``hf_attention.py``), or a
megatron core-attention module that returns role masses. The contract of one fed layer:

  mass  float [B, H, S, R]   mass[b, h, i, r] = attention probability that query i of row b, head h puts
                             on keys of role r, with the key roles of :func:`mass_key_roles` (R = 6: the
                             five TokenRoles plus ``SINK_ROLE``, the sample's first token) or plain
                             TokenRoles (R = 5: the sink is inside SYSTEM; the sink-excluded variant is
                             then not available).
  roles int [B, S]           the TokenRole of every token (PAD = -1 on padding, left or right).
  or only the rows VAS reads: mass float [N, H, R] at the rows of :func:`vas_query_rows` (a probe's output).

Definitions, per layer l, head h, query i, with eps = 1e-6:
  Q            USER_TEXT queries after the first IMAGE token of the row (causal: earlier ones cannot see it)
  m_IMG(i)     mass on IMAGE keys;  m_SYS(i) mass on SYSTEM keys, including the sink (position 0 of the
               sample) unless the variant is "sink_excluded"
  ratio(i)     m_IMG(i) / (m_SYS(i) + eps)
  VAS(sample)  mean over (l, h, i in Q) of ratio;  VAS = mean over samples of VAS(sample)
  per-layer / per-head VAS: the same means restricted to one layer / one (layer, head)
  image share  mean over samples of the per-sample mean of m_IMG (same for m_SYS: system share)
  ratio of means  image share / system share
Samples without an image, or without user text after it, have an empty Q: they are skipped and listed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_avar.roles import NUM_ROLES, TokenRole
from megatron_avar.segments import attention_sink_mask

__all__ = [
    "EPS", "SINK_ROLE", "MASS_NUM_ROLES", "VARIANTS", "RATIO_BINS", "mass_key_roles", "vas_query_mask",
    "vas_query_rows",
    "VASAccumulator", "VASResult", "vas_from_masses",
]

EPS = 1e-6
SINK_ROLE = NUM_ROLES  # extra key role: the first real token of each row (the attention sink, a SYSTEM token)
MASS_NUM_ROLES = NUM_ROLES + 1  # num_roles to pass to role_attention with mass_key_roles(...)
VARIANTS = ("sink_included", "sink_excluded")
# Histogram of log10(ratio) over RATIO_BINS (121 edges, -6 .. 6 by 0.1; ratios are at most 1 / eps = 1e6):
# count 0 holds log10 ratio <= -6 (zero included), count k (1..120) holds (edges[k-1], edges[k]].
RATIO_BINS = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)


def _check_roles(roles: torch.Tensor) -> None:
    if not isinstance(roles, torch.Tensor) or roles.dim() != 2 or roles.dtype.is_floating_point:
        raise ValueError(f"roles must be an integer tensor [B, S] of TokenRole ids, got "
                         f"{getattr(roles, 'shape', type(roles).__name__)}")


def mass_key_roles(roles: torch.Tensor) -> torch.Tensor:
    """Key roles for role_attention (num_roles=MASS_NUM_ROLES): ``roles`` with each row's attention sink
    (``segments.attention_sink_mask``: its first real token, when a SYSTEM one) set to SINK_ROLE. int64 [B, S];
    PAD stays -1."""
    _check_roles(roles)
    return torch.where(attention_sink_mask(roles), SINK_ROLE, roles.long())


def vas_query_rows(roles: torch.Tensor) -> torch.Tensor:
    """int64 [N]: the VAS queries Q as flat indices b * S + i, in row-major order (a mass sink's ``query_rows``;
    ``VASAccumulator.add_layer`` takes the masses of these rows in this order)."""
    return vas_query_mask(roles).flatten().nonzero().squeeze(1)


def vas_query_mask(roles: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: the VAS queries Q, USER_TEXT tokens placed after the row's first IMAGE token."""
    _check_roles(roles)
    is_image = roles == TokenRole.IMAGE
    after_image = torch.cumsum(is_image.long(), dim=1) > 0  # at or after the first image token
    return after_image & (roles == TokenRole.USER_TEXT)


@dataclass
class VASResult:
    """Finished statistics of one VAS run (all plain Python values; see the module docstring).

    Per variant v in VARIANTS (None when the masses did not separate the sink): vas, vas_per_layer [L],
    vas_per_head [L][H], ratio_of_means, ratio_of_means_per_layer [L], system_share,
    system_share_per_layer_head [L][H], ratio_histogram (counts over RATIO_BINS), per_sample_vas [N].
    image_share / image_share_per_layer_head do not depend on the variant.
    """

    layers: list[int]
    num_heads: int
    num_samples: int
    sample_ids: list[str]
    skipped_sample_ids: list[str]
    num_queries: list[int]
    image_share: float
    image_share_per_layer: list[float]
    image_share_per_layer_head: list[list[float]]
    variants: dict[str, dict | None] = field(default_factory=dict)

    def to_json(self, exclude_sink: bool = False) -> dict:
        """The report's statistics: top-level numbers are those of the chosen variant."""
        chosen = self.variants["sink_excluded" if exclude_sink else "sink_included"]
        if chosen is None:
            raise ValueError("exclude_sink needs masses with a separate sink role (R = MASS_NUM_ROLES, key roles "
                             "from mass_key_roles); these masses have the sink inside SYSTEM")
        present = {v: variant for v in VARIANTS if (variant := self.variants[v]) is not None}
        top = {key: chosen[key] for key in ("vas", "vas_per_layer", "vas_per_head", "ratio_of_means",
                                            "ratio_of_means_per_layer", "system_share")}
        return dict(top, image_share=self.image_share, image_share_per_layer=self.image_share_per_layer,
                    image_share_per_layer_head=self.image_share_per_layer_head, num_samples=self.num_samples,
                    layers=self.layers, num_heads=self.num_heads, exclude_sink=exclude_sink,
                    variants=self.variants, ratio_histogram_log10_edges=RATIO_BINS.tolist(),
                    samples=[{"id": i, "num_queries": n, **{f"vas_{v}": variant["per_sample_vas"][k]
                                                           for v, variant in present.items()}}
                             for k, (i, n) in enumerate(zip(self.sample_ids, self.num_queries))],
                    skipped_sample_ids=self.skipped_sample_ids)


@dataclass
class _BatchState:
    """What VASAccumulator holds between begin_batch and end_batch."""

    roles: torch.Tensor  # int [B, S] TokenRole ids
    query: torch.Tensor  # bool [B, S]: the VAS query rows Q
    counts: torch.Tensor  # int [B]: |Q| per row
    row_sample: torch.Tensor  # int64 [N]: the row of each Q row, in vas_query_rows order
    ids: list[str]  # sample id per row
    ratio: dict[str, torch.Tensor]  # per variant, float64 [B]: the row's ratio summed over layers and heads
    seen: set[int] = field(default_factory=set)  # layers added so far


class VASAccumulator:
    """Streams per-layer masses of batches into VAS statistics (float64 sums; O(L * H) memory).

    Usage per batch: ``begin_batch(roles, sample_ids)``, then ``add_layer(layer, mass)`` once for every
    layer in ``layers`` (any order), then ``end_batch()``. ``result()`` after the last batch.
    """

    def __init__(self, layers: Sequence[int], num_heads: int, *, eps: float = EPS):
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be a non-empty list of distinct layer indexes, got {list(layers)}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        self.layers = [int(layer) for layer in layers]
        self._slot = {layer: k for k, layer in enumerate(self.layers)}
        self.num_heads, self.eps = num_heads, eps
        shape = (len(self.layers), num_heads)
        self._ratio_sum = {v: torch.zeros(shape, dtype=torch.float64) for v in VARIANTS}
        self._sys_sum = {v: torch.zeros(shape, dtype=torch.float64) for v in VARIANTS}
        self._img_sum = torch.zeros(shape, dtype=torch.float64)
        self._hist = {v: torch.zeros(len(RATIO_BINS), dtype=torch.float64) for v in VARIANTS}
        self._sample_vas = {v: [] for v in VARIANTS}
        self._sink_separated: bool | None = None
        self.sample_ids: list[str] = []
        self.skipped: list[str] = []
        self.num_queries: list[int] = []
        self._batch: _BatchState | None = None

    def begin_batch(self, roles: torch.Tensor, sample_ids: Sequence[str] | None = None) -> None:
        """Start a batch: ``roles`` int [B, S] TokenRole ids (PAD = -1); ``sample_ids`` names the rows."""
        if self._batch is not None:
            raise RuntimeError("begin_batch called twice without end_batch")
        _check_roles(roles)
        batch = roles.shape[0]
        ids = [str(len(self.sample_ids) + len(self.skipped) + b) for b in range(batch)] if sample_ids is None \
            else [str(s) for s in sample_ids]
        if len(ids) != batch:
            raise ValueError(f"{len(ids)} sample ids for a batch of {batch} rows")
        query = vas_query_mask(roles).cpu()
        counts = query.sum(1)
        self._batch = _BatchState(roles=roles.cpu(), query=query, counts=counts, ids=ids,
                                  row_sample=query.nonzero()[:, 0],
                                  ratio={v: torch.zeros(batch, dtype=torch.float64) for v in VARIANTS})

    def add_layer(self, layer: int, mass: torch.Tensor) -> None:
        """Add one layer's masses: every row's, float [B, H, S, R], or only the VAS query rows', float [N, H, R] in
        the order of :func:`vas_query_rows` (what a probe of those rows returns). R = MASS_NUM_ROLES or NUM_ROLES
        (module docstring)."""
        state = self._batch
        if state is None:
            raise RuntimeError("add_layer before begin_batch")
        if layer not in self._slot:
            return  # a layer outside the selected set: not part of this VAS
        if layer in state.seen:
            raise ValueError(f"layer {layer} added twice in one batch")
        batch, seq_len = state.roles.shape
        num_rows = state.row_sample.numel()
        full = mass.dim() == 4 and tuple(mass.shape[:3]) == (batch, self.num_heads, seq_len)
        rows_only = mass.dim() == 3 and tuple(mass.shape[:2]) == (num_rows, self.num_heads)
        if not (full or rows_only) or mass.shape[-1] not in (NUM_ROLES, MASS_NUM_ROLES):
            raise ValueError(f"layer {layer}: mass must be [B={batch}, H={self.num_heads}, S={seq_len}, R] (every "
                             f"row) or [N={num_rows}, H={self.num_heads}, R] (the VAS query rows) with R in "
                             f"({NUM_ROLES}, {MASS_NUM_ROLES}), got {tuple(mass.shape)}")
        separated = mass.shape[-1] == MASS_NUM_ROLES
        if self._sink_separated is None:
            self._sink_separated = separated
        elif self._sink_separated != separated:
            raise ValueError("all layers must give masses with the same number of roles")
        state.seen.add(layer)
        slot = self._slot[layer]
        if full:
            mass = mass.detach().permute(0, 2, 1, 3)[state.query.to(mass.device)]  # [N, H, R]: the Q rows
        mass = mass.detach().to("cpu", torch.float64)
        weights = 1.0 / state.counts[state.row_sample].double()                    # [N]: 1/|Q| of the row's sample
        m_img = mass[..., TokenRole.IMAGE]
        m_sys_excl = mass[..., TokenRole.SYSTEM]
        m_sys = {"sink_excluded": m_sys_excl,
                 "sink_included": m_sys_excl + mass[..., SINK_ROLE] if separated else m_sys_excl}
        self._img_sum[slot] += weights @ m_img
        for variant in VARIANTS:
            ratio = m_img / (m_sys[variant] + self.eps)                              # [N, H]
            per_row_head = torch.zeros(batch, self.num_heads, dtype=torch.float64).index_add_(
                0, state.row_sample, ratio * weights[:, None])                       # mean over Q per (row, head)
            self._ratio_sum[variant][slot] += per_row_head.sum(0)
            self._sys_sum[variant][slot] += weights @ m_sys[variant]
            state.ratio[variant] += per_row_head.sum(1)
            bins = torch.bucketize(torch.log10(ratio.clamp(min=1e-300)), RATIO_BINS).clamp(max=len(RATIO_BINS) - 1)
            self._hist[variant] += torch.bincount(bins.flatten(), minlength=len(RATIO_BINS)).double()

    def end_batch(self) -> None:
        state = self._batch
        if state is None:
            raise RuntimeError("end_batch before begin_batch")
        missing = [layer for layer in self.layers if layer not in state.seen]
        if missing:
            raise ValueError(f"batch ended without masses for layers {missing}; every selected layer must be added")
        num_terms = len(self.layers) * self.num_heads
        for b, sample_id in enumerate(state.ids):
            if int(state.counts[b]) == 0:
                self.skipped.append(sample_id)
                continue
            self.sample_ids.append(sample_id)
            self.num_queries.append(int(state.counts[b]))
            for variant in VARIANTS:
                self._sample_vas[variant].append(float(state.ratio[variant][b]) / num_terms)
        self._batch = None

    def state_dict(self) -> dict:
        """The sums as plain JSON values; ``merge`` of the states of disjoint data shards is the accumulator of
        all their samples (exact up to float64 summation order)."""
        if self._batch is not None:
            raise RuntimeError("state_dict() during a batch; call end_batch first")
        return dict(layers=self.layers, num_heads=self.num_heads, eps=self.eps, sink_separated=self._sink_separated,
                    sample_ids=self.sample_ids, skipped=self.skipped, num_queries=self.num_queries,
                    img_sum=self._img_sum.tolist(),
                    ratio_sum={v: t.tolist() for v, t in self._ratio_sum.items()},
                    sys_sum={v: t.tolist() for v, t in self._sys_sum.items()},
                    hist={v: t.tolist() for v, t in self._hist.items()}, sample_vas=self._sample_vas)

    @classmethod
    def merge(cls, states: Sequence[dict]) -> VASAccumulator:
        """One accumulator from the ``state_dict`` of several shards (same layers, heads and eps; disjoint samples)."""
        if not states:
            raise ValueError("nothing to merge")
        first = states[0]
        merged = cls(first["layers"], first["num_heads"], eps=first["eps"])
        seen: set[str] = set()
        for index, state in enumerate(states):
            for key in ("layers", "num_heads", "eps"):
                if state[key] != first[key]:
                    raise ValueError(f"shard {index} has {key}={state[key]!r} but shard 0 has {first[key]!r}; "
                                     "merge only shards of one run configuration")
            ids = set(state["sample_ids"]) | set(state["skipped"])
            if ids & seen:
                raise ValueError(f"shard {index} repeats samples {sorted(ids & seen)[:5]}: shards must be disjoint")
            seen |= ids
            if state["sink_separated"] is not None:
                if merged._sink_separated not in (None, state["sink_separated"]):
                    raise ValueError("shards disagree on whether masses separate the sink role")
                merged._sink_separated = state["sink_separated"]
            merged.sample_ids += state["sample_ids"]
            merged.skipped += state["skipped"]
            merged.num_queries += state["num_queries"]
            merged._img_sum += torch.tensor(state["img_sum"], dtype=torch.float64)
            for v in VARIANTS:
                merged._ratio_sum[v] += torch.tensor(state["ratio_sum"][v], dtype=torch.float64)
                merged._sys_sum[v] += torch.tensor(state["sys_sum"][v], dtype=torch.float64)
                merged._hist[v] += torch.tensor(state["hist"][v], dtype=torch.float64)
                merged._sample_vas[v] += state["sample_vas"][v]
        return merged

    def result(self) -> VASResult:
        """The statistics; raises ValueError when no sample had VAS queries (nothing to average)."""
        if self._batch is not None:
            raise RuntimeError("result() during a batch; call end_batch first")
        n = len(self.sample_ids)
        if n == 0:
            raise ValueError(f"no sample has USER_TEXT after an image ({len(self.skipped)} skipped): VAS needs "
                             "samples with an image followed by the question text")
        img = self._img_sum / n
        variants: dict[str, dict | None] = {}
        for variant in VARIANTS:
            if variant == "sink_excluded" and not self._sink_separated:
                variants[variant] = None
                continue
            per_head = self._ratio_sum[variant] / n
            sys_share = self._sys_sum[variant] / n
            variants[variant] = dict(
                vas=float(per_head.mean()), vas_per_layer=per_head.mean(1).tolist(), vas_per_head=per_head.tolist(),
                ratio_of_means=_safe_div(float(img.mean()), float(sys_share.mean())),
                ratio_of_means_per_layer=[
                    _safe_div(a, s) for a, s in zip(img.mean(1).tolist(), sys_share.mean(1).tolist())],
                system_share=float(sys_share.mean()), system_share_per_layer_head=sys_share.tolist(),
                ratio_histogram=[int(c) for c in self._hist[variant].tolist()],
                per_sample_vas=list(self._sample_vas[variant]))
        return VASResult(layers=list(self.layers), num_heads=self.num_heads, num_samples=n,
                         sample_ids=list(self.sample_ids), skipped_sample_ids=list(self.skipped),
                         num_queries=list(self.num_queries), image_share=float(img.mean()),
                         image_share_per_layer=img.mean(1).tolist(), image_share_per_layer_head=img.tolist(),
                         variants=variants)


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def vas_from_masses(masses: dict[int, torch.Tensor], roles: torch.Tensor,
                    sample_ids: Sequence[str] | None = None) -> VASResult:
    """One batch at once: ``masses`` maps layer index -> mass [B, H, S, R]; the VAS over those layers."""
    if not masses:
        raise ValueError("masses is empty: pass {layer: mass [B, H, S, R]}")
    num_heads = next(iter(masses.values())).shape[1]
    accumulator = VASAccumulator(sorted(masses), num_heads)
    accumulator.begin_batch(roles, sample_ids)
    for layer, mass in masses.items():
        accumulator.add_layer(layer, mass)
    accumulator.end_batch()
    return accumulator.result()
