"""A stage built for a CUDA device has megatron allocate and initialise its parameters on the GPU
(``MegatronSettings.init_device="cuda"``): every parameter lands there, finite, with the spread of the host's
initialisation (the same init methods, other random streams), and the built config says megatron took that
path. The host path stays the default everywhere else (conversion relies on staying off the GPU). On a CPU
machine megatron's GPU path runs with its device pointed at the host (``platform.prepare_megatron``), so CI
checks the setting's initialisation too.

Tolerance on each weight's standard deviation: 15% relative. The smallest weight here has 1,024 entries, whose
sample standard deviation varies by ~1/sqrt(2n) = 2.2%; a wrong init method (the output projections' 1/sqrt(2L)
scaling missing: 0.02 instead of 0.008, or zeros) is off by 60% or more.
"""

import pytest
import torch

from megatron_avar.testing import run_on_ranks
from qwen_vl_cases import tiny_hf_config

pytestmark = pytest.mark.multiprocess


def _stats(model) -> dict:
    params = dict(model.named_parameters())
    return {"cpu_initialization": model.config.use_cpu_initialization,  # the path megatron took
            "devices": sorted({p.device.type for p in params.values()}),
            "finite": all(bool(torch.isfinite(p).all()) for p in params.values()),
            "std": {name: float(p.std()) for name, p in params.items() if p.dim() >= 2},
            "split_marks": sorted(name for name, p in params.items() if getattr(p, "tensor_model_parallel", False))}


def _assert_same_spread(host: dict, other: dict) -> None:
    assert host["finite"] and other["finite"]
    assert host["std"].keys() == other["std"].keys() and host["split_marks"] == other["split_marks"]
    for name, spread in host["std"].items():
        assert other["std"][name] == pytest.approx(spread, rel=0.15), name


def _host_and_gpu_path_on_the_host():
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_avar.models.qwen2_5_vl import MegatronSettings, Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import init_model_parallel
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    init_model_parallel(1, 1, seed=5)
    config = Qwen25VLConfig.from_hf(tiny_hf_config().to_dict())
    built = {}
    for init_device in ("cpu", "cuda"):
        built[init_device] = _stats(Qwen25VLModel(config, MegatronSettings(init_device=init_device),
                                                  pg_collection=ProcessGroupCollection.use_mpu_process_groups()))
    return built


def test_megatrons_gpu_initialisation_path_gives_the_host_paths_spread():
    """megatron allocates at torch.cuda.current_device(), which the platform's CPU shim points at the host."""
    built = run_on_ranks(_host_and_gpu_path_on_the_host, 1, timeout_s=300)[0]
    assert built["cpu"]["cpu_initialization"] and not built["cuda"]["cpu_initialization"]
    _assert_same_spread(built["cpu"], built["cuda"])


def _built_on_each_device():
    from megatron_avar import platform
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel

    init_model_parallel(1, 1, seed=5)
    config = Qwen25VLConfig.from_hf(tiny_hf_config().to_dict())
    found = {}
    for device in (torch.device("cpu"), platform.current_device()):
        found[device.type] = _stats(build_stage(config, tp=1, pp=1, dtype=torch.float32, initialize=True,
                                                device=device))
    return found


@pytest.mark.gpu
def test_a_stage_built_for_the_gpu_is_initialised_there_like_the_host_one():
    found = run_on_ranks(_built_on_each_device, 1, timeout_s=300)[0]
    assert found["cpu"]["devices"] == ["cpu"] and found["cuda"]["devices"] == ["cuda"]
    # build_stage chose megatron's GPU path for the CUDA device (moving a host-built stage would pass the rest)
    assert found["cpu"]["cpu_initialization"] and not found["cuda"]["cpu_initialization"]
    _assert_same_spread(found["cpu"], found["cuda"])


def _initialised_by_the_training_builder() -> dict[str, bool]:
    from megatron.core import parallel_state

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.config import ParallelConfig
    from megatron_avar.training.megatron_setup import build_model, init_distributed

    init_distributed(1, 1, seed=5)
    config = Qwen25VLConfig.from_hf(tiny_hf_config().to_dict())
    found = {}
    for case, follows in (("new run", False), ("resume", True)):
        model = build_model(config, ParallelConfig(), dtype=torch.float32, recompute="none", role_mass_layers=(),
                            hf_path=None, checkpoint_follows=follows)
        found[case] = model.modules[0].config.perform_initialization
    parallel_state.destroy_model_parallel()
    return found


def test_a_resume_builds_its_model_without_drawing_weights_the_checkpoint_replaces():
    """The trainers' resume (``build_model(checkpoint_follows=True)``) skips megatron's random initialisation;
    that the strict load then fills every parameter is what the resume tests (tests/faults, tests/sft) prove by
    reproducing the uninterrupted loss curve, also in bf16 at the second step after the resume."""
    found = run_on_ranks(_initialised_by_the_training_builder, 1, timeout_s=300)[0]
    assert found == {"new run": True, "resume": False}


def _first_layer_of_this_stage():
    from megatron.core import parallel_state

    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.models.qwen2_5_vl.build import build_stage, init_model_parallel

    init_model_parallel(1, 4, seed=5)
    config = Qwen25VLConfig.from_hf(tiny_hf_config(num_text_layers=4).to_dict())
    model = build_stage(config, tp=1, pp=4, dtype=torch.float32, initialize=True)
    return parallel_state.get_pipeline_model_parallel_rank(), model.language_model.decoder.layers[0].state_dict()


def test_each_pipeline_stage_initialises_its_layers_from_its_own_stream():
    """Megatron's rule (seed + 100 x pipeline rank). The middle stages build the same modules in the same order
    (a decoder layer each, no vision encoder, no embedding, no head): from one seed they were copies."""
    layers = dict(run_on_ranks(_first_layer_of_this_stage, 4, timeout_s=300))
    assert sorted(layers) == [0, 1, 2, 3]
    weights = [name for name, w in layers[1].items() if w is not None and w.dim() >= 2]
    assert weights and layers[1].keys() == layers[2].keys()
    for name in weights:
        assert not torch.equal(layers[1][name], layers[2][name]), name
