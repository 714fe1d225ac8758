"""VAS through the role-attention hook equals VAS computed directly from HF's eager attention probabilities.

The ground truth is written from the definitions (docs/method.md, 'Visual Attention Score (VAS)') over the [S, S]
probabilities HF's eager attention returns (output_attentions=True), with plain Python loops over samples.
"""

import pytest
import torch

from analysis_cases import direct_vas, role_batch, tiny_hf_model
from megatron_avar.analysis.hf_attention import RoleAttentionHook
from megatron_avar.analysis.vas import (
    MASS_NUM_ROLES,
    VASAccumulator,
    mass_key_roles,
    vas_from_masses,
    vas_query_mask,
    vas_query_rows,
)
from megatron_avar.roles import TokenRole

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def run():
    model = tiny_hf_model(num_text_layers=NUM_LAYERS)
    model.set_attn_implementation("eager")
    inputs, roles = role_batch()
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True)
    masses = {}
    with RoleAttentionHook(model) as hook:
        hook.set_batch(roles, on_mass=lambda layer, mass: masses.__setitem__(layer, mass))
        with torch.no_grad():
            hooked = model(**inputs)
    assert model.config._attn_implementation == "eager"  # restored
    return dict(model=model, inputs=inputs, roles=roles, probs=[a.double() for a in eager.attentions],
                eager_logits=eager.logits, hooked_logits=hooked.logits, masses=masses)


