"""Process groups, model, DDP, optimizer and schedule of a megatron training job (shared by SFT and GRPO).

Launch-agnostic: ranks come from torchrun (RANK / WORLD_SIZE / LOCAL_RANK), from `srun` alone (SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID, rendezvous in MASTER_ADDR / MASTER_PORT), or a single process with neither
(a batch script or salloc shell too: its SLURM_PROCID and SLURM_NTASKS describe the allocation, not a step).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from megatron_avar import platform

__all__ = ["RankLayout", "init_distributed", "build_model", "build_optimizer", "TrainingModel"]


@dataclass(frozen=True)
class RankLayout:
    """This process's place in the world: global rank, world size, local rank, tp/pp/dp/cp coordinates and the model
    chunks per pipeline rank. dp counts the data-parallel replicas (different data); the cp ranks of a replica
    share its rows, each holding part of every row."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    vpp: int = 1  # model chunks per pipeline rank (interleaved schedule)
    cp: int = 1
    cp_rank: int = 0

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def _env_int(*names: str | None) -> int | None:
    """The first of the environment variables ``names`` that is set, as an int >= 0; ValueError naming it when its
    value is not one."""
    for name in names:
        if name is not None and os.environ.get(name):
            value = os.environ[name]
            if not value.isdigit():
                raise ValueError(f"{name}={value!r} is not a rank number (an int >= 0); fix or unset {name} (the "
                                 "launcher sets it: torchrun, or srun's SLURM_* variables)")
            return int(value)
    return None


def init_distributed(tp: int, pp: int, *, seed: int, vpp: int = 1, cp: int = 1) -> RankLayout:
    """Initialise torch.distributed (if needed) and megatron's parallel state (``vpp`` model chunks per pipeline
    rank, ``cp`` context-parallel ranks); seed megatron's RNG tracker."""
    from megatron.core import parallel_state

    from megatron_avar.models.qwen2_5_vl.build import init_model_parallel

    platform.prepare_megatron()
    platform.tie_forked_children_to_this_process()  # nothing this rank forks outlives it
    if not dist.is_initialized():
        # srun's tasks: srun sets SLURM_STEP_NUM_TASKS; a batch script (or salloc shell) running one process
        # also has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, and must not wait for ranks nobody starts
        slurm = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID") if os.environ.get("SLURM_STEP_NUM_TASKS") \
            else (None, None, None)
        rank = _env_int("RANK", slurm[0])
        world = _env_int("WORLD_SIZE", slurm[1])
        local = _env_int("LOCAL_RANK", slurm[2])
        store = None  # None: torch's env:// rendezvous on MASTER_ADDR:MASTER_PORT
        if rank is None or world is None:
            rank, world, local = 0, 1, 0
        if world == 1:  # one process, alone or a one-task srun step (`srun -n1`, `srun --pty`): no rendezvous
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                # the OS picks the port while our store binds it: a port probed free and released could be taken
                # (another run's store, or any process's outgoing connection) before torch binds it
                store = dist.TCPStore(  # pyright: ignore[reportPrivateImportUsage]
                    "127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
                os.environ["MASTER_PORT"] = str(store.port)
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"{name} is not set: launch with torchrun, or export it before srun "
                                 "(see slurm/avar_sft_7b.sh)")
        port = os.environ["MASTER_PORT"]
        if not (port.isdigit() and int(port) < 65536):
            raise ValueError(f"MASTER_PORT={port!r} is not a port (0-65535): export another one before the launch")
        # torchrun's variables, whatever launched us: libraries that join this process group read them (vLLM's
        # external_launcher executor takes RANK and LOCAL_RANK from the environment; srun sets neither)
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local or 0)):
            os.environ[name] = str(value)
        platform.bind_device(local or 0)
        dist.init_process_group(platform.distributed_backend(), rank=rank, world_size=world, store=store)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not a multiple of tensor_model_parallel_size ({tp}) x "
                         f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}); change the parallel "
                         "layout or the number of ranks")
    init_model_parallel(tp, pp, seed=seed, vpp=vpp, cp=cp)
    return RankLayout(
        rank=dist.get_rank(), world_size=world, local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID") or 0, tp=tp,
        pp=pp, dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(), vpp=vpp, cp=cp,
        cp_rank=parallel_state.get_context_parallel_rank())


@dataclass
class TrainingModel:
    """This rank's model: its model chunks (``chunks``; one per virtual pipeline stage, a single one without the
    interleaved schedule), each a Qwen25VLModel (``modules``) wrapped in megatron's DistributedDataParallel when
    it trains (a frozen model's chunks are the modules themselves), the optimizer over all of them and the
    learning-rate schedule."""

    chunks: Sequence[torch.nn.Module]
    modules: Sequence[torch.nn.Module]
    optimizer: object = None
    scheduler: object = None

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for module in self.modules:
            yield from module.parameters()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def zero_grad_buffer(self) -> None:
        for chunk in self.chunks:
            cast(Any, chunk).zero_grad_buffer()  # a trained model's chunks are megatron DDP modules

    def train(self, mode: bool = True) -> None:
        for chunk in self.chunks:
            chunk.train(mode)

    def gather_updated_weights(self) -> None:
        """Collective over the data-parallel group: make this rank's weights the updated ones. Needed before the
        weights are read outside a forward pass (a checkpoint, a refit of the rollout engine) when the update's
        all-gather is overlapped with the next forward (``parallel.overlap_param_gather``); a no-op otherwise."""
        for chunk in self.chunks:
            if getattr(chunk, "use_forward_hook", False):  # a DDP chunk whose weight gather is overlapped
                cast(Any, chunk).start_param_sync(force_sync=True)

    def grad_bucket_layout(self) -> list[list[int]]:
        """Parameters per gradient bucket, per buffer of every chunk (the distributed optimizer's checkpointed
        state follows it; independent of the data-parallel size)."""
        # (megatron's DDP replaces Module.buffers() with its list of parameter-and-gradient buffers)
        buffers = [buffer for chunk in self.chunks
                   for buffer in [*getattr(chunk, "buffers"), *getattr(chunk, "expert_parallel_buffers")]]  # noqa: B009
        return [[sum(p.numel() for p in bucket.params) for bucket in buffer.buckets] for buffer in buffers]

    def schedule_inputs(self, items: Iterable) -> tuple[list, object]:
        """(model, data_iterator) for megatron's ``get_forward_backward_func``: the chunk list, and one iterator
        over ``items`` per chunk (the interleaved schedule runs every micro-batch through each chunk)."""
        items = list(items)
        iterators = [iter(items) for _ in self.chunks]
        return list(self.chunks), iterators if len(iterators) > 1 else iterators[0]


