"""The one way to build this rank's stage of Qwen2.5-VL on megatron: training (SFT, the GRPO policy and its
reference), `avar convert` (both directions, `verify`) and `avar vas` on a megatron checkpoint all call
:func:`build_stage`, after :func:`init_model_parallel` (training through ``init_distributed``).

    init_model_parallel(tp, pp, seed=0)
    model = build_stage(config, tp=tp, pp=pp, dtype=torch.bfloat16, role_mass_layers=(14, 15))

Precision: every parameter is ``dtype``, norms included, with Transformer Engine's modules and with megatron's
local ones alike (megatron's mixed-precision optimizers expect it); loading HF weights casts to the parameter's
dtype (conversion builds in the checkpoint's dtype: no value is rounded).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

import torch

from megatron_avar import platform

__all__ = ["init_model_parallel", "build_stage"]


def init_model_parallel(tp: int, pp: int, *, seed: int, vpp: int = 1, cp: int = 1) -> None:
    """Make megatron usable here (``platform.prepare_megatron``), initialise its parallel state at TP x PP x CP
    (with ``vpp`` model chunks per pipeline rank) over the default process group (already initialised) and seed
    the RNGs weights are initialised with (megatron's CUDA / tensor-parallel streams and the host generator):
    ``seed + 100 * pipeline rank`` (megatron's own rule), so each pipeline stage draws its layers from its own
    stream instead of repeating the first stage's."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    platform.prepare_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                             context_parallel_size=cp)
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    # the host generator too: modules built on the host (the vision patch embedding, a torch Linear) draw from
    # it; megatron's seeding reaches it only through the CPU shim, so on GPUs it kept torch's start-up seed
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def build_stage(config, *, tp: int, pp: int, dtype: torch.dtype, role_mass_layers: Collection[int] = (),
                recompute: str = "none", sequence_parallel: bool = False, vpp: int = 1, vp_stage: int | None = None,
                cp: int = 1,
                initialize: bool = False, device: torch.device | None = None,
                hf_tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]] | None = None):
    """This rank's pipeline stage of Qwen2.5-VL (a ``Qwen25VLModel``, not wrapped in DDP) on megatron's
    process groups (``ProcessGroupCollection.use_mpu_process_groups``; :func:`init_model_parallel` first).

    config: ``Qwen25VLConfig``. tp, pp, cp: the parallel layout (must be megatron's current one). dtype: float32 or
    bfloat16 (module docstring). role_mass_layers: 0-based global decoder layers built as AVAR layers
    (``RoleMassCoreAttention``; per-role masses for the AVAR loss, the visual reward or VAS); every other layer
    has ``PlainCoreAttention`` (the same attention, no masses). recompute, sequence_parallel: as in
    ``MegatronSettings``. vpp, vp_stage: model chunks per pipeline rank and which of them to build (interleaved
    schedule; None without it). initialize: run megatron's weight initialisation (False when weights are loaded
    next: saves time). device: where the stage lives: a CUDA device has megatron allocate (and initialise) the
    parameters there (``MegatronSettings.init_device``), anything else builds on the host and moves the stage
    (None: it stays on the CPU, as conversion wants).
    hf_tensors: (HF name, read()) pairs to load after the move (``hf_mapping.load_hf_tensors``: each rank reads
    only its shard's tensors, cast to the parameter's dtype), e.g. ``models.hf_weights.iter_lazy_tensors(hf_dir)``.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_avar.models.qwen2_5_vl.config import MegatronSettings
    from megatron_avar.models.qwen2_5_vl.hf_mapping import load_hf_tensors
    from megatron_avar.models.qwen2_5_vl.model import Qwen25VLModel

    config.check_layout(tp=tp, pp=pp, vpp=vpp)  # a named error, not megatron's assertion in every rank
    settings = MegatronSettings(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=dtype,
                                perform_initialization=initialize, recompute=recompute,
                                init_device="cuda" if device is not None and device.type == "cuda" else "cpu",
                                sequence_parallel=sequence_parallel, virtual_pipeline_model_parallel_size=vpp,
                                context_parallel_size=cp)
    model = Qwen25VLModel(config, settings, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
                          pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                          post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                          role_mass_layers=role_mass_layers, vp_stage=vp_stage)
    if device is not None:
        model.to(device)
    if hf_tensors is not None:
        load_hf_tensors(model, hf_tensors, config, cast_to_model_dtype=True)
    return model
