"""megatron-core GPTModel gives the same loss and gradients at TP=2 and PP=2 as at TP=1/PP=1.

All layouts run inside ONE 2-rank launch (a launch costs seconds; a layout a fraction of one): each rank
builds the reference model (TP=1, PP=1: both ranks compute it independently), then TP=2, then PP=2
(1F1B, 4 microbatches), then the tied-embedding variants, re-initialising megatron's parallel state in
between. Weights come from `megatron_avar.testing.fill_logical_weights`, so every layout holds the same
logical weights; the microbatches are identical and go through megatron's `get_forward_backward_func`
in every layout. A deliberately wrong qkv slicing shows the comparison can fail. The last tests check
the weight helpers in a single process.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_avar import platform
from megatron_avar.testing import (
    fill_logical_weights,
    gather_full_tensors,
    global_named_parameters,
    logical_tensor,
    run_on_ranks,
)

NUM_LAYERS, HIDDEN, HEADS, QUERY_GROUPS, FFN, VOCAB = 4, 64, 4, 2, 128, 128
SEQ, MICRO_BATCH, NUM_MICROBATCHES = 16, 2, 4
WEIGHT_SEED, DATA_SEED, WEIGHT_STD = 1234, 99, 0.1
# One parameter of each kind, from both pipeline stages: embedding (first stage), GQA qkv weight and
# bias (column-parallel, grouped rows), SwiGLU fc1 (column-parallel, [gate; up]), attention proj and
# fc2 (row-parallel), norms (replicated), output layer (last stage).
CHECKED_GRADS = (
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.1.mlp.linear_fc1.weight",
    "decoder.layers.1.input_layernorm.weight",
    "decoder.layers.2.self_attention.linear_proj.weight",
    "decoder.layers.3.mlp.linear_fc2.weight",
    "decoder.layers.3.self_attention.linear_qkv.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)


def _microbatches():
    generator = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.randint(0, VOCAB, (NUM_MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=generator)
    return [(mb[:, :-1].contiguous(), mb[:, 1:].contiguous()) for mb in tokens]


def _build_gpt(tp, pp, tied=False):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_query_groups=QUERY_GROUPS, ffn_hidden_size=FFN, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        hidden_dropout=0.0, attention_dropout=0.0,
        # Fusions are GPU kernels (or torch.compile, +14 s on CPU); the math is the same.
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
        max_sequence_length=SEQ, position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _forward_backward(model, microbatches):
    """Megatron's schedule for this layout (1F1B for PP>1); returns the per-microbatch losses seen here."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    causal_mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True = masked
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        output = model(tokens, positions, causal_mask, labels=labels)

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            # clone: the schedule divides the returned loss in place by num_microbatches.
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    return [report["loss"].item() for report in reports]


def _run_layout(tp, pp, microbatches, *, tied=False, corrupt_qkv=False):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        model_parallel_cuda_manual_seed(0)
        model = _build_gpt(tp, pp, tied)
        filled = fill_logical_weights(model, seed=WEIGHT_SEED, std=WEIGHT_STD)
        if corrupt_qkv:
            _slice_qkv_as_if_q_k_v_were_stacked(model)
        weights = gather_full_tensors(model)
        losses = _forward_backward(model, microbatches)
        if tied:  # tied embedding grads need megatron's embedding-group all-reduce: compare losses only
            return {"losses": losses, "filled": filled}
        grads = gather_full_tensors(model, CHECKED_GRADS, grads=True)
        return {"losses": losses, "grads": grads, "filled": filled, "weights": weights}
    finally:
        parallel_state.destroy_model_parallel()


