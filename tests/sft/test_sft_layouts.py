"""One AVAR SFT step gives the same losses, AVAR metrics and gradient norm at every parallel layout (TP=2,
TP=2 with sequence parallelism, PP=2, DP=2 with the gradient reduce and weight gather overlapped — megatron's
default bucket and many small buckets — and not overlapped, CP=2 alone and with TP=2 (± SP) or PP=2 on 4 ranks,
against a single rank), and the next step, after the
optimizer update, agrees too: the LM loss is a global-batch token mean, each AGTO layer term is attached where
its layer runs (also on the first pipeline stage, which never sees the loss), head means are exact under TP and
the AVAR masses see every token under SP (the attention gathers the sequence).

Tolerance: fp32 everywhere; TP changes summation orders (~1e-7 relative), PP and DP only the grouping of
micro-batches. Bound 1e-5 relative (losses, metrics, grad norm) after one step; 1e-4 after an Adam update
(which divides by sqrt(v) and so amplifies the smallest gradient differences).
"""

import pytest

from megatron_avar.testing import run_on_ranks
from sft_cases import sft_overrides

pytestmark = pytest.mark.multiprocess
COMPARED = ("loss/lm", "avar/l_enh", "avar/l_sup", "avar/vas", "avar/image_share", "optim/grad_norm")


def _two_steps(overrides, layouts):
    from megatron.core import parallel_state

    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig
    from megatron_avar.sft.trainer import build_run, train_step
    from megatron_avar.training.megatron_setup import init_distributed

    results = {}
    for tp, pp, extra in layouts:
        config = load_config(SFTConfig, None, overrides + [f"parallel.tensor_model_parallel_size={tp}",
                                                           f"parallel.pipeline_model_parallel_size={pp}"] + extra)
        layout = init_distributed(tp, pp, seed=config.train.seed,
                                  vpp=config.parallel.virtual_pipeline_model_parallel_size,
                                  cp=config.parallel.context_parallel_size)
        run = build_run(config, layout)
        batches = iter(run.data)
        results[(tp, pp, tuple(extra))] = [train_step(run.model, next(batches), config, avar_layers=run.avar_layers,
                                                      layout=layout) for _ in range(2)]
        ddp = run.model.chunks[0]
        results[("built", tp, pp, tuple(extra))] = {
            "sequence_parallel": run.model.modules[0].config.sequence_parallel,
            "overlap_grad_reduce": ddp.ddp_config.overlap_grad_reduce,
            "overlap_param_gather": ddp.ddp_config.overlap_param_gather,
            "buckets": sum(len(buffer) for buffer in run.model.grad_bucket_layout()),
            "chunks": len(run.model.chunks), "cp": layout.cp, "dp": layout.dp}
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def layouts(sft_inputs, tmp_path_factory):
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    overrides = sft_overrides(sft_inputs, tmp_path_factory.mktemp("layouts"))
    # 4 layers: PP=2 x VPP=2 gives each rank two chunks of one layer
    toy = write_toy_checkpoint(tmp_path_factory.mktemp("toy4") / "model", ToyModelConfig(num_layers=4))
    four_layers = f"model.hf_path={toy}"
    single = run_on_ranks(_two_steps, 1, overrides, [(1, 1, []), (1, 1, ["avar.alpha=0", "avar.beta=0"]),
                                                     (1, 1, ["train.precision=bf16"]),
                                                     (1, 1, ["model.mass_mode=fused"]),
                                                     (1, 1, ["train.recompute=full"]),
                                                     (1, 1, ["train.recompute=selective"]),
                                                     (1, 1, [four_layers])], timeout_s=400)[0]
    two = run_on_ranks(_two_steps, 2, overrides, [(1, 1, []), (2, 1, []), (1, 2, []), (2, 1, [SP]),
                                                  (1, 1, [NO_OVERLAP]), (1, 1, [SMALL_BUCKETS]),
                                                  (1, 2, [four_layers, VPP]), (1, 1, [CP]),
                                                  (1, 1, [CP, "train.recompute=full"]),
                                                  (1, 1, [CP, "train.recompute=selective"])], timeout_s=600)
    four = run_on_ranks(_two_steps, 4, overrides, [(2, 1, [CP]), (2, 1, [CP, SP]), (1, 2, [CP])], timeout_s=600)
    # the 4-layer model's runs under a path-free name (the overrides are each key's last part)
    rename = lambda results: {(*key[:-1], tuple(FOUR_LAYERS if x == four_layers else x for x in key[-1])): value  # noqa: E731
                              for key, value in results.items()}
    return rename(single), [rename(rank) for rank in two], four


