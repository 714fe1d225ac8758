"""The formulas of `avar plan` (megatron_avar/plan/memory.py), written out again here from their definitions: the
parameter count of every published size equals Hugging Face's, each memory term has the size its docstring states,
the in-flight forward passes are those of megatron's own schedules, and the step time is the trainer's FLOP count
at the stated MFU. (tests/plan/test_plan_measured.py compares the plan with measured runs.)"""

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
from megatron_avar.models.qwen2_5_vl.published import PUBLISHED
from megatron_avar.plan import CPU_KERNELS, GPUS, Parallelism, StepShape, memory_plan, stage_parameters, verdict
from megatron_avar.plan.gpus import FRAGMENTATION, RUNTIME_RESERVE_BYTES
from megatron_avar.plan.memory import _in_flight

REPO = Path(__file__).resolve().parents[2]
QWEN_7B = Qwen25VLConfig.from_hf(PUBLISHED["7b"])
H, G, F, D, V, L = 3584, 4 * 128, 18944, 128, 152064, 28  # Qwen2.5-VL-7B: hidden, kv width, FFN, head dim, vocab


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_total_parameters_equal_hugging_face(size):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**PUBLISHED[size]))
    config = Qwen25VLConfig.from_hf(PUBLISHED[size])
    assert stage_parameters(config, Parallelism(), 0)[0] == sum(p.numel() for p in hf.parameters())


