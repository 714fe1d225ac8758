"""Context parallelism of the language model: every row split over the context-parallel (CP) group, attention exact.

The split (megatron's causal load balancing): a row of S tokens is cut into 2·cp equal chunks of L = S / (2·cp)
tokens, and CP rank r holds chunks r and 2·cp − 1 − r, in that order — so every rank has the same share of
causal attention work. The model splits the row right after the embedding (image features already in place)
and hands each rank's positions, labels and per-token loss in that order (:func:`local_positions`).

Attention, on every CP rank, for its own S / cp query rows: the keys and values of the whole row are all-gathered
over the CP group (their gradients are reduce-scattered back), and each local chunk attends to the keys up to
its own end (:func:`local_rows_attention`): causal, within its packed sample, never to padding. The per-batch
facts (roles, packing) are those of the whole row, identical on every CP rank.

AVAR masses of the rows a sink reads (:func:`local_rows_masses`): each rank probes only the sink's rows it holds
(its own queries against every key of the row), and the CP group all-gathers the results — so every rank hands
its sink the exact masses of all the sink's rows and computes the same AGTO term. The gather's backward hands
each rank its own gradient of its own rows, so the CP ranks' gradients add up to the exact gradient, as the
language-model loss's do (each rank's tokens). Which rows each rank holds, and where each row's masses land in
the gather, is worked out once per batch (:class:`ContextRows`, one host read of the per-rank counts); the
layers then make fixed-size calls. The probe's work per rank is its own rows' (the busiest rank's count), not
all N rows.

Memory: the gathered keys and values (2·S·Hkv·D per layer) are kept for backward; each block of ``QUERY_BLOCK``
rows is attended with a boolean mask of its rows x its keys, recomputed in backward (one more attention forward)
so that neither masks nor scores are ever kept; never S x S. Grouped-query heads share their key/value head
without copies (a group's query heads are folded into the rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["ContextSplit", "ContextRows", "local_positions", "local_rows_attention", "local_rows_masses",
           "own_rows_masses", "split_images", "gather_image_features", "QUERY_BLOCK"]

# Query rows (x query heads per kv head) per masked-attention call: the boolean mask is QUERY_BLOCK x (keys up to
# the block's end) per row.
QUERY_BLOCK = 2048


def local_positions(seq: int, size: int, rank: int, device=None) -> torch.Tensor:
    """int64 [seq / size]: the positions of a row of ``seq`` tokens that CP rank ``rank`` of ``size`` holds, in the
    order it holds them (chunks ``rank`` and ``2·size − 1 − rank`` of ``2·size``)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"context-parallel rank {rank} of {size}: need size >= 1 and 0 <= rank < size")
    if seq % (2 * size):
        raise ValueError(f"context parallelism over {size} ranks cuts each row into {2 * size} equal chunks, but "
                         f"the rows have {seq} tokens: make the row length a multiple of {2 * size}")
    chunk = seq // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, second])


