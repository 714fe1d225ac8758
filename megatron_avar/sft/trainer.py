"""`avar sft`: AVAR cold-start SFT on megatron-core (L = L_LM + α·L_enh + β·L_sup; docs/method.md, 'AGTO objective').

One optimizer step = megatron's forward/backward schedule (1F1B under pipeline parallelism) over this rank's
micro-batches of packed rows, then the optimizer. Losses are normalised by counts over the whole global batch
(loss tokens for L_LM, eligible samples for AGTO, both known before the step), so a step's loss and gradients
do not depend on the TP/PP/DP layout or the micro-batch split; see ``training.objective``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_avar import console, platform
from megatron_avar.models.context_parallel import local_positions
from megatron_avar.processor import check_processor_fits_model
from megatron_avar.roles import TokenRole, labelled_positions
from megatron_avar.segments import attention_sink_mask
from megatron_avar.sft.config import RESUME_FIXED, SFTConfig
from megatron_avar.training.objective import LAYER_METRICS, AGTOSink, QuerySets
from megatron_avar.training.run_loop import check_run_inputs

if TYPE_CHECKING:  # built lazily (build_run): importing this module loads no megatron
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.megatron_setup import TrainingModel
    from megatron_avar.training.sft_data import SFTDataLoader

__all__ = ["run_sft", "train_step", "build_run", "SFTRun"]


SERIAL_RENDERING_NOTE = ("data.num_workers=0: every step's rows are rendered (images decoded and resized) in the "
                         "training process while the GPU waits; set data.num_workers (2-8) to render them ahead")


def _sink_key_roles(roles: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Key roles with each sample's attention sink (``segments.attention_sink_mask``) moved out of SYSTEM (to
    TEMPLATE)."""
    return torch.where(attention_sink_mask(roles, segment_ids), int(TokenRole.TEMPLATE), roles)


