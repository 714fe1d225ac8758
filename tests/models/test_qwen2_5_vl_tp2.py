"""Tensor parallelism (2 gloo ranks): the Qwen2.5-VL model loaded from the same HF weights gives the TP=1
logits, losses and gradients at TP=2 (language model AND vision tower split), also with sequence parallelism
(rows and the vision encoder's packed patches split over the ranks between the tensor-parallel regions; the
patch count of these images is not a multiple of merge_size^2 x tp, so the padding is exercised), and exports
HF weights bit-exactly.

All layouts run in one 2-rank launch: each rank first builds the TP=1 model (data-parallel replicas), then
the TP=2 models. Tolerance: fp32, TP only changes summation order (partial sums all-reduced): ~1e-7
relative observed; bound 1e-5.
"""

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import case_batch, hf_logits, tiny_hf_model

pytestmark = pytest.mark.multiprocess

RELATIVE_TOLERANCE = 1e-5
CASE_NAMES = ("several_images", "padded_left")
# Gradients checked: vision qkv (column-parallel, grouped rows), vision SwiGLU fc1 ([gate; up] shards),
# vision row-parallel proj, patch embedding (replicated), merger fc2, LM qkv, LM fc1, embedding, output layer.
CHECKED_GRADS = (
    "vision.layers.0.self_attention.linear_qkv.weight",
    "vision.layers.1.mlp.linear_fc1.weight",
    "vision.layers.2.self_attention.linear_proj.weight",
    "vision.patch_embed.weight",
    "vision.merger.encoder.linear_fc2.weight",
    "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
    "language_model.decoder.layers.2.mlp.linear_fc1.weight",
    "language_model.embedding.word_embeddings.weight",
    "language_model.output_layer.weight",
    # replicated over TP, but under SP each rank sees part of the sequence (partial sums, all-reduced)
    "vision.layers.0.input_layernorm.weight",
    "vision.layers.1.mlp.linear_fc2.bias",
    "vision.final_layernorm.weight",
    "language_model.decoder.layers.1.pre_mlp_layernorm.weight",
    "language_model.decoder.final_layernorm.weight",
)


