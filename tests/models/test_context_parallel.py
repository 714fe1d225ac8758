"""Context parallelism (2 gloo ranks): with every row split over the CP group, the Qwen2.5-VL model gives the
single-rank per-token losses and logits, its AVAR layers hand their sink the single-rank masses of every row the
sink reads (rows held by either rank), and the CP ranks' gradients add up to the single-rank gradient — for the
LM loss and an auxiliary loss of the masses — on a padded batch, on a packed row whose samples are split
across the ranks, and on one image for two ranks. Each rank encodes its share of the images (the other one's
vision gradients come through the gathered features), a rank without images the blank merge group. Layer 1 is
a standard layer (PlainCoreAttention), layers 0 and 2 AVAR layers.

Also: the load-balanced split itself (chunks r and 2cp-1-r), the row-length refusal, and no host synchronisation
inside the layers' forward or backward on the GPU kernel path under CP. The attention runs in
blocks of 3 query rows here (several per chunk, the last one short), 2 query heads per kv head.

Tolerance: fp32 on both sides; CP changes only the summation order (SDPA over the gathered keys vs over the
whole row, partial gradients summed over ranks): ~1e-7 relative observed, bound 1e-5 (masses 2e-6 absolute).
"""

import pytest
import torch

from megatron_avar.roles import TokenRole
from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import IMAGE, case_batch, tiny_hf_model
from test_role_mass_layers import _packed, _refuse_host_syncs, chat_like_roles, forward_refusing_host_syncs

pytestmark = pytest.mark.multiprocess

RELATIVE_TOLERANCE = 1e-5
MASS_TOLERANCE = 2e-6
AVAR_LAYERS = (0, 2)
CHECKED_GRADS = (
    "vision.layers.0.self_attention.linear_qkv.weight",
    "vision.patch_embed.weight",
    "language_model.embedding.word_embeddings.weight",
    "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
    "language_model.decoder.layers.1.self_attention.linear_qkv.weight",
    "language_model.decoder.layers.2.self_attention.linear_qkv.weight",
    "language_model.decoder.layers.2.mlp.linear_fc1.weight",
    "language_model.decoder.final_layernorm.weight",
    "language_model.output_layer.weight",
)


def test_each_rank_holds_chunks_r_and_2cp_minus_1_minus_r():
    from megatron_avar.models.context_parallel import local_positions

    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([local_positions(24, 3, r) for r in range(3)])
    assert sorted(held.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="cuts each row into 4 equal chunks, but the rows have 10 tokens"):
        local_positions(10, 2, 0)


class AuxSink:
    """Records the masses of ``query_rows`` and attaches an auxiliary loss of them (a weighted sum of the
    IMAGE and SYSTEM masses, with per-row weights so every row's gradient differs)."""

    def __init__(self, rows):
        self.query_rows = rows
        self.masses = {}

    def __call__(self, layer_index, mass, out, heads):
        from megatron_avar.training.aux_loss import attach_aux_loss

        self.masses[layer_index] = mass.detach().clone()
        weights = torch.linspace(0.5, 1.5, mass.shape[0])[:, None]
        aux = (weights * (mass[..., TokenRole.IMAGE] - 0.3 * mass[..., TokenRole.SYSTEM])).sum()
        return attach_aux_loss(out, aux, 1.0)


def _pad_to(inputs: dict, roles, packing: dict, multiple: int):
    """Right-pad every row (ids, mask, roles, segment ids, positions) to a multiple of ``multiple`` tokens."""
    extra = -inputs["input_ids"].shape[1] % multiple
    pad = lambda x, value=0: torch.nn.functional.pad(x, (0, extra), value=value)  # noqa: E731
    inputs = {**inputs, "input_ids": pad(inputs["input_ids"])}
    if "attention_mask" in inputs:
        inputs["attention_mask"] = pad(inputs["attention_mask"])
    packing = {**packing}
    if "segment_ids" in packing:
        packing["segment_ids"] = pad(packing["segment_ids"], -1)
        packing["position_ids"] = pad(packing["position_ids"])
    return inputs, pad(roles, -1), packing


def _cases():
    padded = case_batch("padded_right")
    roles = chat_like_roles(padded["input_ids"], padded["attention_mask"])
    packed, packed_roles, packing = _packed(padded, roles, None)
    one = case_batch("one_image")  # one image for two ranks: the other encodes the blank group (weighted by 0)
    one_roles = chat_like_roles(one["input_ids"], one["attention_mask"])
    return {"padded": _pad_to(padded, roles, {}, 4), "packed": _pad_to(packed, packed_roles, packing, 4),
            "one_image": _pad_to(one, one_roles, {}, 4)}


def _whole_rows(split):
    """[B, S_l, ...] of this CP rank -> [B, S, ...] of the whole rows (identity without CP)."""
    if split is None:
        return lambda x: x
    return lambda x: split.gather(x.transpose(0, 1)).transpose(0, 1)