@dataclass(frozen=True)
class ContextSplit:
    """One batch's rows over a CP group: ``group`` (None from ``for_rank`` without one), ``size`` ranks, this
    process's ``rank`` among them, the full row length
    ``seq``; ``positions`` int64 [seq / size] (:func:`local_positions`) and ``gather_order`` int64 [seq]: where each
    position of the row lies in the CP group's all-gather of the ranks' local tokens. Built once per batch, on
    the batch's device."""

    group: object
    size: int
    rank: int
    seq: int
    positions: torch.Tensor
    gather_order: torch.Tensor

    @classmethod
    def build(cls, group, seq: int, device) -> ContextSplit:
        """This process's split over ``group``."""
        return cls.for_rank(seq, group.size(), group.rank(), device, group=group)

    @classmethod
    def for_rank(cls, seq: int, size: int, rank: int, device, *, group=None) -> ContextSplit:
        """Rank ``rank`` of ``size``'s split (``group`` None: no process group, for the attention of one rank's
        rows given the whole row's keys, as in tests and benchmarks; ``gather`` then cannot run)."""
        gathered = torch.cat([local_positions(seq, size, r, device) for r in range(size)])
        return cls(group=group, size=size, rank=rank, seq=seq, positions=local_positions(seq, size, rank, device),
                   gather_order=torch.argsort(gathered))

    @property
    def chunk(self) -> int:
        return self.seq // (2 * self.size)

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of ``x`` along its sequence dimension ``dim`` (differentiable)."""
        return x.index_select(dim, self.positions)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[seq / size, ...] local tokens (dim 0) -> [seq, ...] the whole row in position order; the backward
        reduce-scatters the gradient back to each rank's tokens."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.group)
        return gathered.index_select(0, self.gather_order)


def _allowed_keys(query_pos: torch.Tensor, keys: int, key_roles: torch.Tensor,
                  segment_ids: torch.Tensor | None) -> torch.Tensor:
    """bool [B, 1, n, keys]: row position ``query_pos`` [n] may attend key j < keys (causal, real key, same
    sample). A row with no allowed key (a padding query) is allowed every key, so the softmax stays finite; its
    output is zeroed by the caller."""
    j = torch.arange(keys, device=query_pos.device)
    allowed = (j[None, :] <= query_pos[:, None])[None] & (key_roles[:, None, :keys] >= 0)
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, query_pos, None] == segment_ids[:, None, :keys])
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def _masked_block(block, k, v, first: int, end: int, group: int, key_roles, segment_ids, softmax_scale: float):
    """SDPA of one block of rows (positions [first, end), its ``group`` query heads per kv head folded into the
    rows) over keys [0, end), with the block's mask built here."""
    mask = _allowed_keys(torch.arange(first, end, device=block.device), end, key_roles, segment_ids)
    return F.scaled_dot_product_attention(block, k[:, :, :end], v[:, :, :end], attn_mask=mask.repeat(1, 1, group, 1),
                                          scale=softmax_scale)