def _run_layout(tp, hf, config, sequence_parallel=False):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, model_parallel_cuda_manual_seed

    from megatron_avar.models.qwen2_5_vl import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.hf_mapping import (
        export_hf_state_dict,
        full_megatron_state,
        load_hf_state_dict,
    )
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        model_parallel_cuda_manual_seed(0)
        groups = ProcessGroupCollection.use_mpu_process_groups()
        settings = MegatronSettings(tensor_model_parallel_size=tp, perform_initialization=False,
                                    sequence_parallel=sequence_parallel)
        model = Qwen25VLModel(config, settings, pg_collection=groups)
        load_hf_state_dict(model, hf.state_dict(), config)
        out = {"logits": {}, "losses": {}}
        for name in CASE_NAMES:
            inputs, labels, kwargs = _case(name, tp if sequence_parallel else 1)
            length = case_batch(name)["input_ids"].shape[1]
            model.eval()
            with torch.no_grad():
                out["logits"][name] = gather_from_tensor_model_parallel_region(
                    model(inputs["input_ids"], **kwargs), group=groups.tp)[:, :length]
            model.train()  # no dropout in this model: the same maths, with autograd
            loss = model(inputs["input_ids"], labels=labels, **kwargs)  # vocab-parallel cross entropy at TP=2
            (loss * inputs["attention_mask"]).sum().backward()
            out["losses"][name] = loss.detach()[:, :length]
        _all_reduce_sequence_parallel_grads(model, groups.tp)
        grads = full_megatron_state(model, grads=True)
        out["grads"] = {name: grads[name] for name in CHECKED_GRADS}
        # The output layer on the real tokens only (output_rows): the same logits, losses and gradients.
        model.zero_grad()
        out["row_logits"], out["row_losses"] = {}, {}
        for name in CASE_NAMES:
            inputs, labels, kwargs = _case(name, tp if sequence_parallel else 1)
            rows = torch.nonzero(inputs["attention_mask"].reshape(-1), as_tuple=True)[0]
            model.eval()
            with torch.no_grad():
                out["row_logits"][name] = gather_from_tensor_model_parallel_region(
                    model(inputs["input_ids"], output_rows=rows, **kwargs), group=groups.tp)
            model.train()
            loss = model(inputs["input_ids"], labels=labels, output_rows=rows, **kwargs)
            loss.sum().backward()
            out["row_losses"][name] = loss.detach()
        _all_reduce_sequence_parallel_grads(model, groups.tp)
        grads = full_megatron_state(model, grads=True)
        out["row_grads"] = {name: grads[name] for name in CHECKED_GRADS}
        # no labelled token on this rank (a context-parallel part of a row can hold none): an empty loss, whose
        # backward still joins the tensor-parallel collectives and gives the output layer a zero gradient
        model.zero_grad()
        inputs, labels, kwargs = _case(CASE_NAMES[0], tp if sequence_parallel else 1)
        loss = model(inputs["input_ids"], labels=labels, output_rows=torch.zeros(0, dtype=torch.long), **kwargs)
        loss.sum().backward()
        weight = model.language_model.output_layer.weight
        out["no_rows"] = (tuple(loss.shape), None if weight.grad is None else float(weight.grad.abs().sum()))
        if tp == 1:
            out["flops"] = _output_rows_flops(model, config)
        out["export"] = export_hf_state_dict(model, config)
        out["local_params"] = sum(p.numel() for p in model.parameters())
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _case(name, multiple):
    """(inputs, labels, model kwargs) of a case, its rows padded to a multiple of ``multiple`` tokens (sequence
    parallelism splits them over the ranks)."""
    inputs = case_batch(name)
    labels = torch.roll(inputs["input_ids"], -1, dims=1)
    extra = (0, -inputs["input_ids"].shape[1] % multiple)
    inputs = {**inputs, **{key: torch.nn.functional.pad(inputs[key], extra) for key in ("input_ids", "attention_mask")}}
    labels = torch.nn.functional.pad(labels, extra)
    kwargs = dict(attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"])
    return inputs, labels, kwargs


def _output_rows_flops(model, config):
    """(forward FLOPs torch counts without output_rows - with output_rows = the real tokens, the same difference
    from the trainers' FLOP formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_avar.training.metrics import training_flops

    inputs, _, kwargs = _case(CASE_NAMES[1], 1)
    rows = torch.nonzero(inputs["attention_mask"].reshape(-1), as_tuple=True)[0]
    counted = []
    for chosen in (None, rows):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(inputs["input_ids"], output_rows=chosen, **kwargs)
        counted.append(counter.get_total_flops())
    formula = [training_flops(config, sample_lengths=[], image_patches=[], output_tokens=n) / 3
               for n in (inputs["input_ids"].numel(), rows.numel())]
    return counted[0] - counted[1], formula[0] - formula[1]


def _all_reduce_sequence_parallel_grads(model, group):
    """What megatron's finalize_model_grads does for parameters marked ``sequence_parallel`` (no DDP here)."""
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.grad is not None:
            torch.distributed.all_reduce(param.grad, group=group)


def _both_layouts():
    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig

    platform.prepare_megatron()
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    reference = {name: hf_logits(hf, case_batch(name)) for name in CASE_NAMES}
    return {"hf": reference, "tp1": _run_layout(1, hf, config), "tp2": _run_layout(2, hf, config),
            "tp2_sp": _run_layout(2, hf, config, sequence_parallel=True),
            "hf_state": hf.state_dict(), "hf_count": sum(p.numel() for p in hf.parameters())}


@pytest.fixture(scope="module")
def layouts():
    return run_on_ranks(_both_layouts, 2, timeout_s=300)


def _relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


TP2_LAYOUTS = ("tp2", "tp2_sp")
ALL_LAYOUTS = ("tp1", *TP2_LAYOUTS)


@pytest.mark.parametrize("layout", TP2_LAYOUTS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_tp2_logits_equal_tp1_and_hf(layouts, name, layout):
    real = case_batch(name)["attention_mask"].bool()
    for rank in range(2):
        tp1, tp2 = layouts[rank]["tp1"]["logits"][name], layouts[rank][layout]["logits"][name]
        assert tp2.shape == tp1.shape
        assert _relative(tp2[real], tp1[real]) < RELATIVE_TOLERANCE
        assert _relative(tp2[real], layouts[rank]["hf"][name][real]) < RELATIVE_TOLERANCE
    assert torch.equal(layouts[0][layout]["logits"][name], layouts[1][layout]["logits"][name])


@pytest.mark.parametrize("layout", TP2_LAYOUTS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_tp2_losses_equal_tp1(layouts, name, layout):
    real = case_batch(name)["attention_mask"].bool()
    tp1, tp2 = layouts[0]["tp1"]["losses"][name], layouts[0][layout]["losses"][name]
    torch.testing.assert_close(tp2[real], tp1[real], rtol=RELATIVE_TOLERANCE, atol=0)


@pytest.mark.parametrize("layout", TP2_LAYOUTS)
@pytest.mark.parametrize("name", CHECKED_GRADS)
def test_tp2_gradients_equal_tp1(layouts, name, layout):
    tp1 = layouts[0]["tp1"]["grads"][name]
    for rank in range(2):
        tp2 = layouts[rank][layout]["grads"][name]
        assert tp2.shape == tp1.shape
        assert tp1.abs().max() > 0
        assert _relative(tp2, tp1) < RELATIVE_TOLERANCE, name


def test_tp2_export_is_bit_exact_and_parameters_are_split(layouts):
    reference = layouts[0]["hf_state"]
    for rank in range(2):
        exported = layouts[rank]["tp2"]["export"]
        assert set(exported) == set(reference)
        assert all(torch.equal(exported[name], reference[name]) for name in reference)
    assert layouts[0]["tp1"]["local_params"] == layouts[0]["hf_count"]
    # Each rank holds about half: everything but norms, row-parallel biases and the patch embedding is split.
    assert layouts[0]["tp2"]["local_params"] < 0.6 * layouts[0]["hf_count"]


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_output_rows_give_the_logits_and_losses_at_those_rows(layouts, name, layout):
    """The output layer run on the real tokens only (output_rows, flat b·S + i) gives the logits and per-token
    losses of the full output at those positions, under TP and sequence parallelism too."""
    real = case_batch(name)["attention_mask"].bool()
    for rank in range(2):
        result = layouts[rank][layout]
        assert result["row_logits"][name].shape == (int(real.sum()), layouts[rank]["tp1"]["logits"][name].shape[-1])
        assert _relative(result["row_logits"][name], result["logits"][name][real]) < RELATIVE_TOLERANCE
        torch.testing.assert_close(result["row_losses"][name], result["losses"][name][real],
                                   rtol=RELATIVE_TOLERANCE, atol=0)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("name", CHECKED_GRADS)
def test_output_rows_give_the_gradients_of_the_full_output(layouts, name, layout):
    """The summed losses of output_rows = the real tokens have the full output's masked-loss gradients (under
    sequence parallelism: no gradient reduced twice, none lost)."""
    expected = layouts[0]["tp1"]["grads"][name]
    for rank in range(2):
        assert _relative(layouts[rank][layout]["row_grads"][name], expected) < RELATIVE_TOLERANCE, name


def test_output_rows_cut_the_output_layers_flops_as_the_flop_formula_counts(layouts):
    """Without output_rows the output layer runs on every position (padding too); with the real tokens only, torch
    counts exactly the FLOPs the trainers' formula (output_tokens) takes off."""
    counted, formula = layouts[0]["tp1"]["flops"]
    assert counted > 0
    assert counted == formula


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_no_output_rows_give_an_empty_loss_and_a_zero_output_gradient(layouts, layout):
    for rank in range(2):
        assert layouts[rank][layout]["no_rows"] == ((0,), 0.0)


@pytest.mark.parametrize("rows", [torch.zeros(2, dtype=torch.uint8), torch.zeros(2),
                                  torch.zeros(1, 2, dtype=torch.long), [0, 1]], ids=["uint8", "float", "2-d", "list"])
def test_output_rows_of_the_wrong_kind_are_refused_naming_what_is_expected(rows):
    from megatron_avar.models.qwen2_5_vl.language_model import check_output_rows

    with pytest.raises(TypeError, match="output_rows must be a 1-D int64"):
        check_output_rows(rows)
