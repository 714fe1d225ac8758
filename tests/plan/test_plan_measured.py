"""`avar plan` against measurements: the predicted peak of a toy training step on this machine within 15% of the
measured one (fp32 and bf16), the activations autograd saves within 15% of the plan's (each recompute mode, bf16,
a standard layer, context parallelism over 2 ranks; tests/conftest.py's toy model and data), and every rank's
parameter count of the published 7B / 3B at TP=2 and PP=2
exactly (built on the meta device).

How memory is measured, and why not with ``perf/peak_memory_gb``: on a CPU that metric is the process's peak
resident set size, which also holds the interpreter, torch, megatron, transformers and the data loader (hundreds
of MB, more than the toy model's step; it grew by 440-820 MB in these runs for 440-530 MB of tensors), and glibc
keeps freed blocks resident. Instead the rank runs the steps inside torch's profiler with ``profile_memory=True``:
every allocation and free of torch's CPU allocator is an event with its size, so the running sum of those
events from just before the model is built is the tensor memory the run holds — what
``torch.cuda.max_memory_allocated`` counts on a GPU, the quantity the plan predicts. Its maximum over two steps
(the second one has Adam's states) is the measured peak. Activations are measured separately and exactly: a
forward pass under ``torch.autograd.graph.saved_tensors_hooks`` records every storage autograd keeps for
backward (parameters and the loss's saved softmax, which the plan counts as weights and logits, left out).

What this checks and what it cannot: the static terms (weights, fp32 gradients, main params and Adam moments),
the logits phase (the toy's 152k vocabulary makes it most of the toy's peak: activations are ~1% of it, hence
the separate activation check) and the CPU kernel family's activation coefficients (``plan.memory.CPU_KERNELS``),
on one rank. The GPU family (no GPU step of today's attention is recorded yet: the GPU check writes the plan's
peak beside each measured one), vLLM, and the activations of multi-rank layouts other than CP=2 (measured on 2
ranks: each keeps half the tokens' activations plus the gathered keys and values, and the activations of the
images it encodes — the plan assumes an even share, so a micro-batch of a few unequal images lands further from it,
here within 10%) are not measured; the in-flight
counts of the pipeline schedules are checked against megatron's own schedule functions in test_plan_memory.py.
"""

import gc
import sys
from pathlib import Path

import pytest

from megatron_avar.testing import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sft"))  # the shared tiny SFT settings (tests/sft)
from sft_cases import sft_overrides  # noqa: E402

TOLERANCE = 0.15  # the bound; every comparison here lands within ~2% (printed with -s)


def _microbatch_counts(mb, config, image_token_id: int) -> tuple[int, int, int]:
    """(image tokens, AGTO query rows, labelled tokens) of a micro-batch's rows: what the plan is told about a
    row."""
    from megatron_avar.plan import microbatch_row_counts

    return microbatch_row_counts(mb, image_token_id=image_token_id, exclude_sink=config.avar.exclude_sink)