def build_model(qwen_config, parallel, *, dtype: torch.dtype, recompute: str, role_mass_layers,
                hf_path: str | None, trainable: bool = True, checkpoint_follows: bool = False) -> TrainingModel:
    """This pipeline rank's stage of Qwen2.5-VL with AVAR layers — one model chunk, or one per virtual pipeline
    stage (``models.qwen2_5_vl.build.build_stage``, on this rank's device) — with HF weights loaded (streamed,
    each rank reading only its shard) when ``hf_path`` is given, each chunk wrapped in megatron's
    DistributedDataParallel.

    parallel: the run's ``ParallelConfig`` (TP / PP / virtual stages / SP; the gradient reduce and weight gather
    it asks for are set up here, with the hooks megatron's pipeline schedules call). trainable=False (GRPO's
    frozen reference policy): no DDP wrapper and no gradients, so its memory is its weights alone.
    checkpoint_follows: a training checkpoint's weights are loaded right after (a resume): the parameters are
    allocated but not randomly initialised (megatron's host initialisation: 24 s of a 2-core CPU for 2.1 B
    parameters, and every rank of a 72B run draws its stage's); the load that follows is strict, so no parameter
    is left as allocated. Without it and without ``hf_path``: random weights."""
    from pathlib import Path

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_avar.models.hf_weights import iter_lazy_tensors
    from megatron_avar.models.qwen2_5_vl.build import build_stage

    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size
    # The run's precision decides: bf16 training from fp32 weights (or the reverse) casts on load.
    modules = [
        build_stage(qwen_config, tp=tp, pp=pp, dtype=dtype, role_mass_layers=role_mass_layers, recompute=recompute,
                    sequence_parallel=parallel.sequence_parallel, vpp=vpp, vp_stage=stage if vpp > 1 else None,
                    cp=parallel.context_parallel_size,
                    initialize=hf_path is None and not checkpoint_follows, device=platform.current_device(),
                    hf_tensors=None if hf_path is None else iter_lazy_tensors(Path(hf_path)))
        for stage in range(vpp)]
    if not trainable:
        for module in modules:
            module.requires_grad_(False)
        return TrainingModel(chunks=list(modules), modules=modules)
    overlap_grads = parallel.overlap_grad_reduce
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_grad_reduce=overlap_grads, overlap_param_gather=parallel.param_gather_overlapped,
        bucket_size=parallel.ddp_bucket_size)
    # As megatron's own training loop: chunks after the first keep one bucket each (their gradients are ready
    # only at the end of the interleaved schedule's backward passes).
    chunks = [DistributedDataParallel(module.config, ddp_config, module, disable_bucketing=index > 0)
              for index, module in enumerate(modules)]
    config = modules[0].config  # megatron's schedules read the first chunk's config
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grads:
        # megatron's schedules: no reduce before the last micro-batch's backward; with pipeline stages, each
        # chunk launches its remaining buckets as soon as its last backward is done.
        no_sync = [chunk.no_sync for chunk in chunks]
        grad_sync = [chunk.start_grad_sync for chunk in chunks]
        # (megatron types these as one callable; its schedules also take one per chunk)
        config.no_sync_func = cast(Any, no_sync if vpp > 1 else no_sync[0])
        config.grad_sync_func = cast(Any, grad_sync if vpp > 1 else grad_sync[0])
    return TrainingModel(chunks=chunks, modules=modules)


def build_optimizer(model: TrainingModel, optim, *, steps: int, dtype: torch.dtype, reschedule: bool = False):
    """AdamW (megatron's optimizer: fp32 main params for bf16, grad clipping, optional ZeRO-1) and a cosine
    schedule with linear warmup; set on ``model``. ``reschedule`` (checkpoint.reschedule): a resumed scheduler
    state keeps only its step count, the schedule is this one."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                             adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                             bf16=dtype == torch.bfloat16, params_dtype=dtype, clip_grad=optim.clip_grad,
                             use_distributed_optimizer=cast(Any, model.chunks[0]).ddp_config.use_distributed_optimizer)
    model.optimizer = get_megatron_optimizer(config, cast(Any, model.chunks))
    model.scheduler = OptimizerParamScheduler(
        model.optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(steps, optim.warmup_steps + 1),
        lr_decay_style="cosine", start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not reschedule, override_opt_param_scheduler=reschedule)
    return model
