"""The context-parallel attention of one rank (``models.context_parallel.local_rows_attention``), without a process
group: every rank's rows attended over the whole row's keys, put back in row order, equal causal attention of the
whole row — padded rows, packed rows whose samples straddle the ranks' chunks, GQA, CP = 2 and 3 — in values and
in the gradients summed over the ranks. Likewise the AVAR masses: each rank probes the sink's rows it holds
(``ContextRows``), and the results, gathered, equal the probe of the whole row. On a GPU: Qwen2.5-VL-7B's heads
on an 8k packed row in bf16, with memory far below one S x S score matrix.

Truth: ``causal_attention`` (role_attention's exact blockwise path) on the whole row. Tolerance: fp32, both are
softmax attention over the same keys in different blockings: ~1e-7 observed, bound 1e-5 relative.
"""

import pytest
import torch

from megatron_avar.models.context_parallel import ContextRows, ContextSplit, local_rows_attention, own_rows_masses
from megatron_avar.ops import role_mass
from megatron_avar.ops.causal_attention import causal_attention
from megatron_avar.segments import segment_cu_seqlens


def _split(seq: int, size: int, rank: int, device) -> ContextSplit:
    return ContextSplit.for_rank(seq, size, rank, device)


def _case(seq, batch, heads, kv_heads, dim, *, packed: bool, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(seq, batch, h, dim, generator=gen).to(device, dtype)
               for h in (heads, kv_heads, kv_heads))
    roles = torch.randint(0, 5, (batch, seq), generator=gen).to(device)
    segments = None
    if packed:  # three samples of uneven lengths and a padding tail in every row
        bounds = [0, seq // 3 + 1, seq // 2 + 3, seq - 5, seq]
        segments = torch.full((batch, seq), -1, dtype=torch.long, device=device)
        for index, (a, b) in enumerate(zip(bounds[:-2], bounds[1:-1])):
            segments[:, a:b] = index
        roles = roles.masked_fill(segments < 0, -1)
    else:
        roles[:, -3:] = -1  # right padding
    return q, k, v, roles, segments


def _whole_row(q, k, v, roles, segments):
    """causal_attention of the whole rows: out [S, B, H, D]."""
    seq, batch = q.shape[:2]
    flat = lambda x: x.transpose(0, 1).reshape(batch * seq, *x.shape[2:])  # noqa: E731
    cu_seqlens = segment_cu_seqlens(segments if segments is not None else torch.where(roles >= 0, 0, -1))
    out = causal_attention(flat(q), flat(k), flat(v), roles.reshape(-1), cu_seqlens=cu_seqlens, impl="blockwise")
    return out.view(batch, seq, *q.shape[2:]).transpose(0, 1)


def _by_ranks(q, k, v, roles, segments, size):
    """Every rank's out, put back in row order: [S, B, H, D]."""
    seq = q.shape[0]
    out = torch.zeros_like(q)
    for rank in range(size):
        split = _split(seq, size, rank, q.device)
        local = local_rows_attention(split.local(q, 0), k, v, split, key_roles=roles, segment_ids=segments,
                                     softmax_scale=q.shape[-1] ** -0.5)
        out = out.index_add(0, split.positions, local.transpose(0, 1))
    return out


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("query_block", [2048, 5])
def test_the_ranks_rows_equal_attention_of_the_whole_row(size, packed, query_block, monkeypatch):
    from megatron_avar.models import context_parallel

    monkeypatch.setattr(context_parallel, "QUERY_BLOCK", query_block)  # 5: blocks of 2 rows x 2 heads, one short
    q, k, v, roles, segments = _case(48 * size, 2, 4, 2, 16, packed=packed)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    want = _whole_row(*inputs, roles, segments)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    got = _by_ranks(*inputs, roles, segments, size)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    # fp32 sums in another order: errors of order 1e-7 of the tensor's scale, so 1e-5 of the largest |value|
    # (an element-wise bound failed on one near-zero gradient element, 1.2e-6 off, in 6144: found in review)
    for got_value, want_value in ((got, want), *zip(got_grads, want_grads)):
        torch.testing.assert_close(got_value, want_value, rtol=0, atol=1e-5 * float(want_value.abs().max()))
    assert bool((got[roles.t() < 0] == 0).all())  # padding rows give 0


ROW_CHOICES = {
    "every_other": lambda seq, batch: torch.arange(0, seq * batch, 2),
    "one_chunk": lambda seq, batch: torch.tensor([seq + 2, seq + 1, 3, 2]),  # rows of chunk 0 only: one rank
    "shuffled_with_repeats": lambda seq, batch: torch.cat([torch.randperm(seq * batch,
                                                           generator=torch.Generator().manual_seed(5))[:30],
                                                           torch.tensor([7, 7])]),
}


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("choice", list(ROW_CHOICES))
def test_each_rank_probes_its_own_rows_and_the_gather_gives_every_rows_masses(size, packed, choice):
    """ContextRows: each rank probes only the rows it holds (a rank may hold none), and the ranks' results, put
    side by side as the CP group's all-gather puts them and picked by ``assemble``, equal the probe of the whole
    row at the sink's rows, in the sink's order — in values, and in the gradients of q and k summed over ranks."""
    seq, batch = 16 * size, 2
    q, k, _, roles, segments = _case(seq, batch, 4, 2, 16, packed=packed, seed=4)
    cu_seqlens = segment_cu_seqlens(segments if segments is not None else torch.where(roles >= 0, 0, -1))
    rows = ROW_CHOICES[choice](seq, batch)
    q.requires_grad_(), k.requires_grad_()
    flat = lambda x: x.transpose(0, 1).reshape(batch * seq, *x.shape[2:])  # noqa: E731
    probe = dict(num_roles=5, softmax_scale=0.25, cu_seqlens=cu_seqlens)
    want = role_mass(flat(q), flat(k), roles.reshape(-1), rows, impl="reference", **probe)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(6))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k))
    splits = [_split(seq, size, rank, q.device) for rank in range(size)]
    plans = [ContextRows.build(split, rows, batch) for split in splits]
    assert all(torch.equal(plan.assemble, plans[0].assemble) for plan in plans)  # the same on every rank
    parts = [own_rows_masses(split.local(q, 0), k, plan, key_roles=roles, impl="blockwise", **probe)
             for split, plan in zip(splits, plans)]
    assert len({part.shape[0] for part in parts}) == 1  # one size for the all-gather: the busiest rank's count
    got = torch.cat(parts)[plans[0].assemble]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got_grad, want_grad in zip(torch.autograd.grad((got * weights).sum(), (q, k)), want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    if choice == "one_chunk":  # rank 0 holds the four rows; the others probe one spare row each, never read
        assert sorted(plans[0].rows.tolist()) == sorted(rows.tolist()) and int(plans[0].assemble.max()) < 4


@pytest.mark.gpu
def test_qwen_7b_heads_on_an_8k_packed_row_on_gpu():
    """28 / 4 heads, D=128, bf16, CP=2: each rank's rows equal the whole row's attention (fp32 truth, bf16
    resolution 2^-7 of the largest value), and a rank's forward + backward peaks far below one [heads, S, S]
    fp32 score matrix (7.5 GB): the masks are QUERY_BLOCK x S booleans, the scores never exist."""
    device = torch.device("cuda")
    q, k, v, roles, segments = _case(8192, 1, 28, 4, 128, packed=True, dtype=torch.bfloat16, device=device)
    want = _whole_row(*(t.float() for t in (q, k, v)), roles, segments)
    split = _split(8192, 2, 0, device)
    inputs = [t.requires_grad_() for t in (split.local(q, 0).contiguous(), k, v)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = local_rows_attention(*inputs, split, key_roles=roles, segment_ids=segments, softmax_scale=128 ** -0.5)
    out.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    expected = want.index_select(0, split.positions).transpose(0, 1)
    torch.testing.assert_close(out.float(), expected, atol=2 ** -7 * expected.abs().max().item(), rtol=0)
    assert peak < 1e9, f"peak {peak / 1e9:.2f} GB"


@pytest.mark.gpu
def test_each_ranks_own_rows_masses_on_gpu_at_qwen_7b_heads():
    """28 / 4 heads, D=128, bf16, CP=2, an 8k packed row: 400 sink rows across the two ranks' chunks, each rank
    probing its own with the Triton kernels, gathered, equal the whole row's masses (the fp32 reference on the same
    bf16 values: the kernels' products are exact in fp32, so float32 accumulation noise, bound 1e-4), and the
    backward runs to finite gradients."""
    device = torch.device("cuda")
    q, k, _, roles, segments = _case(8192, 1, 28, 4, 128, packed=True, dtype=torch.bfloat16, device=device)
    cu_seqlens = segment_cu_seqlens(segments)
    rows = torch.arange(1900, 2300, device=device)  # chunk 0 (rank 0) and chunk 1 (rank 1)
    probe = dict(num_roles=5, softmax_scale=128 ** -0.5, cu_seqlens=cu_seqlens)
    want = role_mass(q.float()[:, 0], k.float()[:, 0], roles[0], rows, impl="reference", **probe)
    key = k.requires_grad_()
    splits = [_split(8192, 2, rank, device) for rank in range(2)]
    plans = [ContextRows.build(split, rows, 1) for split in splits]
    queries = [split.local(q, 0).detach().requires_grad_() for split in splits]
    parts = [own_rows_masses(query, key, plan, key_roles=roles, impl="triton", **probe)
             for query, plan in zip(queries, plans)]
    got = torch.cat(parts)[plans[0].assemble]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    got[..., 3].sum().backward()
    assert all(bool(t.grad.isfinite().all()) for t in (*queries, key))


def test_backward_keeps_the_inputs_not_masks_or_scores():
    """What autograd keeps of one rank's attention: its queries and the gathered keys and values (once, as the
    kernel's [B, Hkv, S, D] layout) and the padding mask of its rows — far below the masks of its blocks (rows x
    keys x query heads per kv head bytes: 4.2 MB here), which are rebuilt in backward."""
    seq, size = 2048, 2
    q, k, v, roles, segments = _case(seq, 1, 4, 2, 16, packed=True)
    split = _split(seq, size, 0, q.device)
    inputs = [t.requires_grad_() for t in (split.local(q, 0).detach(), k, v)]
    saved: dict[int, int] = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = local_rows_attention(*inputs, split, key_roles=roles, segment_ids=segments, softmax_scale=0.25)
    inputs_bytes = sum(t.numel() * t.element_size() for t in inputs)
    masks_bytes = (seq // size) * 2 * seq
    assert sum(saved.values()) < 2.2 * inputs_bytes < masks_bytes / 2
    out.sum().backward()  # the recomputed blocks give the gradients (their values: the test above)
