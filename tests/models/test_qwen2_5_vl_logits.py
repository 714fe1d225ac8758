"""The megatron Qwen2.5-VL (TP=1, fp32) gives HF's logits, loads and exports HF weights exactly, and swaps a
core-attention module into chosen decoder layers through the layer-spec seam.

Everything megatron runs in one single-rank launch (`run_on_ranks(..., 1)`): the CPU compatibility layer is
process-global, so it stays out of the pytest process. Tolerance: both sides compute in fp32 with different
kernels and summation orders (megatron's baddbmm + softmax vs torch SDPA, torch RMSNorm vs HF's, per-window
batching in the vision tower); the observed difference is ~1e-6 of the largest logit, the bound is 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import CASES, IMAGE, case_batch, hf_logits, tiny_hf_model

RELATIVE_TOLERANCE = 1e-5
ROLE_MASS_LAYERS = {1}


def _recording_attention():
    """A role-mass core attention that counts its calls: any core attention class can be swapped in."""
    from megatron_avar.models.role_mass_attention import RoleMassCoreAttention

    class RecordingAttention(RoleMassCoreAttention):
        calls = 0

        def forward(self, *args, **kwargs):
            type(self).calls += 1
            return super().forward(*args, **kwargs)

    return RecordingAttention


def _build(config, **kwargs):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_avar.models.qwen2_5_vl import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    return Qwen25VLModel(config, MegatronSettings(perform_initialization=False),
                         pg_collection=ProcessGroupCollection.use_mpu_process_groups(), **kwargs).eval()


def _forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"), **kwargs)


def _tp1_results():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import export_hf_state_dict, load_hf_state_dict

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)  # megatron's attention forks this RNG state even without dropout
    results = {"logits": {}, "tied_logits": {}}
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    model = _build(config)
    load_hf_state_dict(model, hf.state_dict(), config)
    for name in CASES:
        inputs = case_batch(name)
        results["logits"][name] = (_forward(model, inputs), hf_logits(hf, inputs), inputs["attention_mask"].bool())
    inputs = case_batch("several_images")
    with torch.no_grad():
        results["vision"] = (model.vision(inputs["pixel_values"], inputs["image_grid_thw"]),
                             hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output)
    labels = torch.roll(inputs["input_ids"], -1, dims=1)
    results["loss"] = (_forward(model, inputs, labels=labels),
                       F.cross_entropy(hf_logits(hf, inputs).transpose(1, 2), labels, reduction="none"),
                       inputs["attention_mask"].bool())
    results["export"] = (export_hf_state_dict(model, config), hf.state_dict())

    text = case_batch("text_only")  # with autograd on, a text-only batch also runs the blank image (times zero)
    logits = model(text["input_ids"], attention_mask=text["attention_mask"])
    logits.sum().backward()
    results["text_only_training"] = (logits.detach(), results["logits"]["text_only"][0],
                                     {name: p.grad for name, p in model.vision.named_parameters()})
    model.zero_grad()

    # Inputs that do not fit input_ids are named (they were raw index/size errors deep in the forward); an empty
    # set of images is no images.
    bad = {}
    one = case_batch("one_image")
    for name, kwargs in (("attention_mask", {"attention_mask": one["attention_mask"][:, :-1]}),
                         ("labels", {"labels": one["input_ids"][0]}),
                         ("position_ids", {"position_ids": torch.zeros(3, one["input_ids"].shape[1],
                                                                       dtype=torch.long)})):
        try:
            model(one["input_ids"], **{"attention_mask": one["attention_mask"], **kwargs})
        except ValueError as error:
            bad[name] = str(error)
    results["bad_shapes"] = bad
    empty = {**text, "pixel_values": torch.zeros(0, inputs["pixel_values"].shape[1]),
             "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
    results["no_images"] = (_forward(model, empty), results["logits"]["text_only"][0])

    # Negative control: HF's [q; k; v] rows loaded without megatron's per-group interleaving.
    qkv = model.language_model.decoder.layers[0].self_attention.linear_qkv.weight
    attn = hf.model.language_model.layers[0].self_attn
    with torch.no_grad():
        qkv.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    results["ungrouped_qkv_logits"] = _forward(model, case_batch("one_image"))

    tied_hf = tiny_hf_model(seed=1, tie_word_embeddings=True)
    tied_config = Qwen25VLConfig.from_hf(tied_hf.config)
    tied = _build(tied_config)
    load_hf_state_dict(tied, tied_hf.state_dict(), tied_config)
    for name in ("text_only", "several_images"):
        inputs = case_batch(name)
        results["tied_logits"][name] = (_forward(tied, inputs), hf_logits(tied_hf, inputs),
                                        inputs["attention_mask"].bool())

    recording = _recording_attention()
    swapped = _build(config, role_mass_layers=ROLE_MASS_LAYERS, role_mass_core_attention=recording)
    load_hf_state_dict(swapped, hf.state_dict(), config)
    results["swap"] = {
        "core_attention_types": [type(layer.self_attention.core_attention).__name__
                                 for layer in swapped.language_model.decoder.layers],
        "logits": (_forward(swapped, case_batch("several_images")), results["logits"]["several_images"][0]),
        "calls": recording.calls,
    }
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_tp1_results, 1, timeout_s=240)[0]


def _relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_hf(results, name):
    ours, reference, real = results["logits"][name]
    assert ours.shape == reference.shape
    # Only real tokens: HF and megatron both give finite but different values on fully masked padding rows.
    assert _relative(ours[real], reference[real]) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("name", ["text_only", "several_images"])
def test_logits_equal_hf_with_tied_embeddings(results, name):
    ours, reference, real = results["tied_logits"][name]
    assert _relative(ours[real], reference[real]) < RELATIVE_TOLERANCE


def test_inputs_that_do_not_fit_input_ids_are_named_and_no_images_is_text_only(results):
    bad = results["bad_shapes"]
    assert set(bad) == {"attention_mask", "labels", "position_ids"}
    assert bad["attention_mask"].startswith("attention_mask must have input_ids' shape")
    assert bad["position_ids"].startswith("position_ids must be [3, batch, seq]")
    torch.testing.assert_close(*results["no_images"], rtol=0, atol=0)


def test_vision_features_equal_hf(results):
    ours, reference = results["vision"]
    assert ours.shape == reference.shape == (16 + 6 + 1 + 6, 64)
    assert _relative(ours, reference) < RELATIVE_TOLERANCE


def test_per_token_loss_equals_hf_cross_entropy(results):
    ours, reference, real = results["loss"]
    assert ours.shape == reference.shape
    # real tokens (padding rows: as in test_logits_equal_hf; no loss reads them, labels mask them)
    torch.testing.assert_close(ours[real], reference[real], rtol=RELATIVE_TOLERANCE, atol=1e-6)


def test_a_text_only_training_batch_gives_every_vision_parameter_a_zero_gradient(results):
    """megatron's overlapped gradient reduce waits for every parameter's gradient in every step: a text-only
    micro-batch runs the vision encoder on a blank merge group weighted by zero, which leaves the logits as
    they are."""
    logits, inference_logits, vision_grads = results["text_only_training"]
    assert torch.equal(logits, inference_logits)
    assert vision_grads and all(grad is not None and not grad.any() for grad in vision_grads.values())


def test_export_from_the_model_is_bit_exact(results):
    exported, reference = results["export"]
    assert set(exported) == set(reference)
    assert all(torch.equal(exported[name], reference[name]) for name in reference)


def test_logit_check_detects_a_wrong_qkv_layout(results):
    reference = results["logits"]["one_image"][1]
    assert _relative(results["ungrouped_qkv_logits"], reference) > 100 * RELATIVE_TOLERANCE


def test_core_attention_is_swapped_only_in_the_chosen_layers(results):
    swap = results["swap"]
    standard = "PlainCoreAttention"  # never megatron's own core attention
    assert swap["core_attention_types"] == [standard, "RecordingAttention", standard]
    assert swap["calls"] == 1  # one forward, one layer
    ours, plain = swap["logits"]
    assert torch.equal(ours, plain)  # same maths: the swap changes nothing else


def test_image_features_go_to_image_tokens_in_batch_major_order():
    from megatron_avar.models.qwen2_5_vl.model import scatter_image_features

    input_ids = torch.tensor([[1, IMAGE, IMAGE, 2], [IMAGE, 3, 4, IMAGE]])
    embeddings = torch.zeros(4, 2, 3)  # megatron's [S, B, H]
    features = torch.arange(1.0, 5.0)[:, None].expand(4, 3)
    out = scatter_image_features(embeddings, input_ids, features, IMAGE)
    assert out[:, :, 0].T.tolist() == [[0, 1, 2, 0], [3, 0, 0, 4]]
    assert not embeddings.any()  # a new tensor
    with pytest.raises(ValueError, match="the batch has 4 image tokens but the vision encoder produced 3 image "
                                         "features"):
        scatter_image_features(embeddings, input_ids, features[:3], IMAGE)


def test_role_mass_layers_are_global_indexes_under_pipeline_parallelism():
    from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig, build_transformer_configs
    from megatron_avar.models.qwen2_5_vl.model import language_block_spec
    from qwen_vl_real_configs import QWEN2_5_VL_7B

    class RoleMassAttention:  # only its identity matters: no module is built here
        pass

    config = build_transformer_configs(Qwen25VLConfig.from_hf(QWEN2_5_VL_7B),
                                       MegatronSettings(pipeline_model_parallel_size=4)).language
    chosen = {}
    for stage in range(4):  # 28 layers, 7 per stage
        spec = language_block_spec(config, role_mass_layers={6, 7, 8, 13}, role_mass_core_attention=RoleMassAttention,
                                   pp_rank=stage)
        assert len(spec.layer_specs) == 7
        chosen[stage] = [i for i, layer in enumerate(spec.layer_specs)
                         if layer.submodules.self_attention.submodules.core_attention is RoleMassAttention]
    assert chosen == {0: [6], 1: [0, 1, 6], 2: [], 3: []}
    with pytest.raises(ValueError, match=r"role_mass_layers \[28\] are outside \[0, num_layers=28\)"):
        language_block_spec(config, role_mass_layers={28}, role_mass_core_attention=RoleMassAttention)
    from megatron_avar.models.role_mass_attention import PlainCoreAttention, RoleMassCoreAttention

    default = language_block_spec(config, role_mass_layers={3})
    core = [layer.submodules.self_attention.submodules.core_attention for layer in default.layer_specs]
    # no layer keeps megatron's own core attention (local: S x S scores; TE: ignores the packing under "causal")
    assert core[3] is RoleMassCoreAttention and all(c is PlainCoreAttention for i, c in enumerate(core) if i != 3)