def _to_device(batch, device):
    """``batch`` with its tensor fields on ``device`` (asynchronous from the loader's pinned memory), but the image
    grids (the vision encoder plans its work from them on the host, where reading them costs no wait) and the
    pixels: the model's first pipeline stage copies each micro-batch's as it starts, so the step's pixels are never
    all on the device at once (~150 MB per 16k-token half-image row) and later stages never receive them."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                                         for f in dataclasses.fields(batch)
                                         if f.name not in ("image_grid_thw", "pixel_values")
                                         and isinstance(getattr(batch, f.name), torch.Tensor)})


def train_step(model, step_batch, config: SFTConfig, *, avar_layers: tuple[int, ...], layout) -> dict[str, float]:
    """One optimizer step on this rank's micro-batches; returns world-reduced metrics (on every rank)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = model.device
    # Query sets and loss rows from the loader's host tensors, before the copy to the device (no round trip back).
    sets = [QuerySets(mb.roles, mb.segment_ids, exclude_sink=config.avar.exclude_sink)
            for mb in step_batch.microbatches]
    rows = step_batch.microbatches[0].input_ids.shape
    held = None if layout.cp == 1 else local_positions(rows[1], layout.cp, layout.cp_rank, torch.device("cpu"))
    loss_rows = [labelled_positions(mb.labels, held).to(device, non_blocking=True) for mb in step_batch.microbatches]
    microbatches = [_to_device(mb, device) for mb in step_batch.microbatches]
    eligible = torch.tensor([float(sum(s.num_eligible for s in sets))], device=device)
    sets = [s.to(device) for s in sets]
    dist.all_reduce(eligible, group=parallel_state.get_data_parallel_group())
    num_eligible, num_loss_tokens = int(eligible.item()), step_batch.num_loss_tokens
    if num_loss_tokens == 0:
        raise ValueError(f"step {step_batch.step}: the global batch has no loss (RESPONSE) tokens")
    num_microbatches, dp = len(microbatches), layout.dp
    loss_scale = 1.0  # bf16 / fp32: megatron applies no loss scale (fp16 is not offered)
    # Under context parallelism the model returns the losses of this rank's labelled tokens (every rank of the CP
    # group trains the same rows); megatron's schedule multiplies the loss by cp and DDP averages over dp x cp.
    # The AGTO term is computed whole on every CP rank, each rank's gradient reaching its own tokens only
    # (models.context_parallel), so it needs the dp x cp factor itself.
    sinks, lm_sums, lm_sample_ids = [], [], []

    def forward_step(data_iterator, ddp_model):
        index, mb = next(data_iterator)
        sink = AGTOSink(sets[index], config.avar, num_layers=len(avar_layers),
                        weight=1.0 / num_eligible if num_eligible else 0.0, grad_scale=dp * layout.cp * loss_scale)
        sinks.append(sink)
        key_roles = _sink_key_roles(mb.roles, mb.segment_ids) if config.avar.exclude_sink else mb.roles
        output = ddp_model(mb.input_ids, position_ids=mb.position_ids, pixel_values=mb.pixel_values,
                           image_grid_thw=mb.image_grid_thw, labels=mb.labels, token_roles=key_roles,
                           segment_ids=mb.segment_ids, mass_sink=sink if avar_layers else None,
                           role_attention_impl=config.model.role_attention_impl, mass_mode=config.model.mass_mode,
                           output_rows=loss_rows[index])

        def loss_func(row_losses):  # [N]: the loss of each labelled position this rank holds
            lm_sum = row_losses.float().sum()
            # Not checked here (a read of the device per micro-batch) nor raised on this rank alone (the others
            # would wait in a collective): read once after the schedule, and _check_update stops every rank
            # together, naming the samples.
            lm_sums.append(lm_sum.detach())
            lm_sample_ids.append([sample for row in mb.sample_ids for sample in row])
            # megatron divides by num_microbatches (and multiplies by cp) and DDP averages over DP (x CP); undo
            # both: the global batch's token mean.
            return lm_sum * (num_microbatches * dp / num_loss_tokens), {"lm_sum": lm_sum.detach()}

        return output, loss_func

    model.zero_grad_buffer()
    model.optimizer.zero_grad()
    chunks, data_iterator = model.schedule_inputs(enumerate(microbatches))
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=rows[1], micro_batch_size=rows[0], forward_only=False)
    finite = torch.isfinite(torch.stack(lm_sums)).tolist() if lm_sums else []  # the last stage's losses, read once
    nonfinite_lm = [sample for ok, ids in zip(finite, lm_sample_ids) if not ok for sample in ids]
    update_ok, grad_norm, _ = model.optimizer.step()
    lr = model.optimizer.param_groups[0]["lr"]  # the rate this update used, before the schedule moves on
    if update_ok:
        model.scheduler.step(increment=1)
    metrics = _reduce_metrics(sinks, lm_sums, avar_layers, num_eligible, num_loss_tokens, grad_norm, lr, layout,
                              device)
    _check_update(model, metrics, step_batch, update_ok=update_ok, grad_norm=grad_norm, nonfinite_lm=nonfinite_lm)
    return metrics


def _check_update(model, metrics: dict[str, float], step_batch, *, update_ok: bool, grad_norm,
                  nonfinite_lm: list[str]) -> None:
    """Collective: raise NonFiniteUpdateError on every rank when the step's LM loss, AGTO terms, gradient norm
    or updated weights are not finite (the same verdict everywhere: the values are world-reduced), naming the
    step and its samples over all data-parallel ranks. The run loop then stops before logging or saving."""
    from megatron.core import parallel_state

    from megatron_avar.training.run_loop import NonFiniteUpdateError, nonfinite_update

    checked = {name: value for name, value in metrics.items()
               if name.startswith(("loss/", "avar/")) and "/layer_" not in name}
    if grad_norm is not None:  # None: the optimizer did not compute it (no clipping)
        checked["optim/grad_norm"] = float(grad_norm)
    problems = nonfinite_update(model, checked)
    if not update_ok:
        problems.insert(0, "the optimizer skipped the update (non-finite gradients)")
    if not problems:
        return
    mine = ([sample for mb in step_batch.microbatches for row in mb.sample_ids for sample in row], nonfinite_lm)
    gathered: list = [None] * parallel_state.get_data_parallel_world_size()  # each rank's ``mine``
    dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    samples = [sample for ids, _ in gathered for sample in ids]
    bad = [sample for _, ids in gathered for sample in ids]
    shown = ", ".join(map(str, samples[:64])) + (f", ... ({len(samples)} in all)" if len(samples) > 64 else "")
    lm_note = f"; the LM loss is not finite in samples {', '.join(map(str, bad[:64]))}" if bad else ""
    raise NonFiniteUpdateError(
        f"step {step_batch.step}: the update is not finite ({'; '.join(problems)}){lm_note}. Samples of this step: "
        f"{shown}. Lower optim.lr (or avar.alpha / avar.beta), or inspect these samples")