SP = "parallel.sequence_parallel=true"
NO_OVERLAP = "parallel.overlap_grad_reduce=false"
SMALL_BUCKETS = "parallel.ddp_bucket_size=40000"  # several buckets: reduces and gathers overlap compute
VPP = "parallel.virtual_pipeline_model_parallel_size=2"
CP = "parallel.context_parallel_size=2"
FOUR_LAYERS = "a 4-layer toy model"


@pytest.mark.parametrize("layout", [(1, 1, ()), (2, 1, ()), (1, 2, ()), (2, 1, (SP,)), (1, 1, (NO_OVERLAP,)),
                                    (1, 1, (SMALL_BUCKETS,))],
                         ids=["dp2", "tp2", "pp2", "tp2_sp", "dp2_no_overlap", "dp2_overlap_small_buckets"])
def test_steps_equal_the_single_rank_run(layouts, layout):
    single, two, _ = layouts
    reference = single[(1, 1, ())]
    for rank in two:  # every rank reports the same world-reduced metrics
        ours = rank[layout]
        for step, tolerance in ((0, 1e-5), (1, 1e-4)):
            for name in COMPARED:
                assert ours[step][name] == pytest.approx(reference[step][name], rel=tolerance), (step, name)
    assert reference[0]["data/samples_with_agto_term"] > 0


@pytest.mark.parametrize("ranks, layout", [(2, (1, 1, (CP,))), (2, (1, 1, (CP, "train.recompute=full"))),
                                           (2, (1, 1, (CP, "train.recompute=selective"))), (4, (2, 1, (CP,))),
                                           (4, (2, 1, (CP, SP))), (4, (1, 2, (CP,)))],
                         ids=["cp2", "cp2_full_recompute", "cp2_selective_recompute", "tp2_cp2", "tp2_cp2_sp",
                              "pp2_cp2"])
def test_context_parallel_steps_equal_the_single_rank_run(layouts, ranks, layout):
    """Every packed row split over 2 context-parallel ranks (samples straddle the ranks' chunks), alone (also with
    full and selective recompute: the gathers run again in backward), with TP=2 (and SP) and with PP=2 (the stages
    pass this rank's part of the rows): losses, AGTO terms of every layer and the gradient norm as one rank, over
    two steps."""
    single, two, four = layouts
    reference = single[(1, 1, ())]
    for rank in two if ranks == 2 else four:
        ours = rank[layout]
        for step, tolerance in ((0, 1e-5), (1, 1e-4)):
            per_layer = tuple(name for name in reference[step] if name.startswith("avar/layer_"))
            assert per_layer
            for name in COMPARED + per_layer:
                assert ours[step][name] == pytest.approx(reference[step][name], rel=tolerance), (step, name)


def test_interleaved_pipeline_steps_equal_the_single_rank_run(layouts):
    """PP=2 x VPP=2 on a 4-layer model: each rank holds two one-layer chunks (layers 0 and 2, or 1 and 3), the
    interleaved 1F1B schedule runs them; losses, AGTO terms of every layer and the gradient norm as one rank."""
    single, two, _ = layouts
    reference = single[(1, 1, (FOUR_LAYERS,))]
    for rank in two:
        ours = rank[(1, 2, (FOUR_LAYERS, VPP))]
        for step, tolerance in ((0, 1e-5), (1, 1e-4)):
            for name in COMPARED + tuple(f"avar/layer_{layer:02d}/l_enh" for layer in range(4)):
                assert ours[step][name] == pytest.approx(reference[step][name], rel=tolerance), (step, name)
    built = two[0][("built", 1, 2, (FOUR_LAYERS, VPP))]
    assert built["chunks"] == 2


