"""The AVAR SFT objective: L = L_LM + α·L_enh + β·L_sup (docs/method.md, 'AGTO objective'), exact under TP, PP, DP and
gradient accumulation.

Per sample s with an image (and a non-empty query set), per AVAR layer l and head h, with Q_s the USER_TEXT
queries after the sample's first IMAGE token and K_img / K_sys its IMAGE / SYSTEM keys:
    a(s,l,h) = Σ_{i∈Q_s} m_IMG(i,l,h) / (|Q_s|·|K_img,s|),   b(s,l,h) = Σ_{i∈Q_s} m_SYS(i,l,h) / (|Q_s|·|K_sys,s|)
    L_enh(s) = −mean_l mean_h log(a + ε),   L_sup(s) = +mean_l mean_h log(b + ε)
Samples without an image, or whose user text all precedes the image (Q empty: causal attention cannot see
the image), contribute no AGTO term. [decision] Normalisation over samples: the AGTO loss of a global
batch is the mean over its eligible samples, N = their count over all microbatches and data-parallel ranks
(known before the step from the token roles), so the result does not depend on the parallel layout.
The LM loss is likewise the mean over all loss tokens of the global batch.

Each layer's term is attached to that layer's output (``training.aux_loss``) as it runs, on whichever
pipeline stage holds it. Heads: a TP rank sums its own heads and divides by the global head count, so the
TP ranks' terms add up to the exact head mean, and each rank's gradient is exact for its heads.
``exclude_sink``: the first token of every sample (the attention sink) leaves K_sys; the trainer gives that
key the TEMPLATE role in the AVAR layers, so m_SYS no longer contains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_avar.models.layer_sets import check_layer_set, parse_layers
from megatron_avar.roles import TokenRole
from megatron_avar.segments import attention_sink_mask, sample_index
from megatron_avar.training.aux_loss import attach_aux_loss

if TYPE_CHECKING:  # megatron.core: config modules import this file and must not load megatron
    from megatron_avar.models.role_mass_attention import LayerHeads

__all__ = ["AGTOConfig", "QuerySets", "AGTOSink", "LAYER_METRICS"]

# Per-layer sums an AGTOSink keeps (over the eligible samples of its microbatch; per-head values / Hq):
# L_enh and L_sup of the layer, VAS (mean of m_IMG / (m_SYS + ε) over heads and Q), image share (mean m_IMG).
LAYER_METRICS = ("l_enh", "l_sup", "vas", "image_share")


@dataclass(frozen=True)
class AGTOConfig:
    """alpha: weight of L_enh (raise image mass). beta: weight of L_sup (lower system mass). epsilon: inside
    the logs and the VAS ratio. layers: the AVAR layers, a layer set (``models.layer_sets``: "all", "middle",
    "A-B", "i,j,k" or a list of 0-based decoder layer indexes).
    exclude_sink: drop each sample's first token from K_sys. alpha = beta = 0 trains plain SFT while the
    masses are still measured (a baseline with identical logging)."""

    alpha: float = 0.15
    beta: float = 0.15
    epsilon: float = 1e-6
    layers: str | list[int] = "all"
    exclude_sink: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and math.isfinite(self.beta)) or self.alpha < 0 or self.beta < 0:
            raise ValueError(f"avar.alpha and avar.beta must be finite and >= 0, got {self.alpha}, {self.beta}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"avar.epsilon must be > 0, got {self.epsilon}")
        check_layer_set(self.layers, field="avar.layers")

    def layer_indexes(self, num_layers: int) -> tuple[int, ...]:
        """``layers`` resolved for a model with ``num_layers`` decoder layers (sorted, distinct)."""
        return parse_layers(self.layers, num_layers, field="avar.layers")


class QuerySets:
    """The token sets of one microbatch: Q per sample, and |Q|, |K_img|, |K_sys| per sample.

    roles int [B, S] (TokenRole, -1 padding); segment_ids int [B, S] or None (packed rows: the sample index
    of each token in its row, -1 padding; None: one sample per row). Samples are numbered row-major
    (``segments.sample_index``). exclude_sink: K_sys without each sample's attention sink
    (``segments.attention_sink_mask``, the tokens the trainer gives the TEMPLATE role).
    """

    def __init__(self, roles: torch.Tensor, segment_ids: torch.Tensor | None, *, exclude_sink: bool = False):
        batch = roles.shape[0]
        sample, per_row = sample_index(roles, segment_ids)
        flat_roles = roles.reshape(-1)
        self.num_samples = batch * per_row
        count = lambda mask: torch.zeros(self.num_samples, dtype=torch.long).index_add_(  # noqa: E731
            0, sample[mask], torch.ones(int(mask.sum()), dtype=torch.long))
        real = sample >= 0
        image = real & (flat_roles == TokenRole.IMAGE)
        # Q: USER_TEXT tokens after the first IMAGE token of their own sample (samples never span rows, so a
        # cumulative count over the flattened rows, minus its value where the sample starts, counts per sample).
        images_so_far = torch.cumsum(image.long(), 0)
        first = torch.full((self.num_samples,), sample.numel(), dtype=torch.long).scatter_reduce(
            0, sample[real], torch.nonzero(real, as_tuple=True)[0], reduce="amin")
        before_sample = (images_so_far - image.long())[first.clamp(max=max(sample.numel() - 1, 0))]
        running = torch.where(real, images_so_far - before_sample[sample.clamp(min=0)], 0)
        query = real & (flat_roles == TokenRole.USER_TEXT) & (running > 0)
        self.q_index = torch.nonzero(query, as_tuple=True)[0]
        self.q_sample = sample[self.q_index]
        self.q_count = count(query)
        self.image_count = count(image)
        system = real & (flat_roles == TokenRole.SYSTEM)
        if exclude_sink:
            system = system & ~attention_sink_mask(roles, segment_ids).reshape(-1)
        self.system_count = count(system)
        self.eligible = (self.q_count > 0) & (self.image_count > 0) & (self.system_count > 0)

    @property
    def num_eligible(self) -> int:
        return int(self.eligible.sum())

    def to(self, device: torch.device) -> QuerySets:
        """The same sets with every tensor on ``device`` (once per micro-batch, so no layer copies them)."""
        moved = object.__new__(QuerySets)
        moved.num_samples = self.num_samples
        for name in ("q_index", "q_sample", "q_count", "image_count", "system_count", "eligible"):
            setattr(moved, name, getattr(self, name).to(device, non_blocking=True))
        return moved


class AGTOSink:
    """The mass sink of one microbatch: attaches each layer's AGTO term and keeps its metrics.

    sets: on the device of the masses (``QuerySets.to``). weight: 1 / N (eligible samples of the whole global
    batch). grad_scale: what the main loss's gradient is multiplied by that this term must also get
    (data-parallel size, as megatron's DDP averages gradients over DP, times the fp16 loss scale if any).
    num_layers: the number of AVAR layers (for mean_l). ``layer_sums`` stay on that device (float64): the
    trainer reads them once per step, so no layer waits for the host.
    """

    def __init__(self, sets: QuerySets, config: AGTOConfig, *, num_layers: int, weight: float, grad_scale: float):
        self.sets, self.config = sets, config
        self.num_layers, self.weight, self.grad_scale = num_layers, weight, grad_scale
        self.layer_sums: dict[int, torch.Tensor] = {}  # layer -> [len(LAYER_METRICS)] sums, detached

    @property
    def query_rows(self) -> torch.Tensor:
        """The rows this sink reads (``MassSink``): the queries Q of every sample, flat [B * S] indices."""
        return self.sets.q_index

    def __call__(self, layer_index: int, q_mass: torch.Tensor, out: torch.Tensor, heads: LayerHeads) -> torch.Tensor:
        """q_mass: float32 [Nq, heads.local, R], the masses of ``query_rows``."""
        sets, eps = self.sets, self.config.epsilon
        local_heads = q_mass.shape[1]
        zeros = q_mass.new_zeros(sets.num_samples, local_heads)
        image_sum = zeros.index_add(0, sets.q_sample, q_mass[..., TokenRole.IMAGE])
        system_sum = zeros.index_add(0, sets.q_sample, q_mass[..., TokenRole.SYSTEM])
        eligible = sets.eligible
        q_count = sets.q_count.clamp(min=1)[:, None].to(q_mass.dtype)
        a = image_sum / (q_count * sets.image_count.clamp(min=1)[:, None])
        b = system_sum / (q_count * sets.system_count.clamp(min=1)[:, None])
        l_enh = -torch.log(a + eps).sum(1) / heads.total   # per sample, this rank's share of the head mean
        l_sup = torch.log(b + eps).sum(1) / heads.total
        term = (self.config.alpha * l_enh + self.config.beta * l_sup) / self.num_layers
        aux = (term * eligible).sum() * self.weight
        with torch.no_grad():
            ratio = q_mass[..., TokenRole.IMAGE] / (q_mass[..., TokenRole.SYSTEM] + eps)
            vas = zeros.index_add(0, sets.q_sample, ratio).sum(1) / (heads.total * q_count[:, 0])
            share = image_sum.detach().sum(1) / (heads.total * q_count[:, 0])
            metrics = torch.stack([l_enh.detach(), l_sup.detach(), vas, share], dim=1)  # [num_samples, 4]
            self.layer_sums[layer_index] = (metrics * eligible[:, None]).sum(0).double()
        if self.config.alpha == 0 and self.config.beta == 0:
            return out
        return attach_aux_loss(out, aux, self.grad_scale)