def test_hook_logits_equal_eager(run):
    real = run["inputs"]["attention_mask"].bool()
    torch.testing.assert_close(run["hooked_logits"][real], run["eager_logits"][real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [(0, 1, 2), (1,), (0, 2)])
def test_vas_equals_direct_computation(run, layers):
    accumulator = VASAccumulator(layers, num_heads=4)
    # Two batches (rows 0-1, then row 2) must give the same as one: statistics are per sample.
    for rows in ([0, 1], [2]):
        accumulator.begin_batch(run["roles"][rows], sample_ids=[f"s{r}" for r in rows])
        for layer, mass in run["masses"].items():
            accumulator.add_layer(layer, mass[rows])
        accumulator.end_batch()
    result = accumulator.result()
    assert result.sample_ids == ["s0", "s1"] and result.skipped_sample_ids == ["s2"]
    for variant, exclude_sink in (("sink_included", False), ("sink_excluded", True)):
        direct = direct_vas(run["probs"], run["roles"], layers, exclude_sink)
        got = result.variants[variant]
        samples = list(direct.values())
        per_head = sum(s["ratio"] for s in samples) / len(samples)
        image = sum(s["img"] for s in samples) / len(samples)
        system = sum(s["sys"] for s in samples) / len(samples)
        # fp32 masses from role_attention vs fp32 probabilities summed in fp64: ratios up to ~1e2 carry ~1e-5.
        tol = dict(rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(got["vas_per_head"], dtype=torch.float64), per_head, **tol)
        torch.testing.assert_close(torch.tensor(got["vas_per_layer"], dtype=torch.float64), per_head.mean(1), **tol)
        assert got["vas"] == pytest.approx(float(per_head.mean()), rel=2e-5)
        assert got["per_sample_vas"] == pytest.approx([float(s["ratio"].mean()) for s in samples], rel=2e-5)
        assert result.image_share == pytest.approx(float(image.mean()), rel=2e-5)
        torch.testing.assert_close(torch.tensor(result.image_share_per_layer_head, dtype=torch.float64), image, **tol)
        assert got["system_share"] == pytest.approx(float(system.mean()), rel=2e-5)
        assert got["ratio_of_means"] == pytest.approx(float(image.mean() / system.mean()), rel=2e-5)
        assert sum(got["ratio_histogram"]) == sum(result.num_queries) * len(layers) * 4


def test_exclude_sink_changes_only_the_system_keys(run):
    result = vas_from_masses(run["masses"], run["roles"])
    included, excluded = result.variants["sink_included"], result.variants["sink_excluded"]
    # Removing the sink from K_sys lowers the system share by exactly the sink's mass and raises the VAS.
    probs, roles = run["probs"], run["roles"]
    sink_share = []
    for b in (0, 1):
        row = roles[b].tolist()
        sink = next(i for i, r in enumerate(row) if r >= 0)
        first_image = row.index(TokenRole.IMAGE)
        queries = [i for i, r in enumerate(row) if r == TokenRole.USER_TEXT and i > first_image]
        sink_share.append(torch.stack([p[b][:, queries, sink].mean() for p in probs]).mean())
    assert included["system_share"] - excluded["system_share"] == pytest.approx(float(sum(sink_share) / 2), rel=1e-5)
    assert excluded["vas"] > included["vas"] > 0
    # Masses with plain TokenRoles (the sink inside SYSTEM) give the sink-included numbers, and no excluded variant.
    plain = {layer: torch.cat([m[..., :TokenRole.TEMPLATE + 1].clone(), m[..., MASS_NUM_ROLES - 1:]], -1)
             for layer, m in run["masses"].items()}
    for m in plain.values():
        m[..., TokenRole.SYSTEM] += m[..., -1]
    plain = {layer: m[..., :-1] for layer, m in plain.items()}
    plain_result = vas_from_masses(plain, roles)
    assert plain_result.variants["sink_included"]["vas"] == pytest.approx(included["vas"], rel=1e-6)
    assert plain_result.variants["sink_excluded"] is None
    with pytest.raises(ValueError, match="separate sink role"):
        plain_result.to_json(exclude_sink=True)


def test_mass_key_roles_marks_the_first_real_token():
    roles = torch.tensor([[-1, -1, 0, 0, 4, 1, 2], [0, 0, 4, 2, 2, -1, -1]])
    key_roles = mass_key_roles(roles)
    assert key_roles.tolist() == [[-1, -1, 5, 0, 4, 1, 2], [5, 0, 4, 2, 2, -1, -1]]


def test_accumulator_rejects_bad_feeds(run):
    accumulator = VASAccumulator([0, 1], num_heads=4)
    accumulator.begin_batch(run["roles"])
    with pytest.raises(ValueError, match="mass must be"):
        accumulator.add_layer(0, run["masses"][0][:, :2])
    accumulator.add_layer(0, run["masses"][0])
    with pytest.raises(ValueError, match="without masses for layers \\[1\\]"):
        accumulator.end_batch()


def test_query_row_masses_give_the_whole_rows_vas(run):
    """A probe hands the accumulator only the VAS query rows' masses [N, H, R] (vas_query_rows order): the same
    statistics, bit for bit, as every row's masses [B, H, S, R]."""
    roles = run["roles"]
    rows = vas_query_rows(roles)
    assert rows.tolist() == vas_query_mask(roles).flatten().nonzero().flatten().tolist() and rows.numel() > 2
    whole = vas_from_masses(run["masses"], roles)
    accumulator = VASAccumulator(sorted(run["masses"]), num_heads=4)
    accumulator.begin_batch(roles)
    for layer, mass in run["masses"].items():
        flat = mass.permute(0, 2, 1, 3).reshape(-1, *mass.shape[1::2])  # [B * S, H, R]
        accumulator.add_layer(layer, flat[rows])
    accumulator.end_batch()
    assert accumulator.result() == whole
    accumulator.begin_batch(roles)
    with pytest.raises(ValueError, match=f"\\[N={rows.numel()}, H=4, R\\] \\(the VAS query rows\\)"):
        accumulator.add_layer(0, flat[rows[1:]])


def test_hook_with_mass_rows_runs_plain_attention_and_the_probe(run, monkeypatch):
    """Given mass_rows, the hook's layers take out from the plain attention and probe only those rows: the fused
    kernel never runs, the logits stay eager's, and the rows' masses are role_attention's at those rows."""
    from megatron_avar.analysis import hf_attention

    def no_fused_kernel(*args, **kwargs):
        raise AssertionError("role_attention ran: the hook should have used the plain attention and the probe")

    monkeypatch.setattr(hf_attention, "role_attention", no_fused_kernel)
    roles, rows = run["roles"], vas_query_rows(run["roles"])
    masses = {}
    with RoleAttentionHook(run["model"]) as hook:
        with pytest.raises(ValueError, match="mass_rows must be int64"):
            hook.set_batch(roles, on_mass=masses.__setitem__, mass_rows=rows + roles.numel())
        hook.set_batch(roles, on_mass=masses.__setitem__, mass_layers=[0, 2], mass_rows=rows)
        with torch.no_grad():
            logits = run["model"](**run["inputs"]).logits
    real = run["inputs"]["attention_mask"].bool()
    torch.testing.assert_close(logits[real], run["eager_logits"][real], atol=2e-5, rtol=1e-5)
    assert sorted(masses) == [0, 2]
    for layer, mass in masses.items():
        whole = run["masses"][layer]
        torch.testing.assert_close(mass, whole.permute(0, 2, 1, 3).reshape(-1, *whole.shape[1::2])[rows],
                                   atol=1e-6, rtol=1e-5)


def test_a_prefill_after_generated_tokens_lays_the_batch_out_again(run):
    """After cached decoding grew the batch (two generated tokens per row), a full forward over prompt and
    generated tokens sees the grown [B, S + 2] grid: the spans are worked out again (logits = eager's) and the
    mass rows move to it (their masses are the prompt-only prefill's: causal rows do not see later tokens)."""
    from analysis_cases import TEXT_TOKENS

    roles, rows = run["roles"], vas_query_rows(run["roles"])
    inputs = dict(run["inputs"])
    batch, seq = roles.shape
    new = torch.randint(*TEXT_TOKENS, (batch, 2), generator=torch.Generator().manual_seed(3))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], new], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)
    with torch.no_grad():
        eager = run["model"](**inputs).logits
    masses = {}
    with RoleAttentionHook(run["model"]) as hook:
        hook.set_batch(roles, on_mass=masses.__setitem__, mass_rows=rows)
        hook._grow(seq + 2)  # what two cached decoding steps do
        with torch.no_grad():
            logits = run["model"](**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], eager[real], atol=2e-5, rtol=1e-5)
    assert sorted(masses) == sorted(run["masses"])  # every layer reported (found in review: an empty loop passed)
    for layer, mass in masses.items():
        whole = run["masses"][layer]
        torch.testing.assert_close(mass, whole.permute(0, 2, 1, 3).reshape(-1, *whole.shape[1::2])[rows],
                                   atol=1e-6, rtol=1e-5)


