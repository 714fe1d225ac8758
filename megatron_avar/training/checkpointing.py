"""Training checkpoints that survive preemption: written atomically, found again, resumed exactly.

Layout of ``<run>/checkpoints/``:
    step_00000100/            a complete checkpoint (megatron distributed format: model + optimizer)
        trainer_state.json    step, scheduler, data-loader position, config fingerprint (rank 0)
        rank_state/00003.pt   per-rank RNG states (torch, CUDA, megatron's tensor-parallel tracker)
    latest                    the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``.step_N.partial`` and renamed once every rank has finished, then ``latest``
is replaced; older checkpoints beyond ``keep`` are removed only after that. A crash at any moment leaves the
last complete checkpoint untouched and ``latest`` pointing at it. The model and optimizer are saved with
megatron's dist_checkpointing (torch_dist), so the model part loads at any other TP/PP layout
(``avar convert mcore-to-hf`` exports it); optimizer states resume at the layout they were written with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_avar import platform

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "PreemptionFlag"]

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def _checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = _checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint; remove the pointer "
                         "to start over or point it at a complete step_* directory")
    return path


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if platform.cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and platform.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])


# The distributed optimizer's states saved in model space, so they reload at another DP (and TP/PP) layout.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _materialise_optimizer_state(optimizer) -> None:
    """megatron's DistributedOptimizer can describe its state for loading only once that state exists (torch's
    Adam creates it at the first step): fill it with placeholders, which the load then overwrites."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_step_count(optimizer, num_updates: int) -> None:
    """torch's Adam keeps its bias-correction step count per parameter; megatron 0.16's distributed optimizer
    does not bring it back from a dist checkpoint (it keeps the placeholder's 1), which changes every update
    after a resume. Every trainer step is one update (a skipped update stops the run), so the count is known."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(num_updates), dtype=state["step"].dtype, device=state["step"].device)


def _sharded_state(model, *, is_loading: bool) -> dict:
    if is_loading:
        _materialise_optimizer_state(model.optimizer)
    model_state = model.module.sharded_state_dict()
    optimizer_state = model.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                         metadata=_OPTIMIZER_METADATA)
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(run_dir: str | Path, step: int, model, trainer_state: dict, *, keep: int,
                    describe=None) -> Path:
    """Collective: save model + optimizer + per-rank RNG + ``trainer_state`` as checkpoint ``step``.

    ``describe(path)``: run on rank 0 inside the checkpoint before it is published (the trainer writes what
    ``avar convert mcore-to-hf`` needs to export the model: the HF config, tokenizer and processor files)."""
    from megatron.core import dist_checkpointing

    root = _checkpoint_root(run_dir)
    final, partial = root / f"step_{step:08d}", root / f".step_{step:08d}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save of the same step
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, is_loading=False), str(partial))
    if rank == 0:
        (partial / "rank_state").mkdir()
    dist.barrier()
    torch.save(_rng_state(), partial / "rank_state" / f"{rank:05d}.pt")
    if rank == 0:
        state = dict(trainer_state, step=step, scheduler=model.scheduler.state_dict())
        if describe is not None:
            describe(partial)
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2, default=str) + "\n")
    dist.barrier()
    if rank == 0:
        if final.exists():  # a complete checkpoint of this step exists (e.g. re-run after resume): replace it
            shutil.rmtree(final)
        os.rename(partial, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, root / LATEST)
        complete = sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded_state(model, is_loading=True), str(path))
    model.module.load_state_dict(state["model"])
    with torch.no_grad():  # the optimizer copies into fp32 main params, which are the (leaf) params in fp32 runs
        model.optimizer.load_state_dict(state["optimizer"])
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    _restore_adam_step_count(model.optimizer, trainer_state["step"] + 1)
    model.scheduler.load_state_dict(trainer_state["scheduler"])
    rank_file = path / "rank_state" / f"{dist.get_rank():05d}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{path} has no RNG state for rank {dist.get_rank()}: it was written with fewer ranks; "
                         "resume with the world size it was written with")
    _set_rng_state(torch.load(rank_file, weights_only=False))
    return trainer_state


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption and time-limit warnings); read collectively after each step
    so every rank stops at the same step."""

    def __init__(self, signals=("SIGTERM", "SIGUSR1")):
        import signal

        self.received: str | None = None
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        import signal

        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=platform.current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