def _profiled_steps(overrides: list[str], steps: int) -> dict:
    """Build the run and train ``steps`` steps under the profiler; the peak of live tensor bytes and the
    largest per-micro-batch image-token and query-row counts (what the plan is given)."""
    import resource

    import torch
    from megatron.core import parallel_state
    from torch.profiler import ProfilerActivity, profile

    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import build_run, train_step
    from megatron_avar.training.megatron_setup import init_distributed

    config = load_config(SFTConfig, None, overrides)
    layout = init_distributed(1, 1, seed=config.train.seed)
    gc.collect()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = (0, 0, 0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run = build_run(config, layout)
        batches = iter(run.data)
        for _ in range(steps):
            step = next(batches)
            for mb in step.microbatches:
                counts = max(counts, _microbatch_counts(mb, config, run.qwen_config.image_token_id),
                             key=lambda row: row[0] + row[2])  # the fullest row (image + labelled tokens)
            train_step(run.model, step, config, avar_layers=run.avar_layers, layout=layout)
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    parallel_state.destroy_model_parallel()
    del run, batches
    gc.collect()
    return {"peak": peak, "counts": counts, "rss_growth": rss_growth}


def _saved_activations(overrides: list[str]) -> dict:
    """Bytes autograd saves in one micro-batch's forward (no parameters, no loss softmax)."""
    import torch
    from megatron.core import parallel_state

    from megatron_avar.config import load_config
    from megatron_avar.models.context_parallel import local_positions
    from megatron_avar.roles import labelled_positions
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import build_run
    from megatron_avar.training.megatron_setup import init_distributed
    from megatron_avar.training.objective import AGTOSink, QuerySets

    config = load_config(SFTConfig, None, overrides)
    cp = config.parallel.context_parallel_size
    layout = init_distributed(1, 1, seed=config.train.seed, cp=cp)
    run = build_run(config, layout)
    image_token_id = run.qwen_config.image_token_id
    mb = max(next(iter(run.data)).microbatches, key=lambda m: _microbatch_counts(m, config, image_token_id))
    parameters = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    sink = AGTOSink(QuerySets(mb.roles, mb.segment_ids), config.avar, num_layers=len(run.avar_layers), weight=1.0,
                    grad_scale=1.0)
    held = None if cp == 1 else local_positions(mb.input_ids.shape[1], cp, parallel_state.get_context_parallel_rank(),
                                                torch.device("cpu"))
    rows = labelled_positions(mb.labels, held)  # the trainer's: the output layer runs on this rank's labelled tokens
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run.model.chunks[0](mb.input_ids, position_ids=mb.position_ids, pixel_values=mb.pixel_values,
                            image_grid_thw=mb.image_grid_thw, labels=mb.labels, token_roles=mb.roles,
                            segment_ids=mb.segment_ids, mass_sink=sink, output_rows=rows)
    vocab_logits = rows.numel() * run.qwen_config.text.vocab_size * 4  # the cross entropy's fp32 softmax
    logits = [n for n in saved.values() if n == vocab_logits]
    parallel_state.destroy_model_parallel()
    return {"saved": sum(saved.values()) - sum(logits), "logits_saved": len(logits),
            "counts": _microbatch_counts(mb, config, image_token_id)}


def _on_one_rank(function, runs: dict[str, list[str]], *args) -> dict:
    """Rank process: ``function(overrides, *args)`` for each named run, one after the other."""
    return {name: function(overrides, *args) for name, overrides in runs.items()}


def _plan(overrides, counts, gpus=1):
    """The plan of the run, told the measured rows' (image tokens, AGTO query rows, labelled tokens)."""
    from megatron_avar.config import load_config
    from megatron_avar.plan import Assumptions, load_model_config, plan_sft
    from megatron_avar.sft.config import SFTConfig

    config = load_config(SFTConfig, None, overrides)
    qwen_config, source = load_model_config(config.model.hf_path, None)
    seq = config.data.seq_length
    image_tokens, query_rows, labelled = counts
    return plan_sft(config, qwen_config, source, Assumptions(gpus=gpus, image_fraction=image_tokens / seq,
                                                              query_fraction=query_rows / seq,
                                                              response_fraction=labelled / seq, kernels="cpu"))


@pytest.fixture(scope="module")
def overrides(sft_inputs, tmp_path_factory):
    return {precision: sft_overrides(sft_inputs, tmp_path_factory.mktemp(f"plan_{precision}"),
                                     **{"train.precision": precision})
            for precision in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def profiled(overrides):
    return run_on_ranks(_on_one_rank, 1, _profiled_steps, overrides, 2, timeout_s=400)[0]


# Activation runs: each recompute mode (fp32), bf16 (torch norms upcast to fp32), and a model whose second layer is
# a standard layer (the AVAR layers' attention without masses: no S x S probabilities, no dense mask).
ACTIVATION_RUNS = {
    "none": ("fp32", ["train.recompute=none"]), "selective": ("fp32", ["train.recompute=selective"]),
    "full": ("fp32", ["train.recompute=full"]), "bf16": ("bf16", []),
    "standard-layer": ("fp32", ["avar.layers=[0]"]), "standard-layer-bf16": ("bf16", ["avar.layers=[0]"]),
}


@pytest.fixture(scope="module")
def activation_runs(overrides):
    runs = {name: overrides[precision] + extra for name, (precision, extra) in ACTIVATION_RUNS.items()}
    return runs, run_on_ranks(_on_one_rank, 1, _saved_activations, runs, timeout_s=400)[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predicted_peak_is_within_15_percent_of_the_measured_toy_run(overrides, profiled, precision):
    measured = profiled[precision]
    plan = _plan(overrides[precision], measured["counts"])
    predicted = plan.memory.peak
    print(f"\n[plan] toy SFT {precision}: measured peak {measured['peak'] / 1e6:.1f} MB (tensors; peak RSS grew "
          f"{measured['rss_growth'] / 1e6:.1f} MB), predicted {predicted / 1e6:.1f} MB "
          f"({predicted / measured['peak'] - 1:+.1%})")
    assert predicted == pytest.approx(measured["peak"], rel=TOLERANCE)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(ACTIVATION_RUNS))
def test_saved_activations_are_predicted(activation_runs, name):
    runs, measured_runs = activation_runs
    run_overrides, measured = runs[name], measured_runs[name]
    assert measured["logits_saved"] == 1
    worst = _plan(run_overrides, measured["counts"]).memory.worst
    predicted = sum(worst.stored.values()) / worst.in_flight
    print(f"\n[plan] toy SFT {name}: saved activations {measured['saved'] / 1e6:.3f} MB, predicted "
          f"{predicted / 1e6:.3f} MB ({predicted / measured['saved'] - 1:+.1%})")
    assert predicted == pytest.approx(measured["saved"], rel=TOLERANCE)


@pytest.mark.multiprocess
def test_saved_activations_under_context_parallelism_are_predicted(overrides):
    """CP=2 on 2 ranks: each rank keeps its half of the per-token activations plus every layer's gathered keys and
    values of the whole row (the plan's CP term) and the activations of the images it encodes (the plan: half of
    them; the toy micro-batch's few images split unevenly: observed +14% on the rank with fewer patches, -4% on the
    other); the same 15% bound, on every rank."""
    run_overrides = overrides["fp32"] + ["parallel.context_parallel_size=2"]
    for measured in run_on_ranks(_on_one_rank, 2, _saved_activations, {"cp": run_overrides}, timeout_s=400):
        measured = measured["cp"]
        assert measured["logits_saved"] == 1
        worst = _plan(run_overrides, measured["counts"], gpus=2).memory.worst
        predicted = sum(worst.stored.values()) / worst.in_flight
        print(f"\n[plan] toy SFT CP=2: saved activations {measured['saved'] / 1e6:.3f} MB, predicted "
              f"{predicted / 1e6:.3f} MB ({predicted / measured['saved'] - 1:+.1%})")
        assert predicted == pytest.approx(measured["saved"], rel=TOLERANCE)


def _local_parameter_counts(layouts) -> dict:
    """Rank process: this rank's parameter count of each (published size, tp, pp), built on the meta device."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel
    from megatron_avar.models.qwen2_5_vl.published import PUBLISHED

    platform.prepare_megatron()
    counts = {}
    for size, tp, pp in layouts:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model_parallel_cuda_manual_seed(0)
        settings = MegatronSettings(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                    params_dtype=torch.bfloat16, init_on_meta_device=True)
        model = Qwen25VLModel(Qwen25VLConfig.from_hf(PUBLISHED[size]), settings,
                              pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                              pre_process=parallel_state.is_pipeline_first_stage(),
                              post_process=parallel_state.is_pipeline_last_stage())
        counts[(size, tp, pp)] = (parallel_state.get_pipeline_model_parallel_rank(),
                                  sum(p.numel() for p in model.parameters()))
        parallel_state.destroy_model_parallel()
    return counts


LAYOUTS = [("7b", 2, 1), ("7b", 1, 2), ("3b", 1, 2)]  # 3B ties its embeddings: the last stage holds a copy


@pytest.mark.multiprocess
def test_every_rank_holds_the_planned_parameter_count():
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.published import PUBLISHED
    from megatron_avar.plan import Parallelism, stage_parameters

    ranks = run_on_ranks(_local_parameter_counts, 2, LAYOUTS, timeout_s=300)
    for size, tp, pp in LAYOUTS:
        config = Qwen25VLConfig.from_hf(PUBLISHED[size])
        for rank in ranks:
            stage, count = rank[(size, tp, pp)]
            assert stage_parameters(config, Parallelism(tp=tp, pp=pp), stage)[0] == count, (size, tp, pp, stage)