def test_layouts_were_built_as_asked(layouts):
    """The comparisons above compare what they claim: SP really on, overlap on by default, small buckets many."""
    _, two, four = layouts
    built = {key[1:]: value for key, value in two[0].items() if key[0] == "built"}
    assert (built[(1, 1, (CP,))]["cp"], built[(1, 1, (CP,))]["dp"]) == (2, 1)
    built_four = {key[1:]: value for key, value in four[0].items() if key[0] == "built"}
    assert built_four[(2, 1, (CP, SP))]["sequence_parallel"] and built_four[(2, 1, (CP,))]["cp"] == 2
    assert built[(2, 1, (SP,))]["sequence_parallel"] and not built[(2, 1, ())]["sequence_parallel"]
    assert built[(1, 1, ())]["overlap_grad_reduce"] and built[(1, 1, ())]["overlap_param_gather"]
    assert not built[(1, 1, (NO_OVERLAP,))]["overlap_grad_reduce"]
    assert built[(1, 1, (SMALL_BUCKETS,))]["buckets"] >= 4 > built[(1, 1, ())]["buckets"]


def test_agto_gradient_is_present_and_the_lm_loss_is_not_changed_by_it(layouts):
    single, _, _ = layouts
    with_agto, without = single[(1, 1, ())][0], single[(1, 1, ("avar.alpha=0", "avar.beta=0"))][0]
    assert without["loss/lm"] == pytest.approx(with_agto["loss/lm"], rel=1e-6)
    assert without["avar/l_enh"] == pytest.approx(with_agto["avar/l_enh"], rel=1e-6)  # still measured
    assert abs(without["optim/grad_norm"] - with_agto["optim/grad_norm"]) > 1e-3 * with_agto["optim/grad_norm"]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_recompute_gives_the_same_steps(layouts, mode):
    """Recompute (the decoder's layers or core attention; under full recompute also the vision blocks) repeats
    the same forward in the backward pass: fp32 bounds as across layouts."""
    single, _, _ = layouts
    plain, recomputed = single[(1, 1, ())], single[(1, 1, (f"train.recompute={mode}",))]
    for step, tolerance in ((0, 1e-5), (1, 1e-4)):
        for name in COMPARED:
            assert recomputed[step][name] == pytest.approx(plain[step][name], rel=tolerance), (step, name)


def test_bf16_step_is_close_to_fp32(layouts):
    """bf16 weights and activations (fp32 main params and grad reduction, megatron's mixed precision): the first
    step's losses within bf16's ~3 significant digits of fp32 (bound 2e-2 relative; the gradient norm 5e-2)."""
    single, _, _ = layouts
    fp32, bf16 = single[(1, 1, ())][0], single[(1, 1, ("train.precision=bf16",))][0]
    for name in ("loss/lm", "avar/l_enh", "avar/l_sup", "avar/vas"):
        assert bf16[name] == pytest.approx(fp32[name], rel=2e-2), name
    assert bf16["optim/grad_norm"] == pytest.approx(fp32["optim/grad_norm"], rel=5e-2)


def test_probe_and_fused_mass_modes_give_the_same_steps(layouts):
    """The default probe mode (plain attention for the output, role_mass on AGTO's query rows) and the fused
    kernel (output and every row's masses) are the same computation: fp32 bounds as across layouts."""
    single, _, _ = layouts
    probe, fused = single[(1, 1, ())], single[(1, 1, ("model.mass_mode=fused",))]
    for step, tolerance in ((0, 1e-5), (1, 1e-4)):
        for name in COMPARED:
            assert probe[step][name] == pytest.approx(fused[step][name], rel=tolerance), (step, name)
