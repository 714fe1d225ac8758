"""Pipeline parallelism: Qwen2.5-VL at PP=2 (and TP=2 x PP=2) driven by megatron's pipeline schedules gives
the TP=1/PP=1 logits, losses and gradients on the same HF weights, with images.

The vision encoder and the embedding live on the first stage; image features are scattered into the embedding
there and travel to the next stage inside the hidden states. Every stage recomputes the 3-D position ids and
the padding mask from the (cheap) batch. Microbatches are the samples of a batch (micro_batch_size=1), so the
1F1B schedule really interleaves forward and backward passes across stages.

One launch per world size runs every layout on every rank: first the TP=1/PP=1 reference (data-parallel
replicas), then the pipelined layout. Tolerance: fp32; pipelining moves no arithmetic (bitwise in practice),
TP changes summation order (~1e-7 relative observed in test_qwen2_5_vl_tp2.py); bound 1e-5.
"""

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import IMAGE, case_batch, hf_logits, tiny_hf_model

pytestmark = pytest.mark.multiprocess

RELATIVE_TOLERANCE = 1e-5
NUM_TEXT_LAYERS = 4  # 2 per stage
LOGIT_CASES = ("several_images", "padded_left")
BACKWARD_CASE = "padded_right"  # 3 samples = 3 microbatches, one text-only


def _microbatches(inputs):
    """Split a batch into one-sample microbatches, each with its own images (pixel rows and grids)."""
    grids = inputs.get("image_grid_thw")
    patches_per_image = [] if grids is None else grids.prod(-1).tolist()
    tokens_per_image = [n // 4 for n in patches_per_image]
    out, image, patch = [], 0, 0
    for b in range(inputs["input_ids"].shape[0]):
        row = inputs["input_ids"][b:b + 1]
        wanted, first_image, first_patch = int((row == IMAGE).sum()), image, patch
        while wanted > 0:
            wanted -= tokens_per_image[image]
            patch += patches_per_image[image]
            image += 1
        mb = {"input_ids": row, "attention_mask": inputs["attention_mask"][b:b + 1],
              "pixel_values": None, "image_grid_thw": None}
        if image > first_image:
            mb["pixel_values"] = inputs["pixel_values"][first_patch:patch]
            mb["image_grid_thw"] = grids[first_image:image]
        out.append(mb)
    return out


def _build(config, hf, tp, pp):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar.models.qwen2_5_vl import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_state_dict
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    settings = MegatronSettings(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                perform_initialization=False)
    model = Qwen25VLModel(config, settings, pg_collection=groups,
                          pre_process=parallel_state.is_pipeline_first_stage(),
                          post_process=parallel_state.is_pipeline_last_stage())
    load_hf_state_dict(model, hf.state_dict(), config)
    return model, groups


def _schedule(model, groups, microbatches, *, forward_only):
    """Run megatron's schedule; on the last stage return per-microbatch logits (forward_only) or per-token
    losses; elsewhere an empty list. The backward pass minimises sum(masked token losses) / num_microbatches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["input_ids"], attention_mask=mb["attention_mask"], pixel_values=mb["pixel_values"],
                       image_grid_thw=mb["image_grid_thw"],
                       labels=None if forward_only else torch.roll(mb["input_ids"], -1, dims=1))

        def loss_func(output_tensor):
            if forward_only:
                logits = gather_from_tensor_model_parallel_region(output_tensor, group=groups.tp)
                return output_tensor.sum() * 0, {"out": logits.detach()}
            return (output_tensor * mb["attention_mask"]).sum(), {"out": output_tensor.detach()}

        return output, loss_func

    seq_length = microbatches[0]["input_ids"].shape[1]
    stored = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[model],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=1, forward_only=forward_only)
    return [item["out"] for item in stored]


def _layout(config, hf, tp, pp):
    from megatron.core import parallel_state

    from megatron_avar.models.qwen2_5_vl.hf_mapping import full_megatron_state

    model, groups = _build(config, hf, tp, pp)
    try:
        model.eval()
        with torch.no_grad():
            logits = {name: _schedule(model, groups, _microbatches(case_batch(name)), forward_only=True)
                      for name in LOGIT_CASES}
        model.train()  # no dropout in this model: the same maths, with autograd
        losses = _schedule(model, groups, _microbatches(case_batch(BACKWARD_CASE)), forward_only=False)
        return {"logits": {name: torch.cat(v) if v else None for name, v in logits.items()},
                "losses": torch.cat(losses) if losses else None,
                "grads": full_megatron_state(model, grads=True),
                "first_stage": parallel_state.is_pipeline_first_stage(),
                "last_stage": parallel_state.is_pipeline_last_stage()}
    finally:
        parallel_state.destroy_model_parallel()


def _all_layouts(tp, pp):
    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig

    platform.prepare_megatron()
    hf = tiny_hf_model(num_text_layers=NUM_TEXT_LAYERS)
    config = Qwen25VLConfig.from_hf(hf.config)
    return {"hf": {name: hf_logits(hf, case_batch(name)) for name in LOGIT_CASES},
            "reference": _layout(config, hf, 1, 1), "pipelined": _layout(config, hf, tp, pp)}


LAYOUTS = {"pp2": (1, 2), "tp2_pp2": (2, 2)}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layouts(request):
    tp, pp = LAYOUTS[request.param]
    return run_on_ranks(_all_layouts, tp * pp, tp, pp, timeout_s=300)


def _relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_stages_hold_their_parts(layouts):
    for result in layouts:
        grads = result["pipelined"]["grads"]
        assert any(n.startswith("vision.") for n in grads) == result["pipelined"]["first_stage"]
        assert ("language_model.output_layer.weight" in grads) == result["pipelined"]["last_stage"]


@pytest.mark.parametrize("name", LOGIT_CASES)
def test_pipelined_logits_equal_single_rank_and_hf(layouts, name):
    real = case_batch(name)["attention_mask"].bool()
    last = [r for r in layouts if r["pipelined"]["last_stage"]]
    assert last
    for result in last:
        pipelined, reference = result["pipelined"]["logits"][name], result["reference"]["logits"][name]
        assert pipelined.shape == reference.shape
        assert _relative(pipelined[real], reference[real]) < RELATIVE_TOLERANCE
        assert _relative(pipelined[real], result["hf"][name][real]) < RELATIVE_TOLERANCE
    for result in layouts:
        if not result["pipelined"]["last_stage"]:
            assert result["pipelined"]["logits"][name] is None


def test_pipelined_losses_equal_single_rank(layouts):
    real = case_batch(BACKWARD_CASE)["attention_mask"].bool()
    for result in (r for r in layouts if r["pipelined"]["last_stage"]):
        torch.testing.assert_close(result["pipelined"]["losses"][real], result["reference"]["losses"][real],
                                   rtol=RELATIVE_TOLERANCE, atol=0)


def test_pipelined_gradients_equal_single_rank(layouts):
    seen = set()
    for result in layouts:
        reference = result["reference"]["grads"]
        for name, grad in result["pipelined"]["grads"].items():
            assert grad.shape == reference[name].shape, name
            assert reference[name].abs().max() > 0, name
            assert _relative(grad, reference[name]) < RELATIVE_TOLERANCE, name
            seen.add(name)
    assert seen == set(layouts[0]["reference"]["grads"])  # the stages together hold every parameter
