"""AVAR layers in the megatron Qwen2.5-VL: the per-role masses they report equal masses summed from Hugging
Face's eager attention probabilities, the model's logits stay HF's, packed rows equal their samples run
alone, and at TP=2 each rank reports its own heads of the same masses. Both mass modes: "fused" (a sink
without query_rows gets every row's masses from role_attention) and "probe" (causal attention for the output,
role_mass for the sink's rows only), padded and packed. The GPU kernel family (the Triton kernels, under the
interpreter here) gives the CPU family's logits, masses and gradients in the model.

Tolerance: fp32 on both sides, different kernels (blockwise online softmax vs eager softmax); observed
~1e-7 absolute on masses (probabilities, at most 1), bound 2e-6; logits as in test_qwen2_5_vl_logits.
"""

import pytest
import torch

from megatron_avar.roles import TokenRole
from megatron_avar.testing import run_on_ranks
from megatron_avar.testing.host_syncs import refuse_host_syncs
from qwen_vl_cases import IMAGE, VISION_END, VISION_START, case_batch, hf_logits, tiny_hf_model

MASS_TOLERANCE = 2e-6
RELATIVE_TOLERANCE = 1e-5
ALL_LAYERS = (0, 1, 2)


def chat_like_roles(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A role layout over a test batch: 2 SYSTEM tokens, IMAGE / TEMPLATE for image and vision-marker tokens,
    the last 3 real tokens RESPONSE, the other text USER_TEXT, padding -1."""
    roles = torch.full_like(input_ids, int(TokenRole.USER_TEXT))
    roles[input_ids == IMAGE] = TokenRole.IMAGE
    roles[(input_ids == VISION_START) | (input_ids == VISION_END)] = TokenRole.TEMPLATE
    for b in range(input_ids.shape[0]):
        real = torch.nonzero(attention_mask[b], as_tuple=True)[0]
        roles[b, real[:2]] = TokenRole.SYSTEM
        roles[b, real[-3:]] = TokenRole.RESPONSE
    return roles.masked_fill(attention_mask == 0, -1)


class Recorder:
    """A mass sink keeping each layer's masses (detached)."""

    def __init__(self):
        self.masses = {}

    def __call__(self, layer_index, mass, out, heads):
        self.masses[layer_index] = (mass.detach().clone(), heads)
        return out


class RowRecorder(Recorder):
    """A mass sink reading only ``query_rows`` (flat [B * S] indices): the probe computes just those."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.query_rows = rows


def _build(config, tp, role_mass_layers=ALL_LAYERS):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_avar.models.qwen2_5_vl import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    return Qwen25VLModel(config, MegatronSettings(tensor_model_parallel_size=tp, perform_initialization=False),
                         pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                         role_mass_layers=role_mass_layers).eval()


def _run(model, inputs, roles, recorder=None, **kwargs):
    recorder = Recorder() if recorder is None else recorder
    with torch.no_grad():
        logits = model(inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                       token_roles=roles, mass_sink=recorder, **kwargs)
    return logits, recorder.masses


def _packed(inputs, roles, config):
    """Rows 0 and 1 of a right-padded batch packed back to back into one row (with 4 padding tokens)."""
    from megatron_avar.models.qwen2_5_vl.positions import mrope_position_ids

    ids, seg, rls, pos = [], [], [], []
    positions, _ = mrope_position_ids(inputs["input_ids"], inputs["image_grid_thw"], image_token_id=IMAGE,
                                      spatial_merge_size=2, attention_mask=inputs["attention_mask"])
    for b in range(2):
        n = int(inputs["attention_mask"][b].sum())
        ids.append(inputs["input_ids"][b, :n])
        rls.append(roles[b, :n])
        pos.append(positions[:, b, :n])
        seg.append(torch.full((n,), b))
    ids.append(torch.zeros(4, dtype=torch.long))
    rls.append(torch.full((4,), -1))
    seg.append(torch.full((4,), -1))
    pos.append(torch.zeros(3, 4, dtype=torch.long))
    return dict(input_ids=torch.cat(ids)[None], pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"]), torch.cat(rls)[None], dict(
                    segment_ids=torch.cat(seg)[None], position_ids=torch.cat(pos, dim=1)[:, None])


def _results(tp):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_state_dict

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0)
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    model = _build(config, tp)
    load_hf_state_dict(model, hf.state_dict(), config)
    inputs = case_batch("padded_right")
    roles = chat_like_roles(inputs["input_ids"], inputs["attention_mask"])
    logits, masses = _run(model, inputs, roles)
    out = {"masses": {layer: mass for layer, (mass, _) in masses.items()},
           "heads": {layer: heads for layer, (_, heads) in masses.items()}, "roles": roles}
    if tp > 1:
        return out
    out["logits"] = (logits, hf_logits(hf, inputs), inputs["attention_mask"].bool())
    packed_inputs, packed_roles, packing = _packed(inputs, roles, config)
    out["packed"] = _run(model, packed_inputs, packed_roles, **packing)
    # The probe on every other real row (in reverse order), padded and packed; and fused with the same rows.
    rows = torch.nonzero(roles.reshape(-1) >= 0, as_tuple=True)[0][::2].flip(0)
    packed_rows = torch.nonzero(packed_roles.reshape(-1) >= 0, as_tuple=True)[0][::2].flip(0)
    out["rows"], out["packed_rows"] = rows, packed_rows
    out["probe"] = _run(model, inputs, roles, RowRecorder(rows), mass_mode="probe")
    out["probe_fused"] = _run(model, inputs, roles, RowRecorder(rows), mass_mode="fused")
    out["probe_packed"] = _run(model, packed_inputs, packed_roles, RowRecorder(packed_rows), mass_mode="probe",
                               **packing)
    out["probe_no_sink"] = model(inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                 pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                                 token_roles=roles, mass_mode="probe").detach()
    out["lengths"] = inputs["attention_mask"].sum(1).tolist()
    # No AVAR layer and no token roles: every layer is a standard one (PlainCoreAttention), packing from segment_ids.
    plain = _build(config, 1, role_mass_layers=())
    load_hf_state_dict(plain, hf.state_dict(), config)
    with torch.no_grad():
        out["plain_packed"] = plain(packed_inputs["input_ids"], pixel_values=packed_inputs["pixel_values"],
                                    image_grid_thw=packed_inputs["image_grid_thw"], **packing)
    out["standard_layers"] = _standard_layers(config, hf, inputs, roles)
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        out["eager"] = hf(**inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int(),
                          output_attentions=True).attentions
    out["standard_layers"]["hf_eager_layer_1"] = _hf_eager_logits_edited(hf, inputs, roles,
                                                                         out["standard_layers"]["edits"], layer=1)
    parallel_state.destroy_model_parallel()
    dist.barrier()
    return out


def _standard_layers(config, hf, inputs, roles):
    """Layer 1 the only AVAR layer: how often the fused kernel runs in fused mode, the logits under logit edits
    meant for every AVAR layer, for layer 1 alone, and none (HF's reference is computed later, with eager
    attention: _hf_eager_logits_edited), and the refusal of a sink without token roles."""
    from megatron_avar.analysis.intervention import intervention_query_mask
    from megatron_avar.models import role_mass_attention
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_state_dict
    from megatron_avar.models.role_mass_attention import RoleLogitEdits

    model = _build(config, 1, role_mass_layers=(1,))
    load_hf_state_dict(model, hf.state_dict(), config)
    images = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    calls = []
    fused_kernel = role_mass_attention.role_attention
    role_mass_attention.role_attention = lambda *args, **kwargs: calls.append(1) or fused_kernel(*args, **kwargs)
    try:
        _run(model, inputs, roles, mass_mode="fused")
    finally:
        role_mass_attention.role_attention = fused_kernel
    # the intervention's query rows (text after the first image), so an edit of other rows differs from HF's
    edits = RoleLogitEdits(query_mask=intervention_query_mask(roles, "user_text_and_response"),
                           bias=torch.tensor([0.0, 2.0, -1.0, 0.5, 0.0]))
    assert 0 < int(edits.query_mask.sum()) < int((roles >= 0).sum())

    def logits(layers=None, edit=True):
        with torch.no_grad():
            return model(inputs["input_ids"], attention_mask=inputs["attention_mask"], token_roles=roles, **images,
                         logit_edits=RoleLogitEdits(edits.query_mask, bias=edits.bias, layers=layers) if edit
                         else None)

    try:
        model(inputs["input_ids"], attention_mask=inputs["attention_mask"], mass_sink=Recorder(), **images)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return dict(fused_calls=len(calls), every_avar_layer=logits(), layer_1=logits(frozenset({1})),
                unedited=logits(edit=False), real=inputs["attention_mask"].bool(), refusal=refusal,
                edits=edits)


def _hf_eager_logits_edited(hf, inputs, roles, edits, layer: int):
    """HF's eager logits with the edit ``edits`` (a RoleLogitEdits of biases) describes written as an additive
    attention mask of decoder layer ``layer``: bias[role of key j] added to the logit of (i, j) on the rows i of
    ``edits.query_mask``. The reference of the megatron model's edits, computed by no code of ours."""
    key_bias = torch.where(roles >= 0, edits.bias[roles.clamp(min=0)], 0.0)  # [B, S]
    edit = edits.query_mask[:, None, :, None].float() * key_bias[:, None, None, :]  # [B, 1, S, S]
    seen = []

    def add_edit(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dtype.is_floating_point and mask.shape[-2:] == edit.shape[-2:], mask
        seen.append(1)
        return args, {**kwargs, "attention_mask": mask + edit.to(mask.dtype)}

    attention = hf.model.language_model.layers[layer].self_attn
    handle = attention.register_forward_pre_hook(add_edit, with_kwargs=True)
    try:
        logits = hf_logits(hf, inputs)
    finally:
        handle.remove()
    assert seen == [1]
    return logits


@pytest.fixture(scope="module")
def tp1():
    return run_on_ranks(_results, 1, 1, timeout_s=240)[0]


def _eager_masses(probs, roles):
    """mass[b, h, i, r] = sum over keys j of role r of the eager probabilities [B, H, S, S]."""
    one_hot = torch.stack([(roles == r) for r in range(5)], dim=-1).to(probs.dtype)  # [B, S, R]
    return torch.einsum("bhij,bjr->bhir", probs, one_hot)


def test_masses_equal_hf_eager_attention(tp1):
    roles = tp1["roles"]
    real = roles >= 0
    assert sorted(tp1["masses"]) == list(ALL_LAYERS)
    for layer, probs in enumerate(tp1["eager"]):
        ours, reference = tp1["masses"][layer], _eager_masses(probs, roles)
        assert ours.shape == reference.shape == (3, 4, roles.shape[1], 5)
        difference = (ours - reference).abs().permute(0, 2, 1, 3)[real]  # real query rows only
        assert difference.max() < MASS_TOLERANCE
        assert ours[..., TokenRole.IMAGE].permute(0, 2, 1)[real].max() > 0.05  # the check can see image mass


def test_logits_with_every_layer_an_avar_layer_equal_hf(tp1):
    ours, reference, real = tp1["logits"]
    assert ((ours - reference)[real].abs().max() / reference[real].abs().max()) < RELATIVE_TOLERANCE


def test_packed_row_equals_its_samples_run_alone(tp1):
    logits, masses = tp1["packed"]
    unpacked_logits = tp1["logits"][0]
    start = 0
    for b, length in enumerate(tp1["lengths"][:2]):
        torch.testing.assert_close(logits[0, start:start + length], unpacked_logits[b, :length], rtol=1e-5, atol=1e-5)
        for layer in ALL_LAYERS:
            torch.testing.assert_close(masses[layer][0][0, :, start:start + length],
                                       tp1["masses"][layer][b, :, :length], rtol=0, atol=MASS_TOLERANCE)
        start += length
    assert masses[0][0][0, :, start:].abs().max() == 0  # padding rows: no mass


@pytest.mark.multiprocess
def test_tensor_parallel_ranks_report_their_heads_of_the_same_masses(tp1):
    ranks = run_on_ranks(_results, 2, 2, timeout_s=240)
    for layer in ALL_LAYERS:
        assert [(h.first, h.local, h.total) for h in (r["heads"][layer] for r in ranks)] == [(0, 2, 4), (2, 2, 4)]
        gathered = torch.cat([r["masses"][layer] for r in ranks], dim=1)
        torch.testing.assert_close(gathered, tp1["masses"][layer], rtol=0, atol=MASS_TOLERANCE)


def _at_rows(mass, rows):
    return mass.permute(0, 2, 1, 3).reshape(-1, mass.shape[1], mass.shape[3])[rows]


def test_probe_masses_at_the_sinks_rows_equal_hf_eager(tp1):
    rows, roles = tp1["rows"], tp1["roles"]
    logits, masses = tp1["probe"]
    _, fused = tp1["probe_fused"]
    for layer, probs in enumerate(tp1["eager"]):
        reference = _at_rows(_eager_masses(probs, roles), rows)
        assert masses[layer][0].shape == fused[layer][0].shape == (rows.numel(), 4, 5)
        assert (masses[layer][0] - reference).abs().max() < MASS_TOLERANCE
        assert (fused[layer][0] - reference).abs().max() < MASS_TOLERANCE


def test_probe_mode_logits_equal_hf_with_and_without_a_sink(tp1):
    _, reference, real = tp1["logits"]
    for ours in (tp1["probe"][0], tp1["probe_no_sink"]):
        assert ((ours - reference)[real].abs().max() / reference[real].abs().max()) < RELATIVE_TOLERANCE


def test_standard_layers_keep_packed_samples_apart(tp1):
    """A model without AVAR layers, called without token roles: its packed row's logits are each sample's own, as
    HF gives them for the samples in separate rows (no layer attends across samples or to padding)."""
    logits, (_, reference, _) = tp1["plain_packed"], tp1["logits"]
    start = 0
    for b, length in enumerate(tp1["lengths"][:2]):
        torch.testing.assert_close(logits[0, start:start + length], reference[b, :length], rtol=1e-4, atol=1e-4)
        start += length


def test_standard_layers_run_plain_attention_in_every_mode(tp1):
    """Layer 1 the only AVAR layer: in fused mode the fused kernel runs once per forward (layer 1), and logit
    edits meant for "every AVAR layer" change layer 1 alone; a sink without token roles is refused by name."""
    standard = tp1["standard_layers"]
    assert standard["fused_calls"] == 1
    real = standard["real"]
    assert torch.equal(standard["every_avar_layer"], standard["layer_1"])
    assert (standard["layer_1"] - standard["unedited"])[real].abs().max() > 1e-3  # the edits did change layer 1
    # and changed it as the same bias in HF's eager attention of layer 1 does (found in review: "changed" alone
    # passed a bias applied to the wrong roles, rows or layer)
    reference = standard["hf_eager_layer_1"]
    assert ((standard["layer_1"] - reference)[real].abs().max() / reference[real].abs().max()) < RELATIVE_TOLERANCE
    assert standard["refusal"] == "mass_sink and logit_edits need token_roles (TokenRole per token)"


def test_probe_on_a_packed_row_equals_the_samples_run_alone(tp1):
    logits, masses = tp1["probe_packed"]
    fused_logits, fused_masses = tp1["packed"]
    real = tp1["packed_rows"]
    torch.testing.assert_close(logits[0, :real.max() + 1], fused_logits[0, :real.max() + 1], rtol=1e-5, atol=1e-5)
    for layer in ALL_LAYERS:
        torch.testing.assert_close(masses[layer][0], _at_rows(fused_masses[layer][0], real), rtol=0,
                                   atol=MASS_TOLERANCE)


def _kernel_families():
    """A packed row's logits, the masses at the sink's rows and every parameter's gradient of a loss of both,
    through the GPU kernel family ("triton": role_attention's and role_mass's Triton kernels, here under the
    interpreter, with megatron's strided q/k/v views) and the CPU family ("blockwise"), in both mass modes."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_state_dict

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    model = _build(config, 1)
    load_hf_state_dict(model, hf.state_dict(), config)
    inputs = case_batch("padded_right")
    packed_inputs, packed_roles, packing = _packed(inputs, chat_like_roles(inputs["input_ids"],
                                                                           inputs["attention_mask"]), config)
    rows = torch.nonzero(packed_roles.reshape(-1) == TokenRole.USER_TEXT, as_tuple=True)[0]

    class KeepingSink(RowRecorder):  # keeps the masses in the graph, as AGTO's sink does
        def __call__(self, layer_index, mass, out, heads):
            self.masses[layer_index] = mass
            return out

    results = {}
    for impl in ("blockwise", "triton"):
        for mode in ("probe", "fused"):
            sink = KeepingSink(rows)
            model.zero_grad(set_to_none=True)
            logits = model(packed_inputs["input_ids"], pixel_values=packed_inputs["pixel_values"],
                           image_grid_thw=packed_inputs["image_grid_thw"], token_roles=packed_roles, mass_sink=sink,
                           role_attention_impl=impl, mass_mode=mode, **packing)
            loss = logits.float().square().mean() + sum(mass.square().sum() for mass in sink.masses.values())
            loss.backward()
            results[impl, mode] = {
                "logits": logits.detach(), "masses": {k: v.detach() for k, v in sink.masses.items()},
                "grads": {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}}
    parallel_state.destroy_model_parallel()
    dist.barrier()
    return results


def test_the_triton_kernel_family_under_the_interpreter_equals_the_cpu_family_in_the_model():
    """What bench_sft's probe-triton and fused modes run on a GPU, checked before a GPU is lent: fp32 on both
    sides, the same mathematics in other summation orders (observed ~1e-6 of the largest logit or gradient,
    ~1e-7 on masses), so 1e-5 relative to the largest magnitude and MASS_TOLERANCE on masses; a wrong stride,
    window or offset in the kernels' launch gives errors of order 1."""
    results = run_on_ranks(_kernel_families, 1, timeout_s=300)[0]
    for mode in ("probe", "fused"):
        cpu, gpu = results["blockwise", mode], results["triton", mode]
        assert set(gpu["masses"]) == set(ALL_LAYERS) and gpu["grads"].keys() == cpu["grads"].keys()
        scale = cpu["logits"].abs().max()
        torch.testing.assert_close(gpu["logits"], cpu["logits"], rtol=0, atol=RELATIVE_TOLERANCE * scale)
        for layer in ALL_LAYERS:
            torch.testing.assert_close(gpu["masses"][layer], cpu["masses"][layer], rtol=0, atol=MASS_TOLERANCE)
        for name, grad in cpu["grads"].items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(gpu["grads"][name], grad, rtol=0, atol=RELATIVE_TOLERANCE * grad.abs().max(),
                                       msg=lambda text, name=name: f"{name}: {text}")


def _refuse_host_syncs():
    """Every host read refused (``megatron_avar.testing.host_syncs``); returns the undo."""
    return refuse_host_syncs("inside an AVAR layer")


def forward_refusing_host_syncs(forward):
    """``forward`` (a core attention's) with every host read refused while it runs."""
    def guarded_forward(self, *args, **kwargs):
        undo = _refuse_host_syncs()
        try:
            return forward(self, *args, **kwargs)
        finally:
            undo()
    return guarded_forward


def _no_sync_steps():
    """Forward and backward of a packed batch through AVAR layers on the GPU kernel path ("triton"), with the
    kernels replaced by their pure-PyTorch references (the Triton launches themselves never read the device
    on the host; the interpreter would), and every host read refused inside the layers' forward and backward."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models import role_mass_attention
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.ops import role_attention_triton, role_mass_triton
    from megatron_avar.ops.role_attention import reference_role_attention
    from megatron_avar.ops.role_mass import reference_role_mass

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)
    role_mass_triton.triton_role_mass = reference_role_mass
    role_attention_triton.triton_role_attention = lambda problem, compute_mass=True: reference_role_attention(problem)
    hf = tiny_hf_model()
    config = Qwen25VLConfig.from_hf(hf.config)
    model = _build(config, 1)
    inputs = case_batch("padded_right")
    roles = chat_like_roles(inputs["input_ids"], inputs["attention_mask"])
    packed_inputs, packed_roles, packing = _packed(inputs, roles, config)
    rows = torch.nonzero(packed_roles.reshape(-1) == TokenRole.USER_TEXT, as_tuple=True)[0]

    forward = role_mass_attention.RoleMassCoreAttention.forward
    undo_box = []
    role_mass_attention.RoleMassCoreAttention.forward = forward_refusing_host_syncs(forward)
    done = []
    plain_attention = dict(role_mass_attention.PLAIN_ATTENTION_FOR)
    for mode in ("probe", "probe, out from SDPA", "fused"):
        class GradSink(RowRecorder):
            def __call__(self, layer_index, mass, out, heads):
                # a loss of the masses, added to the output's gradient path, as AGTO's term is
                return out + 0.0 * mass.sum()

        # "out from SDPA": the route "auto" takes on GPUs for bf16 rows (SDPA per span, spans from the params)
        role_mass_attention.PLAIN_ATTENTION_FOR = dict(plain_attention, triton="sdpa") if "SDPA" in mode \
            else plain_attention
        logits = model(packed_inputs["input_ids"], pixel_values=packed_inputs["pixel_values"],
                       image_grid_thw=packed_inputs["image_grid_thw"], token_roles=packed_roles,
                       mass_sink=GradSink(rows), role_attention_impl="triton",
                       mass_mode=mode.split(",")[0], **packing)
        loss = logits.float().square().mean()
        undo_box.append(_refuse_host_syncs())
        try:
            loss.backward()
        finally:
            undo_box.pop()()
        done.append(mode)
    role_mass_attention.RoleMassCoreAttention.forward = forward
    role_mass_attention.PLAIN_ATTENTION_FOR = plain_attention
    parallel_state.destroy_model_parallel()
    dist.barrier()
    return done


def test_no_host_sync_inside_avar_layers_on_the_gpu_path():
    assert run_on_ranks(_no_sync_steps, 1, timeout_s=240)[0] == ["probe", "probe, out from SDPA", "fused"]