def _run_layout(cp, hf, config):
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar.models.context_parallel import ContextSplit
    from megatron_avar.models.qwen2_5_vl import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.hf_mapping import full_megatron_state, load_hf_state_dict
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    try:
        model_parallel_cuda_manual_seed(0)
        groups = ProcessGroupCollection.use_mpu_process_groups()
        model = Qwen25VLModel(config, MegatronSettings(context_parallel_size=cp, perform_initialization=False),
                              pg_collection=groups, role_mass_layers=AVAR_LAYERS)
        load_hf_state_dict(model, hf.state_dict(), config)
        out = {}
        for name, (inputs, roles, packing) in _cases().items():
            seq = inputs["input_ids"].shape[1]
            real = roles >= 0
            rows = torch.nonzero(roles.reshape(-1) == TokenRole.USER_TEXT, as_tuple=True)[0]
            kwargs = dict(attention_mask=inputs.get("attention_mask"), pixel_values=inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"], token_roles=roles, **packing)
            split = ContextSplit.build(groups.cp, seq, torch.device("cpu")) if cp > 1 else None
            whole = _whole_rows(split)
            local = (lambda x: x) if split is None else (lambda x, s=split: s.local(x, 1))
            model.eval()
            with torch.no_grad():
                logits = whole(model(inputs["input_ids"], **kwargs))
            model.train()
            model.zero_grad()
            sink = AuxSink(rows)
            labels = torch.roll(inputs["input_ids"], -1, dims=1)
            loss = model(inputs["input_ids"], labels=labels, mass_sink=sink, **kwargs)
            (loss * local(real)).sum().backward()
            grads = full_megatron_state(model, grads=True)
            grads = {key: grads[key].clone() for key in CHECKED_GRADS}
            if split is not None:  # each CP rank holds its part of the gradient
                for grad in grads.values():
                    torch.distributed.all_reduce(grad, group=groups.cp)
            out[name] = {"logits": logits[real], "loss": whole(loss.detach())[real], "masses": sink.masses,
                         "grads": grads, "rows": rows}
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _both_layouts():
    from megatron_avar import platform
    from megatron_avar.models import context_parallel
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig

    platform.prepare_megatron()
    # blocks of 3 query rows x 2 query heads per kv head: several masked-attention calls per chunk, the last short
    context_parallel.QUERY_BLOCK = 6
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    return {"cp1": _run_layout(1, hf, config), "cp2": _run_layout(2, hf, config)}


@pytest.fixture(scope="module")
def layouts():
    return run_on_ranks(_both_layouts, 2, timeout_s=300)


def _relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


CASE_NAMES = ("padded", "packed", "one_image")


def test_the_packed_case_splits_samples_across_ranks():
    from megatron_avar.models.context_parallel import local_positions

    inputs, roles, packing = _cases()["packed"]
    segments = packing["segment_ids"][0]
    for rank in range(2):
        held = set(segments[local_positions(segments.numel(), 2, rank)].tolist()) - {-1}
        assert held == {0, 1}  # both samples have tokens on both ranks
    assert int((inputs["input_ids"] == IMAGE).sum()) > 0


@pytest.mark.parametrize("name", CASE_NAMES)
def test_losses_and_logits_equal_one_rank(layouts, name):
    for rank in range(2):
        cp1, cp2 = layouts[rank]["cp1"][name], layouts[rank]["cp2"][name]
        torch.testing.assert_close(cp2["loss"], cp1["loss"], rtol=RELATIVE_TOLERANCE, atol=0)
        assert _relative(cp2["logits"], cp1["logits"]) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_rank_gets_the_masses_of_all_the_sinks_rows(layouts, name):
    for rank in range(2):
        cp1, cp2 = layouts[rank]["cp1"][name], layouts[rank]["cp2"][name]
        assert set(cp2["masses"]) == set(AVAR_LAYERS)  # the standard layer 1 reports nothing
        for layer in AVAR_LAYERS:
            assert cp2["masses"][layer].shape[0] == cp1["rows"].numel()
            torch.testing.assert_close(cp2["masses"][layer], cp1["masses"][layer], rtol=0, atol=MASS_TOLERANCE)


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("param", CHECKED_GRADS)
def test_the_ranks_gradients_add_up_to_one_ranks(layouts, name, param):
    expected = layouts[0]["cp1"][name]["grads"][param]
    for rank in range(2):
        assert _relative(layouts[rank]["cp2"][name]["grads"][param], expected) < RELATIVE_TOLERANCE


def _no_sync_under_context_parallelism():
    """Forward and backward of the packed row at CP=2 on the GPU kernel path (the probe's Triton kernel replaced by
    its PyTorch reference, as in test_role_mass_layers), every host read refused inside the core attentions'
    forward (AVAR and standard layers) and in the whole backward."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models import role_mass_attention
    from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_state_dict
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel
    from megatron_avar.ops import role_mass_triton
    from megatron_avar.ops.role_mass import reference_role_mass

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    model_parallel_cuda_manual_seed(0)
    role_mass_triton.triton_role_mass = reference_role_mass
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    model = Qwen25VLModel(config, MegatronSettings(context_parallel_size=2, perform_initialization=False),
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups(), role_mass_layers=AVAR_LAYERS)
    load_hf_state_dict(model, hf.state_dict(), config)
    inputs, roles, packing = _cases()["packed"]
    sink = AuxSink(torch.nonzero(roles.reshape(-1) == TokenRole.USER_TEXT, as_tuple=True)[0])
    forward = role_mass_attention.RoleMassCoreAttention.forward
    # (the standard layers' PlainCoreAttention inherits it)
    role_mass_attention.RoleMassCoreAttention.forward = forward_refusing_host_syncs(forward)
    try:
        loss = model(inputs["input_ids"], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                     token_roles=roles, mass_sink=sink, role_attention_impl="triton",
                     labels=torch.roll(inputs["input_ids"], -1, dims=1), **packing)
        undo = _refuse_host_syncs()
        try:
            loss.sum().backward()
        finally:
            undo()
    finally:
        role_mass_attention.RoleMassCoreAttention.forward = forward
        parallel_state.destroy_model_parallel()
    return sorted(sink.masses)


def test_no_host_sync_inside_the_layers_under_context_parallelism():
    assert run_on_ranks(_no_sync_under_context_parallelism, 2, timeout_s=240) == [list(AVAR_LAYERS)] * 2