def test_static_terms_per_precision_and_optimizer():
    parallel = Parallelism(tp=2, dp=8)
    params = stage_parameters(QWEN_7B, parallel, 0)[0]
    bf16 = memory_plan(QWEN_7B, parallel, StepShape(seq_length=1024)).worst.static
    assert bf16 == {"weights": 2 * params, "gradients": 4 * params, "optimizer_states": 12 * params // 8}
    fp32 = memory_plan(QWEN_7B, parallel, StepShape(seq_length=1024, precision="fp32")).worst.static
    assert fp32 == {"weights": 4 * params, "gradients": 4 * params, "optimizer_states": 8 * params // 8}
    replicated = memory_plan(QWEN_7B, Parallelism(tp=2, dp=8, distributed_optimizer=False),
                             StepShape(seq_length=1024)).worst.static
    assert replicated["optimizer_states"] == 12 * params
    # context parallelism: the distributed optimizer shards over dp x cp
    cp = memory_plan(QWEN_7B, Parallelism(tp=2, dp=4, cp=2), StepShape(seq_length=1024)).worst.static
    assert cp["optimizer_states"] == 12 * params // 8


def _decoder(parallel, **shape):
    plan = memory_plan(QWEN_7B, parallel, StepShape(seq_length=4096, avar_layers=tuple(range(L)), **shape))
    return plan.worst


def test_decoder_activations_by_recompute_mode_and_layout():
    s, t = 4096, 2
    none = _decoder(Parallelism(tp=t))
    # GPU kernels, every layer an AVAR layer: 4h (two fused norm+linear pairs) + (4h + 3g + 3f) / t + 4d per token
    per_token = 4 * H + (4 * H + 3 * G + 3 * F) / t + 4 * D
    assert none.stored["decoder_activations"] == int(L * s * per_token * 2)
    selective = _decoder(Parallelism(tp=t), recompute="selective")
    assert selective.stored["decoder_activations"] == int(L * s * (per_token - H / t) * 2)  # the kernel's output
    full = _decoder(Parallelism(tp=t), recompute="full")
    assert full.stored["decoder_activations"] == L * s * H * 2  # each layer's input
    assert full.transient["recomputed_layer"] == int(s * per_token * 2)
    sequence_parallel = _decoder(Parallelism(tp=t, sequence_parallel=True))
    assert sequence_parallel.stored["decoder_activations"] == int(L * s * (per_token - 4 * H + 4 * H / t) * 2)
    context_parallel = _decoder(Parallelism(tp=t, cp=2))
    # half the tokens, plus the whole row's gathered keys and values (2 x s x g / t) in every layer
    assert context_parallel.stored["decoder_activations"] == int(L * (s / 2 * per_token + 2 * s * G / t) * 2)
    # standard layers run the AVAR layers' attention: the same bytes, no S x S scores, no dense [s, s] mask
    standard = memory_plan(QWEN_7B, Parallelism(tp=t), StepShape(seq_length=s)).worst
    assert standard.stored["decoder_activations"] == none.stored["decoder_activations"]
    assert standard.transient.keys() == none.transient.keys()


def test_vision_activations_count_four_patches_per_image_token():
    hv, fv, dv, depth, patch_dim, t = 1280, 3420, 80, 32, 1176, 2
    plan = memory_plan(QWEN_7B, Parallelism(tp=t), StepShape(seq_length=4096, image_tokens=1000)).worst
    # bytes per patch: a norm keeps its bf16 input, the linear after it the bf16 output (4 B)
    per_patch = (depth * (2 * 4 * hv + 2 * ((5 * hv + 3 * fv) / t + 4 * dv)) + 2 * patch_dim + 4 * hv
                 + 2 * 2 * hv / t)
    assert plan.stored["vision_activations"] == int(4000 * per_patch)


def test_logits_phase_of_each_loss():
    s, t = 4096, 2
    weight_grad = V // t * H
    lm = memory_plan(QWEN_7B, Parallelism(tp=t), StepShape(seq_length=s)).worst.transient["logits"]
    assert lm == 6 * s * V // t  # bf16 logits + their fp32 copy (then: fp32 gradient + its bf16 cast)
    fp32 = memory_plan(QWEN_7B, Parallelism(tp=t), StepShape(seq_length=s, precision="fp32")).worst
    assert fp32.transient["logits"] == 4 * s * V // t + 4 * weight_grad
    response = memory_plan(QWEN_7B, Parallelism(tp=t), StepShape(seq_length=s, loss="response", loss_rows=1000))
    assert response.worst.transient["logits"] == (2 + 8) * 1000 * V // t  # the rows' logits, fp32 copy, / T
    # SFT's labelled rows only (the trainers' output_rows): the logits of 1000 rows, not 4096
    labelled = memory_plan(QWEN_7B, Parallelism(tp=t), StepShape(seq_length=s, loss_rows=1000)).worst
    assert labelled.transient["logits"] == max(6 * 1000 * V // t, 2 * 1000 * V // t + 2 * weight_grad)


def test_avar_masses_are_rows_times_heads_times_roles():
    plan = memory_plan(QWEN_7B, Parallelism(tp=2), StepShape(seq_length=4096, mass_rows=300, avar_layers=(3, 4)))
    assert plan.worst.stored["avar_masses"] == 2 * 300 * 28 // 2 * (5 + 1) * 4  # 2 layers, 14 heads, 5 roles + lse
    full = memory_plan(QWEN_7B, Parallelism(tp=2),
                       StepShape(seq_length=4096, mass_rows=300, avar_layers=(3, 4), recompute="full"))
    assert full.worst.stored["avar_masses"] == 0  # recomputed with the layer


def test_pipeline_stages_hold_their_in_flight_micro_batches():
    shape = StepShape(seq_length=2048, num_microbatches=16, image_tokens=500, avar_layers=tuple(range(L)))
    plan = memory_plan(QWEN_7B, Parallelism(pp=4), shape)
    one_stage = memory_plan(QWEN_7B, Parallelism(), dataclasses.replace(shape, num_microbatches=1)).worst
    first, last = plan.stages[0], plan.stages[-1]
    assert [s.in_flight for s in plan.stages] == [4, 3, 2, 1]
    # stage 0: 4 micro-batches of a quarter of the layers = one micro-batch of all layers; the vision encoder 4x
    assert first.stored["decoder_activations"] == pytest.approx(one_stage.stored["decoder_activations"], rel=1e-9)
    assert first.stored["vision_activations"] == pytest.approx(4 * one_stage.stored["vision_activations"], rel=1e-9)
    assert "logits" in last.transient and "logits" not in first.transient
    assert last.stored["vision_activations"] == 0
    interleaved = memory_plan(QWEN_7B, Parallelism(pp=4, virtual_pipeline=7), shape).stages[0]
    factor = 1 + (4 - 1) / (4 * 7)  # Korthikanti et al. 2022: interleaving keeps this much more on stage 0
    assert interleaved.stored["decoder_activations"] == pytest.approx(
        factor * first.stored["decoder_activations"], rel=1e-9)


@pytest.mark.parametrize("pp,v,num_microbatches", [(1, 1, 4), (4, 1, 16), (4, 1, 2), (4, 2, 8), (4, 3, 12),
                                                   (2, 4, 6), (4, 2, 6)])
def test_in_flight_forwards_follow_megatrons_schedules(pp, v, num_microbatches):
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    for rank in range(pp):
        group = SimpleNamespace(size=lambda: pp, rank=lambda rank=rank: rank)
        communicator = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=None if v == 1 else v)
        _, _, warmup, _ = get_pp_rank_microbatches(num_microbatches, v, pp, p2p_communicator=communicator)
        if pp == 1:
            expected = 1  # forward_backward_no_pipelining: each micro-batch's backward follows its forward
        else:
            expected = min(warmup + 1, num_microbatches * v)
        chunks = _in_flight(Parallelism(pp=pp, virtual_pipeline=v), num_microbatches, rank)
        assert len(chunks) == expected, (rank, chunks, warmup)
        if v > 1:
            table = [chunk for _, chunk in get_schedule_table(num_microbatches, v, pp)]
            assert chunks == table[:expected]


def test_layouts_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3"):
        memory_plan(QWEN_7B, Parallelism(tp=3), StepShape(seq_length=1024))
    with pytest.raises(ValueError, match="do not split over pipeline"):
        memory_plan(QWEN_7B, Parallelism(pp=3), StepShape(seq_length=1024))
    with pytest.raises(ValueError, match="recompute"):
        StepShape(seq_length=1024, recompute="some")
    # the sizes offered divide every head count TP splits (7B: 28 heads, 4 key/value heads, 16 vision heads)
    with pytest.raises(ValueError, match=r"choose parallel.tensor_model_parallel_size \(convert: --tp\) among "
                                         r"\[1, 2, 4\]"):
        QWEN_7B.check_layout(tp=3, pp=1)


def test_cpu_kernels_count_what_the_cpu_path_saves():
    cpu = memory_plan(QWEN_7B, Parallelism(), StepShape(seq_length=1024, avar_layers=tuple(range(L))),
                      kernels=CPU_KERNELS).worst
    # RMSNorms (bf16 input and output: 4 B each), SDPA with k and v repeated to the query heads (5h + g), unfused
    # SwiGLU (5f)
    assert cpu.stored["decoder_activations"] == int(L * 1024 * (2 * 4 * H + 2 * (5 * H + G + 5 * F + 4 * D)))
    fp32 = memory_plan(QWEN_7B, Parallelism(), StepShape(seq_length=1024, avar_layers=(), precision="fp32"),
                       kernels=CPU_KERNELS).worst
    # fp32 norms: input and output; standard layers: the same attention, no [heads, s, s] probabilities, no mask
    per_token = 2 * 8 * H + 4 * (5 * H + G + 5 * F + 4 * D)
    assert fp32.stored["decoder_activations"] == int(L * 1024 * per_token)


def test_verdict_adds_fragmentation_and_reserve_and_the_engine_share():
    h100 = GPUS["h100"]
    assert h100.memory_bytes == 81559 * 2**20
    peak = 60 * 10**9
    training = verdict(h100, peak)
    assert training.required_bytes == int(peak * (1 + FRAGMENTATION) + RUNTIME_RESERVE_BYTES)
    assert training.fits and training.phase == "training"
    rollout = verdict(h100, peak, rollout_peak=40 * 10**9, engine_fraction=0.5)
    assert rollout.phase == "rollout" and not rollout.fits
    assert rollout.required_bytes == int(40e9 * (1 + FRAGMENTATION) + RUNTIME_RESERVE_BYTES
                                         + 0.5 * h100.memory_bytes)
    awake = verdict(h100, 30 * 10**9, rollout_peak=20 * 10**9, engine_fraction=0.3, engine_sleeps=False)
    assert awake.phase == "training"
    assert awake.required_bytes == int(30e9 * (1 + FRAGMENTATION) + RUNTIME_RESERVE_BYTES + 0.3 * h100.memory_bytes)
    refit = verdict(h100, peak, rollout_peak=20 * 10**9, engine_fraction=0.1, refit_peak=80 * 10**9)
    assert refit.phase == "refit" and not refit.fits  # the engine's share is not beside the refit: its KV cache sleeps
    assert refit.required_bytes == int(80e9 * (1 + FRAGMENTATION) + RUNTIME_RESERVE_BYTES)


def test_a_grpo_refit_gathers_one_tensor_at_a_time():
    """The refit streams the policy's weights gathered over TP one tensor at a time (a whole gathered copy per
    rank was the 72B model again, 145 GB, on every rank): the plan counts the largest weight and its HF pieces,
    and vLLM's TP shard of the weights with what its sleeping engine keeps, beside the trainer."""
    import json

    from megatron_avar.plan import Assumptions, plan_config

    plan = plan_config(str(REPO / "examples/grpo/avar_72b.yaml"), [], preset="72b",
                       assumptions=Assumptions(gpus=64)).as_dict()
    memory, value = plan["memory"], 2  # bf16
    trainer = plan["rollout"]["trainer_bytes"]
    embedding = 152064 * 8192  # the largest weight: the embedding (and the output layer)
    total = plan["parameters"]
    asleep = memory["extra_static"]["rollout_engine_asleep"]
    assert asleep == 10**9
    assert plan["rollout"]["refit_bytes"] == trainer + 2 * embedding * value + asleep + total * value // 8
    assert json.dumps(memory)  # the plan stays plain data
    assert {v["gpu"]: v["fits"] for v in plan["verdicts"]}["h200"]


def test_step_time_is_the_trainers_flops_at_the_stated_mfu():
    from megatron_avar.plan import Assumptions, plan_config
    from megatron_avar.training.metrics import training_flops

    plan = plan_config(str(REPO / "examples/sft/avar_7b.yaml"), [], preset="7b",
                       assumptions=Assumptions(gpus=16, mfu=0.5))
    rows, seq = 128, 16384
    samples = rows * seq // 2048  # one image of half a sample's tokens each: 1024 merged tokens, 4096 patches
    labelled = rows * round(0.35 * seq)  # the default response fraction: the output layer's tokens
    flops = training_flops(QWEN_7B, sample_lengths=[2048] * samples, image_patches=[4096] * samples,
                           output_tokens=labelled)
    assert plan.flops_per_step == flops
    assert plan.step_seconds(GPUS["h100"]) == pytest.approx(flops / (16 * 989.4e12 * 0.5), rel=1e-12)
    assert plan.shape.num_microbatches == math.ceil(rows / 8)
    # fp32 runs at the plain fp32 rate: no part of a step turns TF32 on (it was priced at TF32's 494.7, 7.4x fast)
    fp32 = plan_config(str(REPO / "examples/sft/avar_7b.yaml"), ["train.precision=fp32"], preset="7b",
                       assumptions=Assumptions(gpus=16, mfu=0.5))
    assert fp32.step_seconds(GPUS["h100"]) == pytest.approx(flops / (16 * 67e12 * 0.5), rel=1e-12)


@pytest.mark.parametrize("size", sorted(PUBLISHED))
@pytest.mark.parametrize(("samples", "sample_tokens", "patches", "output_tokens"), [
    (0, 2048, 0, 0), (1, 1, 1, 1), (7, 333, 4 * 7 * 50 + 3, 1000), (1024, 2048, 1024 * 4096, 128 * 5734),
    (96, 4096, 96 * 4 * 1024, 96 * 2048), (5000, 8192, 5000 * 4 * 4096 + 4999, 5000 * 512)])
def test_the_plans_flops_are_the_trainers_without_a_list_per_sample(size, samples, sample_tokens, patches,
                                                                   output_tokens):
    """Before: the plan built a list of every sample's length for training_flops: data.seq_length=1e12 was a
    MemoryError (1e9 took 10 s and 1.4 GB). The closed form gives the same float, to the last bit."""
    from megatron_avar.plan.runs import _flops
    from megatron_avar.training.metrics import training_flops

    qwen = Qwen25VLConfig.from_hf(PUBLISHED[size])
    listed = training_flops(qwen, sample_lengths=[sample_tokens] * samples,
                            image_patches=[patches // samples] * samples if samples else [],
                            output_tokens=output_tokens)
    assert _flops(qwen, samples=samples, sample_tokens=sample_tokens, patches=patches,
                  output_tokens=output_tokens) == listed


@pytest.mark.parametrize(("config", "overrides", "sample_tokens"), [
    ("examples/sft/avar_7b.yaml", [], None), ("examples/sft/avar_7b.yaml", ["data.seq_length=6000"], 1500),
    ("examples/sft/avar_72b.yaml", [], 777), ("examples/grpo/avar_7b.yaml", [], None),
    ("examples/grpo/avar_7b.yaml", ["loss.kl_coef=0"], 1000)])
def test_a_plans_flops_are_those_of_its_samples_listed(config, overrides, sample_tokens, monkeypatch):
    """Whole plans, SFT and GRPO: the step's FLOPs equal training_flops over the list of its samples."""
    import megatron_avar.plan.runs as runs
    from megatron_avar.plan import Assumptions, plan_config
    from megatron_avar.training.metrics import training_flops

    preset = "72b" if "72b" in config else "7b"
    assumptions = Assumptions(gpus=64 if preset == "72b" else 16, sample_tokens=sample_tokens)
    closed = plan_config(str(REPO / config), overrides, preset=preset, assumptions=assumptions)

    def listed(qwen_config, *, samples, sample_tokens, patches, output_tokens):  # the plan's FLOPs before
        return training_flops(qwen_config, sample_lengths=[sample_tokens] * samples,
                              image_patches=[patches // samples] * samples if samples else [],
                              output_tokens=output_tokens)

    monkeypatch.setattr(runs, "_flops", listed)
    assert closed.flops_per_step == plan_config(str(REPO / config), overrides, preset=preset,
                                                assumptions=assumptions).flops_per_step


def test_a_plan_of_rows_longer_than_memory_holds_is_computed_not_listed():
    """data.seq_length=1e12: 6e10 samples per step (a list of them: 500 GB), planned from their count (it does not
    fit any GPU)."""
    from megatron_avar.plan import Assumptions, plan_config

    plan = plan_config(str(REPO / "examples/sft/avar_7b.yaml"), ["data.seq_length=1e12"], preset="7b",
                       assumptions=Assumptions(gpus=16))
    assert plan.sample_tokens == 2048 and plan.shape.seq_length == 10**12
    assert plan.flops_per_step > 0 and not any(v.fits for v in plan.verdicts())