def _reduce_metrics(sinks, lm_sums, avar_layers, num_eligible, num_loss_tokens, grad_norm, lr, layout, device):
    from megatron.core import parallel_state

    num_metrics = len(LAYER_METRICS)
    layer_sums = torch.zeros(len(avar_layers), num_metrics, dtype=torch.float64, device=device)
    position = {layer: k for k, layer in enumerate(avar_layers)}
    for sink in sinks if layout.cp_rank == 0 else ():  # every CP rank's sinks see the same (whole-row) masses
        for layer, sums in sink.layer_sums.items():
            layer_sums[position[layer]] += sums
    lm_sum = torch.zeros(1, dtype=torch.float64, device=device)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        for s in lm_sums:
            lm_sum += s.double()
    packed = torch.cat([layer_sums.reshape(-1), lm_sum])
    dist.all_reduce(packed)  # layers (PP), head shares (TP), samples (DP), tokens (CP): each counted exactly once
    layer_sums, lm_total = packed[:-1].reshape(len(avar_layers), num_metrics).cpu(), float(packed[-1])
    per_layer = layer_sums / max(num_eligible, 1)
    metrics = {"loss/lm": lm_total / num_loss_tokens, "optim/lr": lr,
               "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "data/samples_with_agto_term": float(num_eligible)}
    if num_eligible and avar_layers:  # no AVAR layers (plain SFT): no AVAR metrics, rather than NaN means
        for k, name in enumerate(LAYER_METRICS):
            metrics[f"avar/{name}"] = float(per_layer[:, k].mean())
            for layer, value in zip(avar_layers, per_layer[:, k].tolist()):
                metrics[f"avar/layer_{layer:02d}/{name}"] = value
    return metrics


@dataclasses.dataclass
class SFTRun:
    """Everything a rank trains with: the model (DDP, optimizer, schedule), its data loader, and the facts
    the loop needs."""

    model: TrainingModel
    data: SFTDataLoader
    qwen_config: Qwen25VLConfig
    avar_layers: tuple[int, ...]
    dtype: torch.dtype


def build_run(config: SFTConfig, layout, *, load_hf_weights: bool = True) -> SFTRun:
    """Build this rank's model (HF weights streamed in unless resuming), optimizer, schedule and data loader."""
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig
    from megatron_avar.training.megatron_setup import build_model, build_optimizer
    from megatron_avar.training.sft_data import SFTDataLoader

    vpp, pp = config.parallel.virtual_pipeline_model_parallel_size, layout.pp
    microbatches = config.train.global_batch_size // layout.dp // config.data.micro_batch_size
    if vpp > 1 and microbatches % pp:
        raise ValueError(f"the interleaved pipeline schedule (parallel.virtual_pipeline_model_parallel_size={vpp}) "
                         f"runs micro-batches in groups of pipeline_model_parallel_size={pp}, but a step has "
                         f"{microbatches} per data-parallel rank (train.global_batch_size / DP / "
                         f"data.micro_batch_size): make it a multiple of {pp}")
    qwen_config = Qwen25VLConfig.from_hf(config.model.hf_path)
    avar_layers = config.avar.layer_indexes(qwen_config.text.num_layers)
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float32
    model = build_model(qwen_config, config.parallel, dtype=dtype, recompute=config.train.recompute,
                        role_mass_layers=avar_layers, hf_path=config.model.hf_path if load_hf_weights else None,
                        checkpoint_follows=not load_hf_weights)
    build_optimizer(model, config.optim, steps=config.train.steps, dtype=dtype,
                    reschedule=config.checkpoint.reschedule)
    data_config = config.data
    if data_config.processor_path is None:
        data_config = dataclasses.replace(data_config, processor_path=config.model.hf_path)
    data = SFTDataLoader(data_config, global_batch_size=config.train.global_batch_size, dp_rank=layout.dp_rank,
                         dp_size=layout.dp)
    if data_config.num_workers == 0 and model.device.type == "cuda":
        console.note_once(SERIAL_RENDERING_NOTE)
    check_processor_fits_model(data.processor, qwen_config)
    return SFTRun(model=model, data=data, qwen_config=qwen_config, avar_layers=avar_layers, dtype=dtype)


def global_step_flops(step_batch, qwen_config, *, device) -> float:
    """Training FLOPs of a step's global batch (``training.metrics.training_flops`` of this rank's samples and
    image patches, summed over the data-parallel ranks: they train as many rows each, not as many tokens)."""
    from megatron.core import parallel_state

    from megatron_avar.training.metrics import batch_flops

    flops = torch.tensor([batch_flops(qwen_config, step_batch)], dtype=torch.float64, device=device)
    dist.all_reduce(flops, group=parallel_state.get_data_parallel_group())
    return float(flops)


def run_sft(config: SFTConfig) -> dict:
    """Train per ``config`` (collective over all ranks); returns the run summary (also <out>/summary.json)."""
    check_run_inputs(config)  # before any process group or run directory exists
    from megatron_avar.training import checkpointing
    from megatron_avar.training.megatron_setup import init_distributed
    from megatron_avar.training.run_loop import holding_run

    # First: a SIGTERM / SIGUSR1 during the minutes of start-up (model build, weight loading) must not kill the
    # ranks; it is honoured after the first step.
    preemption = checkpointing.PreemptionFlag()
    parallel = config.parallel
    layout = init_distributed(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                              seed=config.train.seed, vpp=parallel.virtual_pipeline_model_parallel_size,
                              cp=parallel.context_parallel_size)
    # Resume, refuse, or do nothing (a finished run) — decided before anything is written (run_loop.plan_start).
    with holding_run(config, RESUME_FIXED, layout=layout) as (start, schedule):
        return _train(config, layout, start, schedule, preemption)


def _train(config: SFTConfig, layout, start, schedule: dict, preemption) -> dict:
    """:func:`run_sft` once its run directory is locked and its start decided (``run_loop.holding_run``)."""
    from megatron.core import parallel_state

    from megatron_avar.config import config_to_dict
    from megatron_avar.training.metrics import MetricsLogger
    from megatron_avar.training.run_loop import (
        enter_run_dir,
        finished_run_summary,
        hf_export_describer,
        resume_checkpoint,
        run_steps,
    )

    out = Path(config.out)
    if start.finished:
        parallel_state.destroy_model_parallel()
        return finished_run_summary(out, start, steps=config.train.steps, announce=layout.is_logging_rank)
    resume_from = start.resume_from
    run = build_run(config, layout, load_hf_weights=resume_from is None)
    model, data, qwen_config, avar_layers, dtype = run.model, run.data, run.qwen_config, run.avar_layers, run.dtype
    start_step = start.start_step
    if resume_from is not None:
        resume_checkpoint(config, start, model, data, layout=layout)
    enter_run_dir(config, start, layout=layout)  # every refusal passed

    describe = hf_export_describer(config.model.hf_path, tokenizer=data.processor.tokenizer, layout=layout,
                                   dtype=dtype, source=f"avar sft {config.out}")
    logger = MetricsLogger(out, total_steps=config.train.steps, enabled=layout.is_logging_rank,
                           tensorboard=config.log.tensorboard, wandb_project=config.log.wandb_project,
                           run_config=config_to_dict(config), first_step=start_step)
    batches = iter(data)

    def step_fn(step: int) -> dict[str, float]:
        # agreed: a rank whose rows fail to render (an image unreadable past its header) stops every rank, which
        # would otherwise wait for it in the step's collectives
        step_batch = platform.agreed(lambda: next(batches), f"step {step}: rendering this step's rows")
        started = time.monotonic()
        metrics = train_step(model, step_batch, config, avar_layers=avar_layers, layout=layout)
        seconds = time.monotonic() - started
        flops = global_step_flops(step_batch, qwen_config, device=model.device)
        metrics.update({"perf/step_seconds": seconds,
                        "perf/tokens_per_second": step_batch.num_real_tokens / seconds,
                        "perf/tflops_per_gpu": flops / seconds / layout.world_size / 1e12,
                        "data/epoch": float(step_batch.epoch)})
        return metrics

    with logger:
        summary = run_steps(step_fn, start_step=start_step, steps=config.train.steps, run_dir=out, model=model,
                            data=data, layout=layout, logger=logger, preemption=preemption,
                            log_interval=config.log.interval, checkpoint=config.checkpoint, describe=describe,
                            history_filter=lambda name: "/layer_" not in name, schedule=schedule,
                            summary_fields=lambda: {"packing_efficiency": data.packing_efficiency()})
    parallel_state.destroy_model_parallel()
    return summary
