"""The step loop shared by `avar sft` and `avar grpo`: run the steps, log them, checkpoint (every
``checkpoint.interval`` steps, after the last step, and after the step during which SIGTERM / SIGUSR1 arrived on
any rank, then stop), and keep the per-step history for the run summary.

The trainer supplies one step (``step_fn(step) -> metrics``, already reduced over the world) and the object that
knows the data position (``data.state_dict()``, saved in every checkpoint); this loop adds the peak memory of
the step and does everything else the same way for both trainers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["LoopOutcome", "run_steps", "hf_export_describer"]


@dataclass
class LoopOutcome:
    """history: one record per step run ({"step": s, **metrics}, filtered by ``history_filter``);
    checkpoints: the checkpoints written, in order; stopped_by: the signal that stopped the run early, or None."""

    history: list[dict]
    checkpoints: list[str]
    stopped_by: str | None


def hf_export_describer(hf_path: str | Path, *, layout, dtype: torch.dtype, source: str) -> Callable[[Path], None]:
    """``describe`` for ``checkpointing.save_checkpoint``: writes into the checkpoint what `avar convert
    mcore-to-hf` reads to export it (the HF config, tokenizer and processor files of ``hf_path``, and the
    layout / dtype / source record)."""

    def describe(path: Path) -> None:
        from megatron_avar.convert.checkpoint import HF_SIDE_DIR, write_checkpoint_info
        from megatron_avar.convert.hf_files import copy_side_files

        copy_side_files(Path(hf_path), path / HF_SIDE_DIR)
        write_checkpoint_info(path, tp=layout.tp, pp=layout.pp, dtype=dtype, source=source)

    return describe


def run_steps(step_fn: Callable[[int], dict[str, float]], *, start_step: int, steps: int, run_dir: str | Path,
              model, data, layout, logger, preemption, log_interval: int, checkpoint, describe,
              history_filter: Callable[[str], bool] = lambda name: True) -> LoopOutcome:
    """Steps ``start_step .. steps - 1`` (collective over all ranks; module docstring). ``checkpoint``: the
    trainer's CheckpointConfig (interval, keep); ``history_filter(name)``: which metrics the history keeps (all
    are logged)."""
    from megatron_avar.training import checkpointing
    from megatron_avar.training.metrics import peak_memory_gb

    outcome = LoopOutcome(history=[], checkpoints=[], stopped_by=None)
    for step in range(start_step, steps):
        metrics = step_fn(step)
        metrics["perf/peak_memory_gb"] = peak_memory_gb()
        outcome.history.append({"step": step, **{k: v for k, v in metrics.items() if history_filter(k)}})
        last = step == steps - 1
        if step % log_interval == 0 or last:
            logger.log(step, metrics)
        interrupted = preemption.any_rank()
        if interrupted or last or (checkpoint.interval and (step + 1) % checkpoint.interval == 0):
            trainer_state = {"data": data.state_dict(), "metrics": outcome.history[-1]}
            outcome.checkpoints.append(str(checkpointing.save_checkpoint(
                run_dir, step, model, trainer_state, keep=checkpoint.keep, describe=describe)))
        if interrupted:
            outcome.stopped_by = preemption.received or "signal on another rank"
            if layout.is_logging_rank:
                print(f"stopping after step {step + 1}: {outcome.stopped_by}; checkpoint {outcome.checkpoints[-1]}",
                      flush=True)
            break
    return outcome
