"""r_visual, the visual-attention score of each rollout (docs/method.md, 'Visual-anchored reward (GRPO)'), from the
masses of the forward pass that recomputes the old log-probs — no extra forward, no attention matrix, nothing but a
few numbers per response token leaving the attention kernels' outputs.

Per rollout, with T its RESPONSE queries (tokens whose own role is RESPONSE: the assistant content and its
closing `<|im_end|>`), L the configured layers, H the layer's query heads (ALL of them, over every TP rank):

    m̄_X(t, l) = (1/H) Σ_h m_X(t, l, h)                      X ∈ {IMG, SYS}
    r_visual  = (1/|T|) Σ_{t∈T} (1/|L|) Σ_{l∈L} m̄_IMG(t, l) / (m̄_SYS(t, l) + ε)

The ratio is taken per (token, layer) AFTER the head mean, so it does not split over tensor-parallel ranks
(a sum of per-rank ratios is not the ratio of the sums). Each rank's :class:`VisualRewardSink` therefore
keeps, per response token and layer, its OWN heads' share of the two head means, Σ_{h local} m_X / H, in
a [num_response_tokens, num_layers, 2] buffer; after the forward :meth:`VisualRewardSink.all_reduce` sums
the buffers over the TP group in one collective (and over the pipeline group under PP, where each stage
holds only its own layers and zeros elsewhere); :meth:`VisualRewardSink.r_visual` then forms the ratios and
the per-rollout means. It refuses to run before every configured layer's heads have all been summed in.

Rollouts: ``roles`` [B, S] (TokenRole, PAD = -1) and ``segment_ids`` [B, S] (packed rows: the sample of each
token within its row, -1 on padding) or None (padded batch: one rollout per row). Rollouts are numbered
row-major, by row and then by segment id within the row, counting only segments that exist — with the same
number of segments in every row this is ``training.objective.QuerySets``'s numbering (b · per_row + seg).
A row of padding only holds no rollout (numbering: ``segments.sample_index``). K_img / K_sys are the keys the
model was given as IMAGE / SYSTEM: the sink (``segments.attention_sink_mask``) is inside K_sys, as in the spec;
to leave it out, give it the TEMPLATE role in the AVAR layers, as the SFT trainer does for ``exclude_sink``.

The sink never changes the layer output and attaches no gradient: rewards are constants of the step.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from megatron_avar.models.role_mass_attention import LayerHeads
from megatron_avar.roles import NUM_ROLES, TokenRole
from megatron_avar.segments import sample_index, unpacked_segment_ids

__all__ = ["ResponseTokens", "VisualRewardSink"]

_HEAD_COVERAGE_TOLERANCE = 1e-4  # Σ over ranks of local/total heads must be 1 (float sum of k terms 1/k)


class ResponseTokens:
    """Where the RESPONSE queries of a micro-batch are and which rollout each belongs to.

    index: int64 [N_t], positions in the row-major flattened [B * S] token stream; rollout: int64 [N_t], the
    rollout of each; count: int64 [num_rollouts], |T| per rollout (all >= 1); rollout_row /
    rollout_segment: int64 [num_rollouts], the row and segment id of each rollout (segment 0 unpacked).
    """

    def __init__(self, roles: torch.Tensor, segment_ids: torch.Tensor | None = None):
        if roles.dim() != 2:
            raise ValueError(f"roles must be [B, S], got shape {tuple(roles.shape)}")
        batch, seq = roles.shape
        if segment_ids is None:
            segment_ids = unpacked_segment_ids(roles)
        elif segment_ids.shape != roles.shape:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must have the shape of roles "
                             f"{tuple(roles.shape)}")
        if bool(((segment_ids < 0) != (roles < 0)).any()):
            raise ValueError("segment_ids must be -1 exactly where roles are PAD (-1)")
        roles = roles.long()
        key, per_row = sample_index(roles, segment_ids)
        per_row = max(per_row, 1)  # no real token: no rollout, and nothing to divide
        keys, dense = torch.unique(key[key >= 0], return_inverse=True)   # sorted: row-major, then segment
        rollout_of_token = torch.full_like(key, -1)
        rollout_of_token[key >= 0] = dense
        response = roles.reshape(-1) == TokenRole.RESPONSE
        self.index = torch.nonzero(response, as_tuple=True)[0]
        self.rollout = rollout_of_token[self.index]
        self.num_rollouts = int(keys.numel())
        self.rollout_row, self.rollout_segment = keys // per_row, keys % per_row
        self.count = torch.zeros(self.num_rollouts, dtype=torch.long, device=roles.device).index_add_(
            0, self.rollout, torch.ones_like(self.rollout))
        empty = torch.nonzero(self.count == 0, as_tuple=True)[0].tolist()
        if empty:
            where = [(int(self.rollout_row[i]), int(self.rollout_segment[i])) for i in empty[:5]]
            raise ValueError(f"{len(empty)} rollout(s) have no RESPONSE token, e.g. (row, segment) {where}: "
                             "every rollout needs its generated tokens marked TokenRole.RESPONSE")
        self.seq_length = seq
        self.batch_size = batch

    @property
    def num_tokens(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device) -> ResponseTokens:
        """These tokens with their index tensors on ``device`` (built on the host from the loader's roles, the
        checks above read nothing from a GPU)."""
        moved = copy.copy(self)
        for name in ("index", "rollout", "count", "rollout_row", "rollout_segment"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved


class VisualRewardSink:
    """A ``models.role_mass_attention.MassSink`` for the old-log-prob forward pass (module docstring).

    tokens: the micro-batch's :class:`ResponseTokens`; layers: the 0-based decoder layers averaged over (the
    model's AVAR layers must include them; other layers' reports are ignored); epsilon: ε (> 0).

        sink = VisualRewardSink(ResponseTokens(roles, segment_ids), layers, epsilon=1e-6)
        model(..., mass_sink=sink)            # the pass that recomputes old log-probs
        sink.all_reduce(tp_group)             # None: no tensor parallelism (nothing to reduce)
        r_visual = sink.r_visual()            # float32 [num_rollouts], on the masses' device
    """

    def __init__(self, tokens: ResponseTokens, layers: Sequence[int], *, epsilon: float = 1e-6):
        layers = tuple(int(layer) for layer in layers)
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"layers must be distinct 0-based decoder layer indexes (at least one), got {layers}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.tokens, self.layers, self.epsilon = tokens, layers, float(epsilon)
        self._slot = {layer: k for k, layer in enumerate(layers)}
        self._partial: torch.Tensor | None = None   # float32 [N_t, num_layers, 2]: (IMG, SYS) head-mean shares
        self._coverage: torch.Tensor | None = None  # float32 [num_layers]: Σ local heads / total heads
        self._reduced = False

    def _buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._partial is None or self._coverage is None:  # (made together)
            self._partial = torch.zeros(self.tokens.num_tokens, len(self.layers), 2, device=device)
            self._coverage = torch.zeros(len(self.layers), device=device)
        return self._partial, self._coverage

    @property
    def query_rows(self) -> torch.Tensor:
        """The rows this sink reads (``MassSink``): every RESPONSE query, flat [B * S] indices."""
        return self.tokens.index

    def __call__(self, layer_index: int, mass: torch.Tensor, out: torch.Tensor, heads: LayerHeads) -> torch.Tensor:
        """mass: float32 [N_t, heads.local, R], the masses of ``query_rows`` (the response tokens)."""
        slot = self._slot.get(layer_index)
        if slot is None:
            return out
        if self._reduced:
            raise RuntimeError("VisualRewardSink received masses after all_reduce: use a new sink per forward pass")
        num_tokens, local_heads, num_roles = mass.shape
        if num_tokens != self.tokens.num_tokens or num_roles != NUM_ROLES:
            raise ValueError(f"layer {layer_index} reported masses of shape {tuple(mass.shape)}; this sink reads "
                             f"{self.tokens.num_tokens} response rows and needs R = NUM_ROLES = {NUM_ROLES} "
                             "(TokenRole key roles, SYSTEM including the sink)")
        if local_heads != heads.local:
            raise ValueError(f"layer {layer_index}: masses hold {local_heads} heads but heads.local = {heads.local}")
        partial, coverage = self._buffers(mass.device)
        with torch.no_grad():  # a reward, never a loss: no graph is kept or extended
            # Two integer indices, not a list: a list index is copied to the device, a host sync per layer.
            mass = mass.detach()
            rows = torch.stack((mass[..., TokenRole.IMAGE], mass[..., TokenRole.SYSTEM]), -1).sum(1)  # [N_t, 2]
            # Assignment, not accumulation: under activation recompute a layer is reported twice.
            partial[:, slot] = rows.float() / heads.total
            coverage[slot] = heads.local / heads.total
        return out

    def all_reduce(self, groups=None) -> None:
        """Sum the per-rank partial head sums over ``groups``: None (no model parallelism), a process group
        (the tensor-parallel group), or a sequence of groups (TP group, then the pipeline group under PP).
        One collective per group, over one flat buffer. Call once, after the forward pass, on every rank of
        the group (ranks that hold none of the layers contribute zeros)."""
        if self._reduced:
            raise RuntimeError("VisualRewardSink.all_reduce was already called for this forward pass")
        if groups is None:
            groups = ()
        elif not isinstance(groups, (list, tuple)):
            groups = (groups,)
        if groups:
            import torch.distributed as dist

            partial, coverage = self._buffers(self._device_for(groups))
            flat = torch.cat([partial.reshape(-1), coverage])
            for group in groups:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            self._partial = flat[:partial.numel()].view_as(partial)
            self._coverage = flat[partial.numel():]
        self._reduced = True

    def _device_for(self, groups) -> torch.device:
        if self._partial is not None:
            return self._partial.device
        # A pipeline stage without any of the layers still joins the collective, on its backend's device.
        import torch.distributed as dist

        backend = dist.get_backend(groups[0])
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def r_visual(self) -> torch.Tensor:
        """float32 [num_rollouts]: each rollout's r_visual (module docstring), on the masses' device.
        Raises if a configured layer was never reported or its heads do not add up to the whole layer
        (a missing :meth:`all_reduce` under TP, or a layer that is not an AVAR layer of the model)."""
        if not self._reduced:
            raise RuntimeError("call VisualRewardSink.all_reduce(tp_group) (None without model parallelism) "
                               "before r_visual(): head means need every tensor-parallel rank's heads")
        if self._partial is None or self._coverage is None:
            raise ValueError(f"no masses reached the visual-reward sink for layers {list(self.layers)}: pass it "
                             "as the model's mass_sink in the old-log-prob forward pass")
        coverage = self._coverage.tolist()
        bad = [(layer, round(c, 4)) for layer, c in zip(self.layers, coverage)
               if abs(c - 1.0) > _HEAD_COVERAGE_TOLERANCE]
        if bad:
            raise ValueError(f"layers (layer, fraction of its heads summed) {bad}: every configured layer must be "
                             "an AVAR layer of the model, and under tensor/pipeline parallelism all_reduce must "
                             "be given the TP group (and the PP group)")
        image, system = self._partial[..., 0], self._partial[..., 1]                  # [N_t, L] head means
        per_token = (image / (system + self.epsilon)).mean(dim=1)                     # [N_t]
        rollout = self.tokens.rollout.to(per_token.device)
        sums = torch.zeros(self.tokens.num_rollouts, device=per_token.device).index_add_(0, rollout, per_token)
        return sums / self.tokens.count.to(per_token.device)