def test_sharded_accumulators_merge_to_the_whole(run):
    import json

    from megatron_avar.analysis.vas import VASAccumulator

    whole = vas_from_masses(run["masses"], run["roles"], sample_ids=["a", "b", "c"])
    states = []
    for rows in ([1], [0, 2]):
        shard = VASAccumulator([0, 1, 2], num_heads=4)
        shard.begin_batch(run["roles"][rows], sample_ids=[["a", "b", "c"][r] for r in rows])
        for layer, mass in run["masses"].items():
            shard.add_layer(layer, mass[rows])
        shard.end_batch()
        states.append(json.loads(json.dumps(shard.state_dict())))  # as stored in report.json
    merged = VASAccumulator.merge(states).result()
    for variant in ("sink_included", "sink_excluded"):
        for key in ("vas", "ratio_of_means", "system_share"):
            assert merged.variants[variant][key] == pytest.approx(whole.variants[variant][key], rel=1e-12)
        assert merged.variants[variant]["ratio_histogram"] == whole.variants[variant]["ratio_histogram"]
    assert merged.image_share == pytest.approx(whole.image_share, rel=1e-12)
    assert sorted(merged.sample_ids) == ["a", "b"] and merged.skipped_sample_ids == ["c"]
    with pytest.raises(ValueError, match="disjoint"):
        VASAccumulator.merge([states[0], states[0]])


