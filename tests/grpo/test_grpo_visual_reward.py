"""r_visual from VisualRewardSink equals docs/method.md, 'Visual-anchored reward (GRPO)', computed directly, rollout
by rollout, in plain Python loops: from hand-made masses (packed rows and a padded batch), and from the attention
probabilities Hugging Face's EAGER attention returns for a tiny random Qwen2.5-VL (masses = probabilities summed per
key role; the direct computation reads the [S, S] probabilities themselves). Under tensor parallelism two sinks that
each see half of the heads, summed by a real all_reduce over 2 gloo ranks, give the full result (and a
pipeline split of the layers over 2 ranks does too); without the reduction the sink refuses. Finally the
sink inside our megatron Qwen2.5-VL's forward pass at TP=2 (the model's own masses, reduced over its TP
group) equals the direct computation from the HF eager probabilities of the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_avar.grpo.visual_reward import ResponseTokens, VisualRewardSink
from megatron_avar.models.role_mass_attention import LayerHeads
from megatron_avar.roles import TokenRole as R
from megatron_avar.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from analysis_cases import role_batch, tiny_hf_model  # noqa: E402

EPS = 1e-6  # docs/method.md, 'Visual-anchored reward (GRPO)', written here: this file is the ground truth
# One letter per role, for the role tables below (I: IMAGE).
S, I, U, A, T = int(R.SYSTEM), int(R.IMAGE), int(R.USER_TEXT), int(R.RESPONSE), int(R.TEMPLATE)  # noqa: E741
HEADS, NUM_LAYERS = 4, 3
# Packed: row 0 holds 3 rollouts (the middle one without an image), row 1 two and padding, row 2 one.
ROLES = torch.tensor([
    [S, S, T, I, I, U, T, A, A, A, S, T, U, U, T, A, A, S, S, T, I, U, T, A],
    [S, T, I, I, I, U, U, T, A, A, A, A, S, S, T, U, I, T, A, A, -1, -1, -1, -1],
    [S, S, S, T, U, I, I, U, T, A, A, A, A, A, A, -1, -1, -1, -1, -1, -1, -1, -1, -1],
])
SEGMENTS = torch.tensor([
    [0] * 10 + [1] * 7 + [2] * 7,
    [0] * 12 + [1] * 8 + [-1] * 4,
    [0] * 15 + [-1] * 9,
])


def _hand_masses(seed=0):
    """Per layer, float32 [B, H, S, 5] masses (each query's role masses sum to 1), zero on padding rows."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_LAYERS):
        logits = 3 * torch.randn(*ROLES.shape[:1], HEADS, ROLES.shape[1], 5, generator=generator)
        logits[0, :, 10:17, I] = -torch.inf  # row 0's second rollout has no image keys: no image mass
        out.append(torch.softmax(logits, -1) * (ROLES >= 0)[:, None, :, None])
    return out


def _direct_from_masses(masses, roles, segments, layers):
    """r_visual of every rollout (row-major, then segment), straight from the definition."""
    result = []
    for b in range(roles.shape[0]):
        for seg in sorted({int(s) for s in segments[b].tolist() if s >= 0}):
            tokens = [t for t in range(roles.shape[1]) if segments[b, t] == seg and roles[b, t] == A]
            total = 0.0
            for t in tokens:
                for layer in layers:
                    m = masses[layer][b, :, t].double()                    # [H, R]
                    total += (m[:, I].mean() / (m[:, S].mean() + EPS)).item()
            result.append(total / (len(tokens) * len(layers)))
    return torch.tensor(result, dtype=torch.float64)


def at_rows(mass, rows):
    """[B, H, S, R] masses at flat [B * S] rows -> [N, H, R]: what an AVAR layer hands a sink with query_rows."""
    return mass.permute(0, 2, 1, 3).reshape(-1, mass.shape[1], mass.shape[3])[rows]


def _sink_r_visual(masses, roles, segments, layers, heads=slice(None), reported=range(NUM_LAYERS), group=None):
    sink = VisualRewardSink(ResponseTokens(roles, segments), layers, epsilon=EPS)
    first = 0 if heads.start is None else heads.start
    for layer in reported:
        part = at_rows(masses[layer][:, heads], sink.query_rows)
        out = torch.zeros(1)
        assert sink(layer, part, out, LayerHeads(first, part.shape[1], HEADS)) is out
    sink.all_reduce(group)
    return sink.r_visual().double()


@pytest.mark.parametrize("layers", [(0, 1, 2), (2,), (0, 2)])
def test_packed_rows_equal_the_direct_computation(layers):
    masses = _hand_masses()
    tokens = ResponseTokens(ROLES, SEGMENTS)
    assert tokens.num_rollouts == 6 and tokens.count.tolist() == [3, 2, 1, 4, 2, 6]
    assert list(zip(tokens.rollout_row.tolist(), tokens.rollout_segment.tolist())) == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    got = _sink_r_visual(masses, ROLES, SEGMENTS, layers)
    expected = _direct_from_masses(masses, ROLES, SEGMENTS, layers)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert got[1] == 0 and (got[[0, 2, 3, 4, 5]] > 0).all()  # the rollout without an image gets 0


def test_padded_batch_equals_the_direct_computation():
    masses = _hand_masses(seed=1)
    roles = ROLES.clone()
    roles[0, 10:] = torch.tensor([U, U, T, A, A, T, A, A, A, A, A, A, A, A])  # one rollout per row, padded
    segments = torch.where(roles >= 0, 0, -1)
    got = _sink_r_visual(masses, roles, None, (0, 1, 2))
    torch.testing.assert_close(got, _direct_from_masses(masses, roles, segments, (0, 1, 2)), rtol=1e-5, atol=0)


def test_recomputed_layer_replaces_and_no_gradient_is_attached():
    masses = [m.clone().requires_grad_() for m in _hand_masses()]
    sink = VisualRewardSink(ResponseTokens(ROLES, SEGMENTS), (0, 1), epsilon=EPS)
    out = torch.randn(5, requires_grad=True)
    # Activation recompute: layer 0 is reported twice; the second report (the real masses) must replace the first.
    assert sink(0, at_rows(_hand_masses(seed=7)[0], sink.query_rows), out, LayerHeads(0, HEADS, HEADS)) is out
    for layer in range(NUM_LAYERS):
        assert sink(layer, at_rows(masses[layer], sink.query_rows), out, LayerHeads(0, HEADS, HEADS)) is out
    sink.all_reduce(None)
    got = sink.r_visual()
    assert not got.requires_grad and got.grad_fn is None
    torch.testing.assert_close(got.double(), _direct_from_masses(masses, ROLES, SEGMENTS, (0, 1)), rtol=1e-5, atol=0)


def test_missing_reduction_or_layer_is_refused():
    masses = _hand_masses()
    with pytest.raises(ValueError, match=r"fraction of its heads summed\) \[\(0, 0.5\)"):
        _sink_r_visual(masses, ROLES, SEGMENTS, (0,), heads=slice(0, 2))     # half the heads, no all_reduce
    with pytest.raises(ValueError, match=r"\[\(2, 0.0\)\]"):
        _sink_r_visual(masses, ROLES, SEGMENTS, (0, 2), reported=(0, 1))      # layer 2 never reported
    sink = VisualRewardSink(ResponseTokens(ROLES, SEGMENTS), (0,))
    with pytest.raises(RuntimeError, match="all_reduce"):
        sink.r_visual()
    with pytest.raises(ValueError, match="no RESPONSE token"):
        ResponseTokens(torch.tensor([[S, U, A], [S, U, U]]))
    with pytest.raises(ValueError, match="R = NUM_ROLES"):
        sink(0, torch.zeros(sink.tokens.num_tokens, HEADS, 6), torch.zeros(1), LayerHeads(0, HEADS, HEADS))


# ---- Hugging Face eager attention ----------------------------------------------------------------------------

HF_ROWS = [
    [("sys", 5), ("tmpl", 2), ("img", (1, 4, 6)), ("user", 6), ("tmpl", 3), ("resp", 5)],
    [("sys", 4), ("tmpl", 2), ("user", 3), ("img", (1, 6, 4)), ("user", 4), ("img", (1, 2, 2)), ("user", 2),
     ("tmpl", 3), ("resp", 7)],
    [("sys", 5), ("tmpl", 2), ("user", 8), ("tmpl", 3), ("resp", 4)],   # no image: r_visual = 0
]


@pytest.fixture(scope="module")
def eager():
    model = tiny_hf_model(num_text_layers=NUM_LAYERS)
    model.set_attn_implementation("eager")
    inputs, roles = role_batch(HF_ROWS)
    with torch.no_grad():
        probs = model(**inputs, output_attentions=True).attentions       # per layer [B, H, S, S]
    one_hot = torch.stack([roles == r for r in range(5)], dim=-1).to(probs[0].dtype)
    masses = [torch.einsum("bhij,bjr->bhir", p, one_hot) for p in probs]  # what the AVAR layers report
    return dict(inputs=inputs, roles=roles, probs=[p.double() for p in probs], masses=masses)


def _direct_from_probabilities(probs, roles, layers):
    """Per row (one rollout each): mean over RESPONSE queries t and layers of mean_h P[t, K_img] over
    mean_h P[t, K_sys] + eps, the key sets read from the roles."""
    out = []
    for b in range(roles.shape[0]):
        row = roles[b].tolist()
        image_keys = [j for j, r in enumerate(row) if r == I]
        system_keys = [j for j, r in enumerate(row) if r == S]
        queries = [t for t, r in enumerate(row) if r == A]
        total = 0.0
        for layer in layers:
            p = probs[layer][b]                                             # [H, S, S]
            for t in queries:
                total += (p[:, t, image_keys].sum(-1).mean() / (p[:, t, system_keys].sum(-1).mean() + EPS)).item()
        out.append(total / (len(queries) * len(layers)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("layers", [(0, 1, 2), (1,)])
def test_hf_eager_attention_padded_and_packed(eager, layers):
    roles, masses = eager["roles"], eager["masses"]
    expected = _direct_from_probabilities(eager["probs"], roles, layers)
    assert expected[2] == 0 and (expected[:2] > 0.01).all()  # the image is visible to the response queries
    # fp32 probabilities summed in fp32 (sink) vs fp64 (direct); ratios up to ~1e2 carry ~1e-5 relative error.
    torch.testing.assert_close(_sink_r_visual(masses, roles, None, layers), expected, rtol=2e-5, atol=1e-7)
    # The two image rows packed into one row (left padding dropped, 3 padding tokens at the end).
    real = [roles[b] >= 0 for b in (0, 1)]
    packed_roles = torch.cat([roles[0][real[0]], roles[1][real[1]], torch.full((3,), -1)])[None]
    segments = torch.cat([torch.zeros(int(real[0].sum())), torch.ones(int(real[1].sum())), torch.full((3,), -1)])
    packed = [torch.cat([m[0][:, real[0]], m[1][:, real[1]], torch.zeros(HEADS, 3, 5)], dim=1)[None]
              for m in masses]
    got = _sink_r_visual(packed, packed_roles, segments.long()[None], layers)
    torch.testing.assert_close(got, expected[:2], rtol=2e-5, atol=1e-7)


def _megatron_r_visual(inputs, roles, layers):
    """r_visual from our megatron Qwen2.5-VL (every decoder layer an AVAR layer, HF weights) at TP = world
    size: the sink rides along in the forward pass and is reduced over the model's own TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_state_dict
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    platform.prepare_megatron()
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0)
    hf = tiny_hf_model(num_text_layers=NUM_LAYERS)
    config = Qwen25VLConfig.from_hf(hf.config)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    model = Qwen25VLModel(config, MegatronSettings(tensor_model_parallel_size=tp, perform_initialization=False),
                          pg_collection=groups, role_mass_layers=tuple(range(NUM_LAYERS))).eval()
    load_hf_state_dict(model, hf.state_dict(), config)
    sink = VisualRewardSink(ResponseTokens(roles), layers, epsilon=EPS)
    with torch.no_grad():
        model(inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"], token_roles=roles, mass_sink=sink)
    sink.all_reduce(groups.tp)
    result = sink.r_visual().double()
    parallel_state.destroy_model_parallel()
    return result


def _on_rank(hand_masses, hf_masses, hf_inputs, hf_roles):
    """Rank r: a TP rank holding heads [2r, 2r + 2), a PP stage holding layer r only (layer 2 on rank 1), and
    a TP rank of the megatron model."""
    import torch.distributed as dist

    rank = dist.get_rank()
    heads = slice(2 * rank, 2 * rank + 2)
    return dict(
        tp_hand=_sink_r_visual(hand_masses, ROLES, SEGMENTS, (0, 1, 2), heads=heads, group=dist.group.WORLD),
        tp_hf=_sink_r_visual(hf_masses, hf_roles, None, (0, 1, 2), heads=heads, group=dist.group.WORLD),
        pp_hand=_sink_r_visual(hand_masses, ROLES, SEGMENTS, (0, 2), reported=(2 * rank,), group=dist.group.WORLD),
        megatron=_megatron_r_visual(hf_inputs, hf_roles, (0, 1, 2)),
    )


@pytest.mark.multiprocess
def test_tensor_parallel_head_halves_with_all_reduce_equal_the_full_sink(eager):
    hand = _hand_masses()
    inputs = {k: v for k, v in eager["inputs"].items() if k != "mm_token_type_ids"}
    ranks = run_on_ranks(_on_rank, 2, hand, eager["masses"], inputs, eager["roles"], timeout_s=240)
    full_hand = _sink_r_visual(hand, ROLES, SEGMENTS, (0, 1, 2))
    full_hf = _sink_r_visual(eager["masses"], eager["roles"], None, (0, 1, 2))
    full_pp = _sink_r_visual(hand, ROLES, SEGMENTS, (0, 2))
    direct = _direct_from_probabilities(eager["probs"], eager["roles"], (0, 1, 2))
    for result in ranks:  # every rank ends with the whole result
        torch.testing.assert_close(result["tp_hand"], full_hand, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["tp_hf"], full_hf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["pp_hand"], full_pp, rtol=1e-6, atol=1e-7)
        # The model's own masses (blockwise role_attention, fp32, TP=2) vs HF eager probabilities: masses agree
        # to ~1e-7 (tests/models/test_role_mass_layers.py), ratios up to ~1e2 amplify that to ~1e-5.
        torch.testing.assert_close(result["megatron"], direct, rtol=5e-5, atol=1e-6)