@torch.no_grad()
def _slice_qkv_as_if_q_k_v_were_stacked(model):
    """The wrong TP slicing a [Q; K; V] (HF-style) layout would suggest: proves the test can fail."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    head_dim = HIDDEN // HEADS
    sections = [HEADS * head_dim, QUERY_GROUPS * head_dim, QUERY_GROUPS * head_dim]
    params = dict(global_named_parameters(model))
    for name, full in gather_full_tensors(model).items():
        if name.endswith("linear_qkv.weight"):
            parts = full.split(sections, dim=0)
            params[name].copy_(torch.cat([part.chunk(size, dim=0)[rank] for part in parts], dim=0))


def _all_layouts():
    platform.prepare_megatron()
    microbatches = _microbatches()
    return {
        "reference": _run_layout(1, 1, microbatches),
        "tp2": _run_layout(2, 1, microbatches),
        "pp2": _run_layout(1, 2, microbatches),
        "tp2_wrong_qkv_slicing": _run_layout(2, 1, microbatches, corrupt_qkv=True)["losses"],
        # Tied embeddings: the last stage's copy of the embedding (output_layer.weight marked
        # shared_embedding) must get the embedding's logical weights.
        "reference_tied": _run_layout(1, 1, microbatches, tied=True),
        "pp2_tied": _run_layout(1, 2, microbatches, tied=True),
    }


@pytest.fixture(scope="module")
def layouts():
    return run_on_ranks(_all_layouts, 2, timeout_s=300)


def _max_rel_diff(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.multiprocess
def test_reference_is_the_same_on_both_ranks(layouts):
    reference = layouts[0]["reference"]
    assert len(reference["losses"]) == NUM_MICROBATCHES
    assert reference["losses"] == layouts[1]["reference"]["losses"]


@pytest.mark.multiprocess
def test_tied_pp_stages_fill_the_embedding_twice(layouts):
    stages = layouts[0]["pp2_tied"]["filled"], layouts[1]["pp2_tied"]["filled"]
    assert "embedding.word_embeddings.weight" in stages[0] and "embedding.word_embeddings.weight" in stages[1]
    assert "output_layer.weight" not in stages[0] + stages[1]
    assert sorted(set(stages[0] + stages[1])) == sorted(layouts[0]["reference_tied"]["filled"])


@pytest.mark.multiprocess
def test_every_layout_fills_the_same_global_parameters(layouts):
    reference = sorted(layouts[0]["reference"]["filled"])
    assert sorted(layouts[0]["tp2"]["filled"]) == sorted(layouts[1]["tp2"]["filled"]) == reference
    pp_stages = layouts[0]["pp2"]["filled"], layouts[1]["pp2"]["filled"]
    assert not set(pp_stages[0]) & set(pp_stages[1])
    assert sorted(pp_stages[0] + pp_stages[1]) == reference
    assert "decoder.layers.3.mlp.linear_fc2.weight" in pp_stages[1]  # local layer 1 of stage 2


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_gathered_weights_equal_the_reference_weights(layouts, layout):
    # fill_logical_weights then gather_full_tensors must give back, bit for bit, the TP=1/PP=1 tensors.
    reference = layouts[0]["reference"]["weights"]
    merged = {**layouts[0][layout]["weights"], **layouts[1][layout]["weights"]}
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2", "pp2", "pp2_tied"])
def test_loss_matches_reference(layouts, layout):
    reference_layout = "reference_tied" if layout.endswith("_tied") else "reference"
    reference = torch.tensor(layouts[0][reference_layout]["losses"], dtype=torch.float64)
    last_rank_losses = layouts[1][layout]["losses"]  # PP: only the last stage computes the loss
    torch.testing.assert_close(torch.tensor(last_rank_losses, dtype=torch.float64), reference,
                               rtol=1e-6, atol=0)
    if layout == "tp2":
        assert layouts[0][layout]["losses"] == last_rank_losses


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_gradients_match_reference(layouts, layout):
    reference = layouts[0]["reference"]["grads"]
    assert set(reference) == set(CHECKED_GRADS)
    merged = {}
    for rank in range(2):
        for name, grad in layouts[rank][layout]["grads"].items():
            if name in merged:  # TP: both ranks gathered the same full tensor
                torch.testing.assert_close(grad, merged[name], rtol=0, atol=0)
            merged[name] = grad
    assert set(merged) == set(CHECKED_GRADS)
    for name in CHECKED_GRADS:
        assert reference[name].abs().max() > 1e-4, f"{name}: a zero gradient would match trivially"
        assert merged[name].shape == reference[name].shape, name
        # fp32 with a different reduction order (TP all-reduce of partial sums): ~1e-7 relative.
        assert _max_rel_diff(merged[name], reference[name]) < 1e-5, name


@pytest.mark.multiprocess
def test_wrong_qkv_slicing_changes_the_loss(layouts):
    # Megatron's GQA qkv rows are grouped per query group, so contiguous TP chunks are right; slicing
    # as if rows were [all Q; all K; all V] gives other heads to each rank and must change the loss.
    reference = torch.tensor(layouts[0]["reference"]["losses"])
    wrong = torch.tensor(layouts[0]["tp2_wrong_qkv_slicing"])
    assert (wrong - reference).abs().max() > 1e-3


class _Layer(torch.nn.Module):
    def __init__(self, layer_number):
        super().__init__()
        self.layer_number = layer_number
        self.linear = torch.nn.Linear(2, 2)


class _Stage(torch.nn.Module):
    """Shaped like the second of two pipeline stages of a 4-layer model."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([_Layer(3), _Layer(4)])
        self.decoder.final_layernorm = torch.nn.RMSNorm(2)


def test_global_names_use_megatron_layer_numbers():
    names = [name for name, _ in global_named_parameters(_Stage())]
    assert names == [
        "decoder.layers.2.linear.weight", "decoder.layers.2.linear.bias",
        "decoder.layers.3.linear.weight", "decoder.layers.3.linear.bias",
        "decoder.final_layernorm.weight",
    ]


def test_logical_tensor_depends_only_on_seed_name_and_shape():
    a = logical_tensor("decoder.layers.2.linear.weight", (3, 4), seed=1, std=0.1)
    assert torch.equal(a, logical_tensor("decoder.layers.2.linear.weight", [3, 4], seed=1, std=0.1))
    assert not torch.equal(a, logical_tensor("decoder.layers.3.linear.weight", (3, 4), seed=1, std=0.1))
    assert not torch.equal(a, logical_tensor("decoder.layers.2.linear.weight", (3, 4), seed=2, std=0.1))
    norm = logical_tensor("decoder.final_layernorm.weight", (1000,), seed=1, std=0.1, is_norm_weight=True)
    assert abs(norm.mean().item() - 1.0) < 0.02


def test_fill_rejects_bad_input():
    with pytest.raises(ValueError, match="std"):
        fill_logical_weights(_Stage(), std=0.0)
    with pytest.raises(ValueError, match="tp_group"):
        fill_logical_weights(_Stage())
