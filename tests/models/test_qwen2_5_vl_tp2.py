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
            inputs = case_batch(name)
            length = inputs["input_ids"].shape[1]
            labels = torch.roll(inputs["input_ids"], -1, dims=1)
            if sequence_parallel:  # rows split over the ranks: one more padding token makes the length even
                extra = (0, length % tp)
                inputs = {**inputs, **{key: torch.nn.functional.pad(inputs[key], extra)
                                       for key in ("input_ids", "attention_mask")}}
                labels = torch.nn.functional.pad(labels, extra)
            kwargs = dict(attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"])
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
        out["export"] = export_hf_state_dict(model, config)
        out["local_params"] = sum(p.numel() for p in model.parameters())
        return out
    finally:
        parallel_state.destroy_model_parallel()


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