def local_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: ContextSplit, *,
                         key_roles: torch.Tensor, segment_ids: torch.Tensor | None,
                         softmax_scale: float) -> torch.Tensor:
    """Causal attention of this rank's rows over the whole row.

    query [S_l, B, Hq, D] (this rank's tokens, in ``split.positions`` order); key / value [S, B, Hkv, D] of the
    whole row (``split.gather``); key_roles int [B, S] (-1: never attended), segment_ids int [B, S] or None
    (packed samples), both of the whole row. Returns out [B, S_l, Hq, D]; rows of role -1 give 0.
    """
    batch, heads, kv_heads, dim = query.shape[1], query.shape[2], key.shape[2], query.shape[3]
    group = heads // kv_heads
    # GQA without repeating keys: the `group` query heads of a kv head are folded into the query-row dimension
    # (query head h uses kv head h // group), so backward keeps the gathered keys and values once.
    k, v = (x.permute(1, 2, 0, 3).contiguous() for x in (key, value))     # [B, Hkv, S, D]
    q = query.permute(1, 2, 0, 3).reshape(batch, kv_heads, group, -1, dim)  # [B, Hkv, G, S_l, D]
    rows_per_call = max(1, QUERY_BLOCK // group)
    pieces = []
    for index, chunk_id in enumerate((split.rank, 2 * split.size - 1 - split.rank)):
        for offset in range(0, split.chunk, rows_per_call):
            rows = min(rows_per_call, split.chunk - offset)
            first = chunk_id * split.chunk + offset                         # row position of the block's first row
            end = first + rows                                              # keys after its last row: all masked
            local = index * split.chunk + offset
            block = q[:, :, :, local:local + rows].reshape(batch, kv_heads, group * rows, dim)
            # recomputed in backward: neither the block's mask nor its scores are kept
            block_out = checkpoint(_masked_block, block, k, v, first, end, group, key_roles, segment_ids,
                                   softmax_scale, use_reentrant=False)
            pieces.append(block_out.view(batch, kv_heads, group, rows, dim))
    out = torch.cat(pieces, dim=3).reshape(batch, heads, -1, dim).transpose(1, 2)  # [B, S_l, Hq, D]
    real = split.local(key_roles, 1) >= 0
    return out * real[..., None, None].to(out.dtype)


@dataclass(frozen=True)
class ContextRows:
    """A sink's rows over the CP group, worked out once per batch on its device.

    ``rows`` int64 [M]: the flat [B * S] indices of the sink's rows this rank holds, M the most any rank holds (a
    rank with fewer repeats its first position; those results are never read); ``queries`` int64 [M]: where their
    queries lie in this rank's local queries [S_l, B] flattened (slot·B + row); ``assemble`` int64 [N]: where each
    of the sink's N rows lies in the group's all-gather of every rank's [M] results.
    """

    rows: torch.Tensor
    queries: torch.Tensor
    assemble: torch.Tensor

    @classmethod
    def build(cls, split: ContextSplit, rows: torch.Tensor, batch: int) -> ContextRows:
        """``rows``: the sink's int64 [N] flat indices into the whole batch's [B * S] tokens (any order)."""
        chunk, size = split.chunk, split.size
        position, sample = rows % split.seq, rows // split.seq
        piece = position // chunk
        first_half = piece < size
        owner = torch.where(first_half, piece, 2 * size - 1 - piece)
        slot = position - piece * chunk + torch.where(first_half, 0, chunk)
        counts = torch.bincount(owner, minlength=size).tolist()        # the batch's one host read
        width = max(1, *counts)
        order = torch.argsort(owner, stable=True)
        starts = [sum(counts[:r]) for r in range(size)]
        in_gather = (owner[order] * width + torch.arange(rows.numel(), device=rows.device)
                     - torch.tensor(starts, device=rows.device)[owner[order]])
        mine = order[starts[split.rank]:starts[split.rank] + counts[split.rank]]
        spare = width - counts[split.rank]
        return cls(rows=torch.cat([rows[mine], split.positions[:1].expand(spare)]),
                   queries=torch.cat([(slot * batch + sample)[mine], rows.new_zeros(spare)]),
                   assemble=torch.empty_like(rows).index_copy_(0, order, in_gather))


def own_rows_masses(query: torch.Tensor, key: torch.Tensor, rows: ContextRows, *, key_roles: torch.Tensor,
                    cu_seqlens: torch.Tensor, num_roles: int, softmax_scale: float, impl: str) -> torch.Tensor:
    """This rank's part: float32 [M, Hq, R], the masses of ``rows.rows`` (its own queries, every key of the row).

    query [S_l, B, Hq, D] of this rank; key [S, B, Hkv, D] of the whole row; key_roles int [B, S]; cu_seqlens the
    whole batch's samples over the flat [B * S] stream."""
    from megatron_avar.ops import role_mass

    seq, batch = key.shape[:2]
    return role_mass(query.reshape(-1, *query.shape[2:]), key.transpose(0, 1).reshape(batch * seq, *key.shape[2:]),
                     key_roles.reshape(-1), rows.rows, q_index=rows.queries, num_roles=num_roles,
                     softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, impl=impl, check_values=False)


def local_rows_masses(query: torch.Tensor, key: torch.Tensor, split: ContextSplit, rows: ContextRows,
                      **probe) -> torch.Tensor:
    """The role masses of a sink's rows, exact on every CP rank: float32 [N, Hq, R] in the sink's row order.
    Each rank probes its own rows (:func:`own_rows_masses`, which takes ``probe``'s keywords) and the CP group
    all-gathers; the backward hands each rank the gradient of its own results (every rank's sink computes the
    same terms)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    mass = own_rows_masses(query, key, rows, **probe)
    gathered = gather_from_sequence_parallel_region(mass, tensor_parallel_output_grad=False, group=split.group)
    return gathered[rows.assemble]


def split_images(patches: list[int], size: int) -> list[tuple[int, int]]:
    """The images each of ``size`` CP ranks encodes: contiguous [first, end) ranges of the batch's images, balanced
    by patch count (``patches``: per image, in order; an image goes to the rank its middle patch falls in). A rank
    may get none (fewer images than ranks)."""
    total, starts, seen = sum(patches), [], 0
    for count in patches:
        starts.append(min(size - 1, (2 * seen + count) * size // max(2 * total, 1)))
        seen += count
    return [(sum(1 for owner in starts if owner < rank), sum(1 for owner in starts if owner <= rank))
            for rank in range(size)]


def gather_image_features(features: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """[counts[rank], H] merged image tokens this CP rank encoded -> [sum(counts), H] of every rank, in rank
    order; the backward sums each token's gradient over the ranks (the LM tokens that read it may sit on any rank)
    and hands every rank the gradient of its own tokens. Padded to max(counts) for the collective."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    width = max(counts)
    padded = F.pad(features, (0, 0, 0, width - features.shape[0]))
    gathered = gather_from_sequence_parallel_region(padded, tensor_parallel_output_grad=True, group=group)
    return torch.cat([gathered[rank * width:rank * width + count] for rank, count in enumerate(counts)])