def test_pipeline_stages_merge_to_all_layers(run):
    from megatron_avar.analysis.vas import VASAccumulator
    from megatron_avar.analysis.vas_parallel import merge_stage_states

    whole = vas_from_masses(run["masses"], run["roles"])
    states = []
    for stage_layers in ([2], [0, 1]):  # stage order need not follow layer order
        stage = VASAccumulator(stage_layers, num_heads=4)
        stage.begin_batch(run["roles"])
        for layer in stage_layers:
            stage.add_layer(layer, run["masses"][layer])
        stage.end_batch()
        states.append(stage.state_dict())
    merged = VASAccumulator.merge([merge_stage_states(states)]).result()
    for variant in ("sink_included", "sink_excluded"):
        for key in ("vas", "ratio_of_means"):
            assert merged.variants[variant][key] == pytest.approx(whole.variants[variant][key], rel=1e-12)
        assert merged.variants[variant]["vas_per_layer"] == pytest.approx(whole.variants[variant]["vas_per_layer"],
                                                                          rel=1e-12)
        assert merged.variants[variant]["per_sample_vas"] == pytest.approx(whole.variants[variant]["per_sample_vas"],
                                                                           rel=1e-12)
    assert merged.layers == [0, 1, 2]


def test_packed_masses_unpack_to_the_padded_layout(run):
    """Masses of packed samples (role_attention with cu_seqlens) give the VAS of the padded batch."""
    from megatron_avar.analysis.vas_parallel import unpack_thd

    roles = run["roles"]
    real = roles >= 0
    roles_t = roles[real]                                              # rows concatenated without padding
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), real.sum(1).cumsum(0)])
    packed = {layer: m.permute(1, 0, 2, 3)[:, real] for layer, m in run["masses"].items()}   # [H, T, R]
    unpacked = {}
    for layer, mass_htr in packed.items():
        padded_roles, unpacked[layer] = unpack_thd(cu_seqlens, roles_t, mass_htr)
    assert torch.equal(padded_roles[padded_roles >= 0], roles_t)
    got, expected = vas_from_masses(unpacked, padded_roles), vas_from_masses(run["masses"], roles)
    for variant in ("sink_included", "sink_excluded"):
        for key in ("vas_per_layer", "per_sample_vas"):
            assert got.variants[variant][key] == pytest.approx(expected.variants[variant][key], rel=1e-12)
        assert got.variants[variant]["ratio_histogram"] == expected.variants[variant]["ratio_histogram"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hook_on_gpu_gives_the_cpu_masses_and_logits(run, monkeypatch, dtype):
    """On CUDA the hook's two routes: the fused Triton kernel (every row's masses) and the plain attention with
    the probe (mass_rows; the plain attention is Triton in fp32, SDPA's FlashAttention in bf16). fp32 with TF32
    off: both equal the CPU masses at the rows and the logits equal eager's; bf16: within bf16 error."""
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the vision tower's patch convolution
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = copy.deepcopy(run["model"]).to("cuda", dtype)
    inputs = {key: value.cuda() for key, value in run["inputs"].items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    roles, rows = run["roles"], vas_query_rows(run["roles"])
    real = run["inputs"]["attention_mask"].bool()
    logit_tol, mass_tol = (1e-4, 1e-5) if dtype == torch.float32 else (0.15, 2e-2)
    for mass_rows in (None, rows):
        masses = {}
        with RoleAttentionHook(model) as hook, torch.no_grad():
            hook.set_batch(roles, on_mass=masses.__setitem__, mass_rows=mass_rows)
            logits = model(**inputs).logits.float().cpu()
        torch.testing.assert_close(logits[real], run["eager_logits"][real], atol=logit_tol, rtol=logit_tol)
        assert sorted(masses) == sorted(run["masses"])  # every layer reported
        for layer, mass in masses.items():
            whole = run["masses"][layer]
            at_rows = whole.permute(0, 2, 1, 3).reshape(-1, *whole.shape[1::2])[rows]
            got = mass.cpu() if mass_rows is not None else mass.cpu().permute(0, 2, 1, 3).reshape(
                -1, *mass.shape[1::2])[rows]
            torch.testing.assert_close(got, at_rows, atol=mass_tol, rtol=0)
