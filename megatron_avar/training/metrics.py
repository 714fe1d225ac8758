"""Training metrics: the FLOP count behind TFLOP/s, and the logger (console line, metrics.jsonl, TensorBoard,
optional W&B). Only the logging rank writes; every number it gets is already reduced over the world.

One W&B run per training run: the first segment of a run (a start of ``avar sft`` / ``avar grpo`` that resumes no
checkpoint) records the id of its W&B run in ``<out>/wandb_run.json``; every later segment that resumes a
checkpoint of it (a Slurm requeue after a preemption, a resume by hand) continues that W&B run
(``wandb.init(id=..., resume="allow")``). A start that resumes nothing is a new run, with a new W&B run
(``run_loop.prepare_run_dir`` removes the record), so a run never logs into the values of an attempt it does not
continue. A resumed segment
runs again the steps between its checkpoint and the interruption; TensorBoard purges them and metrics.jsonl is
trimmed, but a W&B run only appends: it holds each step the interrupted segment logged with that segment's values,
and this logger sends W&B only the steps after the last one it holds (W&B would drop the others with a warning
each). A resume reproduces the loss curve, so the values agree, the timings aside. W&B's rewind
(``resume_from="<id>?_step=N"``), which would cut the history back to the resumed step, is not used: it is a
private preview that W&B support enables per account, and forking, which W&B recommends instead, makes a new run.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from pathlib import Path

from megatron_avar import atomic_files

__all__ = ["matmul_params", "training_flops", "batch_flops", "frame_patches", "sample_lengths", "peak_memory_gb",
           "MetricsLogger", "WANDB_RUN_FILE", "recorded_wandb_run"]

WANDB_RUN_FILE = "wandb_run.json"
_WANDB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # W&B run ids (ours: 8 of [a-z0-9], as W&B makes its own)


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
                   output_tokens: int | None = None, copies: int = 1) -> float:
    """Model FLOPs of one forward + backward pass over a global batch (the usual 3x forward count); ``copies``: the
    batch is that many copies of ``sample_lengths`` and ``image_patches`` (a plan's alike samples, without lists of
    billions of items: every sum below is an exact integer, so the result is the same float).

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
    tokens = copies * sum(sample_lengths)
    head = text.vocab_size * text.hidden_size
    output_tokens = tokens if output_tokens is None else output_tokens
    attention = 6 * text.num_layers * text.hidden_size * (copies * sum(s * s for s in sample_lengths))
    full_blocks = len(vision.fullatt_block_indexes)
    vision_attention = 12 * vision.hidden_size * full_blocks * (copies * sum(p * p for p in image_patches))
    return (6.0 * (lm_params - head) * tokens + 6.0 * head * output_tokens + attention
            + 6.0 * vision_params * (copies * sum(image_patches)) + vision_attention)


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


def recorded_wandb_run(out: str | Path, project: str) -> str | None:
    """The id of the W&B run that ``out``'s earlier segments logged to (module docstring), from
    <out>/wandb_run.json; None when there is none (the first segment). Reads only. ValueError, one line naming
    the file and the way out, when the file is damaged or records a run of another project than ``project``."""
    path = Path(out) / WANDB_RUN_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ValueError(f"{path} (the W&B run of this run's earlier segments) is unreadable ({error}): make it "
                         "readable, or delete it to log from here on to a new W&B run") from None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("project"), str)
            and isinstance(record.get("id"), str) and _WANDB_ID.fullmatch(record["id"])):
        raise ValueError(f"{path} is damaged: it records the W&B run of this run's earlier segments as "
                         '{"id": "<run id>", "project": "<project>"}, and holds ' f"{text[:80]!r}. Write that back "
                         "(the run id ends the run's W&B address), or delete it to log from here on to a new W&B "
                         "run")
    if record["project"] != project:
        raise ValueError(f"{path} records W&B run {record['id']} of project {record['project']!r}, but "
                         f"log.wandb_project={project!r}: every segment of a run logs to one W&B run. Set "
                         f"log.wandb_project={record['project']} to continue it, or delete {path} to log from here "
                         f"on to a new W&B run in {project!r}")
    return record["id"]


def _start_wandb(out: Path, project: str, run_id: str | None, run_config: dict, first_step: int):
    """The W&B run of this training run (module docstring; ``run_id``: :func:`recorded_wandb_run`), and the first
    step it takes: W&B's ``starting_step`` (0 for a new run, the step after the last one it holds for a continued
    one)."""
    import wandb

    if run_id is None:  # recorded before W&B is reached: a segment killed during init continues the same id
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        atomic_files.write_json(out / WANDB_RUN_FILE, {"id": run_id, "project": project})
    # "allow": continue the run when W&B has it, else create it under this id (an earlier segment that never
    # reached W&B, e.g. killed during its init); "must" would refuse the latter
    run = wandb.init(project=project, dir=str(out), config=run_config, id=run_id, resume="allow")
    # not a number: the placeholder run older wandb versions return under WANDB_MODE=disabled (it logs nothing)
    starting_step = run.starting_step if isinstance(run.starting_step, int) else 0
    if first_step < starting_step:
        print(f"W&B run {run_id} already holds steps {first_step}-{starting_step - 1}, which this segment runs "
              "again: W&B keeps the values logged before (a W&B run only appends); metrics.jsonl and TensorBoard "
              "hold this segment's", flush=True)
    return run, starting_step


class MetricsLogger:
    """Writes each step's metrics: a console line with ETA, <out>/metrics.jsonl, TensorBoard, W&B.
    ``first_step``: the step this run starts at; a resumed run's TensorBoard writer purges the events of that
    step and later that the interrupted run had written (those steps run again), so no step shows twice. W&B:
    one W&B run over every segment of the run (module docstring)."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, enabled: bool, tensorboard: bool,
                 wandb_project: str | None, run_config: dict, first_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_time, self.start_step = time.monotonic(), None
        self.writer = self.wandb = None
        self.wandb_first_step = 0
        if not enabled:
            return
        out = Path(out_dir)
        # a damaged W&B record is refused before any sink is open (run_loop.begin_run refused it on every rank)
        run_id = recorded_wandb_run(out, wandb_project) if wandb_project else None
        self.jsonl = (out / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge events from first_step on (0 too: a run that died before its first checkpoint starts over)
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first_step)
        if wandb_project:  # (installed: run_loop.check_run_inputs checked before the run started)
            self.wandb, self.wandb_first_step = _start_wandb(out, wandb_project, run_id, run_config, first_step)

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
        if self.wandb is not None and step >= self.wandb_first_step:
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
