"""Training metrics: the FLOP count behind TFLOP/s, and the logger (console line, metrics.jsonl, TensorBoard,
optional W&B). Only the logging rank writes; every number it gets is already reduced over the world."""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["matmul_params", "training_flops", "batch_flops", "frame_patches", "sample_lengths", "peak_memory_gb",
           "MetricsLogger"]


def matmul_params(qwen_config) -> tuple[int, int]:
    """Matmul weights each token passes through, (language model per text token, vision tower per patch), from
    the architecture alone.

    Language model per layer: q and o projections (h x Hq·d each), k and v (h x Hkv·d each), SwiGLU
    (3 x h x ffn); plus the output layer (V x h, also when tied). Vision per block: qkv + proj (4 x hv²),
    SwiGLU (3 x hv x ffn_v); the patch embedding (C·t·p² x hv); the 2x2 merger MLP ((4hv)² + 4hv x h) runs on
    the merged tokens, one per merge² patches, so a patch passes through a quarter of it.
    """
    text, vision = qwen_config.text, qwen_config.vision
    head_dim = text.hidden_size // text.num_attention_heads
    per_layer = (2 * text.hidden_size * text.num_attention_heads * head_dim
                 + 2 * text.hidden_size * text.num_query_groups * head_dim
                 + 3 * text.hidden_size * text.ffn_hidden_size)
    lm = text.num_layers * per_layer + text.vocab_size * text.hidden_size
    unit = vision.spatial_merge_size ** 2
    hv, merged = vision.hidden_size, vision.hidden_size * unit
    per_block = 4 * hv * hv + 3 * hv * vision.intermediate_size
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * hv
    merger = (merged * merged + merged * vision.out_hidden_size) // unit
    return lm, vision.depth * per_block + patch + merger


def frame_patches(image_grid_thw) -> list[int]:
    """The patches of each frame, h·w, of the images of ``image_grid_thw`` [num_images, 3] (an image has one frame):
    the units the vision tower's full attention runs over."""
    return [h * w for t, h, w in image_grid_thw.tolist() for _ in range(t)]


def training_flops(qwen_config, *, sample_lengths: list[int], image_patches: list[int],
                   output_tokens: int | None = None) -> float:
    """Model FLOPs of one forward + backward pass over a global batch (the usual 3x forward count).

        6 · (P_lm - V·h) · T         dense matmuls of the decoder layers (T = real tokens, packing: no padding)
      + 6 · V·h · T_out              the output layer over the T_out tokens whose logits are computed: the labelled
                                     ones (the trainers' ``output_rows``; None: T_out = T)
      + 6 · L · d · Σ_i s_i²         causal attention scores and values: 2 matmuls x 2 FLOP x s²/2 per layer,
                                     forward x 3 for backward (s_i = length of packed sample i)
      + 6 · P_vision · Σ_j p_j       dense matmuls of the vision tower (p_j = patches of image frame j,
                                     :func:`frame_patches`)
      + 12 · hv · F · Σ_j p_j²       the F full-attention vision blocks (``fullatt_block_indexes``): scores and
                                     values over each whole frame, 2 matmuls x 2 FLOP x p², not causal, x 3
    with P_lm, P_vision from :func:`matmul_params` (embedding lookups are not matmuls). The windowed vision
    blocks' attention (windows of at most (window_size / patch_size)² patches: about 1% of a block's matmuls at
    Qwen2.5-VL's widths) is not counted.
    """
    lm_params, vision_params = matmul_params(qwen_config)
    text, vision = qwen_config.text, qwen_config.vision
    tokens = sum(sample_lengths)
    head = text.vocab_size * text.hidden_size
    output_tokens = tokens if output_tokens is None else output_tokens
    attention = 6 * text.num_layers * text.hidden_size * sum(s * s for s in sample_lengths)
    full_blocks = len(vision.fullatt_block_indexes)
    vision_attention = 12 * vision.hidden_size * full_blocks * sum(p * p for p in image_patches)
    return (6.0 * (lm_params - head) * tokens + 6.0 * head * output_tokens + attention
            + 6.0 * vision_params * sum(image_patches) + vision_attention)


def batch_flops(qwen_config, step_batch) -> float:
    """:func:`training_flops` of a step's batch of packed rows (``training.sft_data``'s StepBatch: its micro-batches'
    cu_seqlens give the samples, their image_grid_thw the images, their labels the output layer's tokens)."""
    from megatron_avar.roles import IGNORE_INDEX

    patches = [p for mb in step_batch.microbatches if mb.image_grid_thw is not None
               for p in frame_patches(mb.image_grid_thw)]
    labelled = sum(int((mb.labels != IGNORE_INDEX).sum()) for mb in step_batch.microbatches)
    return training_flops(qwen_config, sample_lengths=sample_lengths(step_batch), image_patches=patches,
                          output_tokens=labelled)


def sample_lengths(step_batch) -> list[int]:
    """The length of every packed sample of a step's batch (its micro-batches' cu_seqlens)."""
    return [int(b - a) for mb in step_batch.microbatches for cu in mb.cu_seqlens
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


def peak_memory_gb() -> float:
    """The largest per-rank peak memory over the world, in GB (1e9 bytes); see platform.peak_memory_bytes.
    Collective over the default group."""
    import torch
    import torch.distributed as dist

    from megatron_avar import platform

    peak = torch.tensor([float(platform.peak_memory_bytes())], device=platform.current_device())
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 1e9


class MetricsLogger:
    """Writes each step's metrics: a console line with ETA, <out>/metrics.jsonl, TensorBoard, W&B.
    ``first_step``: the step this run starts at; a resumed run's TensorBoard writer purges the events of that
    step and later that the interrupted run had written (those steps run again), so no step shows twice."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, enabled: bool, tensorboard: bool,
                 wandb_project: str | None, run_config: dict, first_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_time, self.start_step = time.monotonic(), None
        self.writer = self.wandb = None
        if not enabled:
            return
        out = Path(out_dir)
        self.jsonl = (out / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge events from first_step on (0 too: a run that died before its first checkpoint starts over)
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_step)
        if wandb_project:  # (installed: run_loop.check_run_inputs checked before the run started)
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(out), config=run_config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step, time.monotonic()
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        # the clock starts when the first step is logged (its time holds the start-up): the steps timed are those
        # logged since, and the first line has no estimate yet
        timed = step - self.start_step
        eta = "-"
        if timed > 0:
            seconds = int((time.monotonic() - self.start_time) / timed * (self.total_steps - step - 1))
            eta = f"{seconds // 60}m{seconds % 60:02d}s"
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "/layer_" not in k)
        print(f"step {step + 1}/{self.total_steps} | {shown} | eta {eta}", flush=True)

    def close(self, *, failed: bool = False) -> None:
        """Close every sink; ``failed``: the run ends on an error (W&B marks it failed, not finished)."""
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else 0)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.close(failed=error_type is not None)
