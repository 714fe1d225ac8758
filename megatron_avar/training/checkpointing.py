"""Training checkpoints that survive preemption: written atomically, found again, resumed exactly.

Layout of ``<run>/checkpoints/``:
    step_00000100/                     a complete checkpoint (megatron distributed format: model + optimizer)
        trainer_state.json             step, scheduler, data-loader position, the schedule-defining config
                                       fields (rank 0)
        rank_state/00003.safetensors   per-rank RNG states (torch, CUDA, megatron's tensor-parallel tracker)
    latest                             the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``.step_N.partial`` and renamed once every rank has finished, then ``latest``
is replaced; older checkpoints beyond ``keep`` are removed only after that. A crash at any moment leaves the
last complete checkpoint untouched and ``latest`` pointing at it. The model and optimizer are saved with
megatron's dist_checkpointing (torch_dist), so the model part loads at any other TP/PP layout
(``avar convert mcore-to-hf`` exports it); optimizer states resume at the tensor/pipeline layout they were
written with (below).
Pruning never removes the checkpoint just written, whatever step numbers other folders carry.

Layout changes: a run resumes at another data-parallel or context-parallel size (the data position is global,
the distributed optimizer's states are saved reshardable over DP x CP, and each rank restores the RNG states of
a rank with its tensor/pipeline coordinates); the tensor/pipeline layout must stay (``run_loop.plan_start``
refuses a change, naming both layouts, before anything is read).

Trust: a checkpoint folder may come from someone else, and unpickling runs code. What this module writes
itself holds no pickle: the trainer state is JSON, the RNG states are safetensors (a checkpoint written before
that, with ``rank_state/*.pt``, is read with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers). megatron's own parts are vetted by ``megatron_avar.checkpoint_vetting`` before
megatron reads them (an allow-list for its pickles; data files checked against their recorded sizes).

Transformer Engine: its modules add one ``_extra_state`` entry each (FP8 scaling metadata, empty without FP8,
which no run here uses), megatron's local modules only for their linears. Those entries alone may be on one
side, so a checkpoint written on a machine with Transformer Engine resumes and exports on one without it and the
reverse (``megatron_avar.checkpoint_matching``); every other difference is still refused.

Failures while writing (a full disk, a quota): the partial folder is removed and the error names the checkpoint,
the cause and the checkpoint that stays ``latest``. No process outlives a killed rank: megatron's writer would
keep its results queue in a separate server process, which outlives a rank killed with SIGKILL; saves here are
synchronous, so that queue is an in-process one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import shutil
import typing
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_avar import atomic_files, console, platform, stop_signals
from megatron_avar.checkpoint_matching import load_module_state, without_extra_states
from megatron_avar.checkpoint_vetting import vet_dist_checkpoint
from megatron_avar.convert.checkpoint import LATEST, RANK_STATE, TRAINER_STATE  # the names of a checkpoint's parts
from megatron_avar.stop_signals import STOP_SIGNALS

__all__ = ["latest_checkpoint", "complete_checkpoints", "save_checkpoint", "load_checkpoint", "read_trainer_state",
           "has_checkpoints", "remove_checkpoints", "saved_layout", "CheckpointWriteError", "PreemptionFlag",
           "STOP_SIGNALS", "ignore_stop_signals"]



def _checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = _checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not re.fullmatch(r"step_\d+", name):  # (a planted ../ would reach outside the run)
        raise ValueError(f"{pointer} does not name a step_* folder of this run: it was altered; point it at a "
                         f"complete step_* folder (echo step_00000012 > latest){_OR_START_OVER}")
    path = root / name
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{pointer} names {path.name}, which is not a complete checkpoint; point it at a "
                         f"complete step_* folder{_OR_START_OVER}")
    return path


_OR_START_OVER = ", or start over (checkpoint.resume=false checkpoint.overwrite=true)"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints (step folders holding their trainer state) of a run, oldest first."""
    root = _checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*")
                  if re.fullmatch(r"step_\d+", p.name) and (p / TRAINER_STATE).is_file())


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``<run_dir>/checkpoints`` holds anything a run wrote: a step folder (complete or partial) or the
    ``latest`` pointer."""
    root = _checkpoint_root(run_dir)
    return root.is_dir() and any(p.name == LATEST or p.name.startswith(("step_", ".step_")) for p in root.iterdir())


def remove_checkpoints(run_dir: str | Path) -> None:
    """Remove what runs wrote in ``<run_dir>/checkpoints``: step folders (complete or partial), ``latest`` and its
    temporary files (a run starting over with the user's consent; rank 0, before it saves). Anything else there
    (another tool's checkpoints) stays, and with it the folder."""
    root = _checkpoint_root(run_dir)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith(("step_", ".step_")) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name == LATEST or entry.name.startswith(f".{LATEST}."):
            entry.unlink()
    with contextlib.suppress(OSError):  # not empty: others' files stay
        root.rmdir()


def read_trainer_state(path: Path) -> dict:
    """The trainer state (JSON) of the complete checkpoint ``path``; ValueError naming the file if unreadable."""
    file = path / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} is not readable JSON ({error}); point {path.parent / LATEST} at another "
                         "complete step_* directory") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{file} has no integer 'step'; it is not a trainer state written by avar")
    return state


# -- per-rank RNG states: safetensors, never pickle ------------------------------------------------------------
def _rank_state_file(path: Path, rank: int, suffix: str = ".safetensors") -> Path:
    return path / RANK_STATE / f"{rank:05d}{suffix}"


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states as named byte tensors (what safetensors stores): "torch", "cuda" (on GPUs) and
    "tracker/<name>" per state of megatron's tensor-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    flat = {"torch": torch.get_rng_state()}
    tracker = tensor_parallel.get_cuda_rng_tracker()  # initialised by the getter (its global reads as Optional)
    for name, state in tracker.get_states().items():  # pyright: ignore[reportOptionalMemberAccess]
        flat[f"tracker/{name}"] = state
    if platform.cuda_available():
        flat["cuda"] = torch.cuda.get_rng_state()
    return {name: t.detach().cpu().contiguous() for name, t in flat.items()}


ANOTHER_DEVICE_RNG_NOTE = ("the checkpoint was written on another kind of device (GPU / CPU): megatron's "
                           "tensor-parallel random streams start again from train.seed; the rest resumes as saved")


def _set_rng_state(flat: dict[str, torch.Tensor]) -> None:
    """Restore :func:`_rng_state`'s states. The tracker's states are CUDA generator states on a GPU and CPU ones
    on the CPU (platform's CPU mode), of other sizes: from a checkpoint written on the other kind of device the
    tracker keeps the streams ``init_distributed`` seeded (said once), instead of failing at its first use."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(flat["torch"])
    tracker = typing.cast(typing.Any, tensor_parallel.get_cuda_rng_tracker())  # its global reads as Optional
    saved = {name.split("/", 1)[1]: t for name, t in flat.items() if name.startswith("tracker/")}
    current = tracker.get_states()
    if all(name not in current or current[name].numel() == state.numel() for name, state in saved.items()):
        tracker.set_states(saved)
    else:
        console.note_once(ANOTHER_DEVICE_RNG_NOTE)
    if "cuda" in flat and platform.cuda_available():
        torch.cuda.set_rng_state(flat["cuda"])


def _coordinates() -> dict[str, int]:
    """This rank's tensor / pipeline / data-parallel / context-parallel ranks and the data- and context-parallel
    sizes (megatron's parallel state)."""
    from megatron.core import parallel_state

    return {"tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(), "dp": parallel_state.get_data_parallel_world_size(),
            "cp_rank": parallel_state.get_context_parallel_rank(),
            "cp": parallel_state.get_context_parallel_world_size()}


def saved_layout(path: Path) -> dict[str, int] | None:
    """{"tp", "pp", "dp", "vpp", "cp"} a complete checkpoint was written at: from its trainer state, or (checkpoints
    written before the state recorded it) from the export record and the number of rank-state files; None if
    unknown. Checkpoints written before virtual pipeline stages or context parallelism existed had one chunk per
    rank (vpp 1) and whole rows (cp 1)."""
    layout = read_trainer_state(path).get("layout")
    if isinstance(layout, dict) and all(isinstance(layout.get(k), int) for k in ("tp", "pp", "dp")):
        return {"vpp": 1, "cp": 1, **{k: layout[k] for k in ("tp", "pp", "dp", "vpp", "cp")
                                      if isinstance(layout.get(k), int)}}
    try:
        info = json.loads((path / "avar_checkpoint.json").read_text())
        tp, pp = int(info["written_at_tp"]), int(info["written_at_pp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ranks = len({f.stem for f in (path / RANK_STATE).glob("*") if f.suffix in (".safetensors", ".pt")})
    if not ranks or ranks % (tp * pp):
        return None
    return {"tp": tp, "pp": pp, "dp": ranks // (tp * pp), "vpp": 1, "cp": 1}


def _rank_state_source(path: Path, rank: int, saved: dict[str, int] | None) -> int:
    """The rank whose RNG states this rank restores: itself when the data- and context-parallel sizes are
    unchanged; after a change, the saved rank with this rank's tensor/pipeline coordinates, data-parallel rank
    modulo the old DP size and context-parallel rank modulo the old CP size (megatron's tracker states depend on
    the tensor/pipeline ranks only; data order does not depend on RNG)."""
    from safetensors import safe_open

    mine = _coordinates()
    if saved is None or (saved["dp"], saved["cp"]) == (mine["dp"], mine["cp"]):
        return rank
    wanted = {"tp_rank": mine["tp_rank"], "pp_rank": mine["pp_rank"], "dp_rank": mine["dp_rank"] % saved["dp"],
              "cp_rank": mine["cp_rank"] % saved["cp"]}
    for file in sorted((path / RANK_STATE).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as opened:
                metadata = {"cp_rank": "0", **(opened.metadata() or {})}  # written before CP: whole rows
        except Exception:  # noqa: BLE001 — a damaged file: the read of the chosen one reports it
            continue
        if all(metadata.get(key) == str(value) for key, value in wanted.items()):
            return int(file.stem)
    raise ValueError(f"{path / RANK_STATE} has no RNG state of a rank at tensor rank {wanted['tp_rank']}, pipeline "
                     f"rank {wanted['pp_rank']}, data-parallel rank {wanted['dp_rank']} of {saved['dp']}, "
                     f"context-parallel rank {wanted['cp_rank']} of {saved['cp']}: resuming at data-parallel size "
                     f"{mine['dp']} and context-parallel size {mine['cp']} needs the states written by this version "
                     "of avar (with each rank's coordinates); resume with the sizes it was written with")


def _read_rank_state(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s RNG states from checkpoint ``path``, read without unpickling anything (module docstring)."""
    from safetensors.torch import load_file

    file, legacy = _rank_state_file(path, rank), _rank_state_file(path, rank, ".pt")
    if file.is_file():
        try:
            flat = load_file(str(file))
        except Exception as error:  # noqa: BLE001 — safetensors' own error type, OSError, ...: all mean "refused"
            raise ValueError(f"{file} is not a safetensors file of RNG states ({type(error).__name__}: {error}); "
                             "the checkpoint is damaged or was not written by avar: resume from another one, or "
                             "start over (checkpoint.resume=false checkpoint.overwrite=true)") from None
    elif legacy.is_file():
        # Written before the states moved to safetensors: torch's restricted unpickler runs no code.
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
            flat = {"torch": state["torch"], **{f"tracker/{k}": v for k, v in state["tracker"].items()}}
            if "cuda" in state:
                flat["cuda"] = state["cuda"]
        except Exception as error:  # noqa: BLE001 — an UnpicklingError for a crafted pickle, KeyError, ...
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{legacy} is refused: it is not a plain file of RNG state tensors ({first_line}); a "
                             "pickle that names anything else could run code and is never loaded. Resume from a "
                             "checkpoint you trust, or start over (checkpoint.resume=false "
                             "checkpoint.overwrite=true)") from None
    else:
        raise ValueError(f"{path} has no RNG state for rank {rank} ({file.name}): it was written with fewer ranks; "
                         "resume with the world size it was written with")
    if not isinstance(flat.get("torch"), torch.Tensor) or any(t.dtype != torch.uint8 for t in flat.values()):
        raise ValueError(f"{file if file.is_file() else legacy} does not hold RNG states (byte tensors named "
                         "torch, cuda, tracker/*); the checkpoint was not written by avar")
    return flat


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
    after a resume. Every update steps the scheduler once (a skipped update stops the run), so the restored
    scheduler's step count is the number of updates (also with GRPO's several updates per trainer step)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(num_updates), dtype=state["step"].dtype, device=state["step"].device)


def _sharded_state(model, *, is_loading: bool) -> dict:
    if is_loading:
        _materialise_optimizer_state(model.optimizer)
    # One entry per model chunk; megatron's keys name global layer numbers, so the files do not depend on how the
    # layers were split into chunks (the container's nesting is not part of the saved keys).
    model_state = {_chunk_key(index): module.sharded_state_dict() for index, module in enumerate(model.modules)}
    optimizer_state = model.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                         metadata=_OPTIMIZER_METADATA)
    return {**model_state, "optimizer": optimizer_state}


def _chunk_key(index: int) -> str:
    return "model" if index == 0 else f"model{index}"


def _model_shard() -> str:
    """This rank's model shard, "tp<r>.pp<r>" (every data-parallel replica of it has the same gradient buckets)."""
    coordinates = _coordinates()
    return f"tp{coordinates['tp_rank']}.pp{coordinates['pp_rank']}"


def _grad_bucket_record(model) -> dict:
    """Collective: the gradient-bucket layout of every model shard, which the distributed optimizer's saved state
    follows (``_OPTIMIZER_METADATA``), with the settings that made it; empty without the distributed optimizer
    (its state is then per parameter)."""
    ddp_config = model.chunks[0].ddp_config
    if not ddp_config.use_distributed_optimizer:
        return {}
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (_model_shard(), model.grad_bucket_layout()))
    return {"grad_buckets": {"params_per_bucket": dict(shards), "overlap_grad_reduce": ddp_config.overlap_grad_reduce,
                             "bucket_size": ddp_config.bucket_size}}


def _check_grad_buckets(path: Path, trainer_state: dict, model) -> None:
    """Refuse a resume whose gradient buckets differ from the checkpoint's on this rank's model shard: megatron
    would map the saved optimizer states onto the wrong parameters. Checkpoints written before the record existed
    had one bucket per buffer (no overlap), which the comparison then assumes."""
    if not model.chunks[0].ddp_config.use_distributed_optimizer:
        return
    ours, shard = model.grad_bucket_layout(), _model_shard()
    saved = trainer_state.get("grad_buckets")
    if saved is None:
        saved = {"params_per_bucket": {shard: [[sum(buffer)] for buffer in ours]},
                 "overlap_grad_reduce": False, "bucket_size": None}
    theirs = saved["params_per_bucket"].get(shard)
    if theirs == ours:
        return
    settings = f"parallel.overlap_grad_reduce={str(saved['overlap_grad_reduce']).lower()}"
    if saved["overlap_grad_reduce"]:
        settings += f" parallel.ddp_bucket_size={saved['bucket_size']}"
    raise ValueError(f"{path} holds the distributed optimizer's states of model shard {shard} in gradient "
                     f"buckets of {theirs} parameters, but this run's buckets hold {ours} "
                     "(parallel.overlap_grad_reduce and parallel.ddp_bucket_size decide them). Resume with the "
                     f"settings the checkpoint was written with ({settings}), or start a new run from an export of it "
                     "(avar convert mcore-to-hf)")


class CheckpointWriteError(ValueError):
    """Writing a checkpoint failed (a full disk, a quota, an I/O error); nothing of it was published. A
    ValueError: the CLI shows the message alone."""


class _PeerWriteFailure(RuntimeError):
    """Another rank failed to write its part of the checkpoint (that rank reports the cause)."""


def _write_failure(error: BaseException, *, root: Path, final: Path, partial: Path) -> CheckpointWriteError:
    cause = atomic_files.os_error_in(error)
    try:
        latest = latest_checkpoint(root.parent)
    except ValueError:  # a dangling pointer: not this failure's business, the next start reports it
        latest = None
    kept = f"{latest} stays the latest checkpoint" if latest is not None else "no earlier checkpoint exists"
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(root).free / 1e9
        sizes = [sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) / 1e9] if latest is not None else []
        needs = f"; the last checkpoint took {sizes[0]:.2f} GB" if sizes else ""
        fix = (f"free space on the file system of {root} ({free:.2f} GB free now{needs}) or lower checkpoint.keep, "
               "then rerun the same command: it resumes from the latest checkpoint")
        what = os.strerror(cause.errno)
    else:
        failure = cause or error
        detail = str(failure).strip().splitlines()
        named = "" if isinstance(failure, _PeerWriteFailure) else f"{type(failure).__name__}: "  # it names its own
        what = named + (detail[0] if detail else "")
        fix = f"check the file system of {root}, then rerun the same command: it resumes from the latest checkpoint"
    return CheckpointWriteError(f"writing checkpoint {final.name} failed ({what}). Nothing of it was published "
                                f"(the partial folder {partial.name} is removed) and {kept}; {fix}")


def _write_results_in_process() -> None:
    """megatron's torch_dist writer passes each rank's write results through a queue that it otherwise keeps in
    a multiprocessing Manager: a server process started on the first save that outlives a rank killed with
    SIGKILL. Saves here are synchronous (results are produced and read in this process), so an in-process
    queue does the same work with no process to orphan."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", ()) is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(run_dir: str | Path, step: int, model, trainer_state: dict, *, keep: int,
                    describe=None) -> Path:
    """Collective: save model + optimizer + per-rank RNG + ``trainer_state`` as checkpoint ``step``.

    ``describe(path)``: run on rank 0 inside the checkpoint before it is published (the trainer writes what
    ``avar convert mcore-to-hf`` needs to export the model: the HF config, tokenizer and processor files).
    A failure to write raises :class:`CheckpointWriteError` on the ranks that saw it (module docstring)."""
    root = _checkpoint_root(run_dir)
    final, partial = root / f"step_{step:08d}", root / f".step_{step:08d}.partial"
    model.gather_updated_weights()  # an overlapped weight gather would otherwise save the pre-update weights
    # the Slurm job that wrote it: a requeued attempt of that job resumes it, whatever its start-over settings
    # (run_loop.plan_start)
    trainer_state = {**trainer_state, **_grad_bucket_record(model), "slurm_job": os.environ.get("SLURM_JOB_ID")}
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        _write(root, final, partial, model, trainer_state, step=step, describe=describe)
    except (Exception, CheckpointException) as error:  # not KeyboardInterrupt, SystemExit
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if atomic_files.os_error_in(error) is None and not isinstance(error, _PeerWriteFailure):
            raise  # not a file-system failure (a bug): its own traceback says more than a summary would
        raise _write_failure(error, root=root, final=final, partial=partial) from error
    _publish(root, final, partial, keep=keep)
    return final


def _write(root: Path, final: Path, partial: Path, model, trainer_state: dict, *, step: int, describe) -> None:
    """Collective: everything of the checkpoint into ``partial``. A rank's own write failure is shared with
    every rank before the next collective, so no rank waits for one that has given up."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    rank = dist.get_rank()

    def on_every_rank(write) -> None:
        platform.agreed(write, "writing its part", error=_PeerWriteFailure)

    def make_folder() -> None:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save of the same step
            partial.mkdir(parents=True)  # empty: megatron takes a non-empty folder for an old broken checkpoint

    def write_rank_state() -> None:
        (partial / RANK_STATE).mkdir(exist_ok=True)
        rank_file = _rank_state_file(partial, rank)
        save_file(_rng_state(), str(rank_file), metadata={key: str(value) for key, value in _coordinates().items()})
        atomic_files.fsync_file(rank_file)  # on this rank's node: a shared file system flushes a file from its writer
        if rank == 0:
            state = dict(trainer_state, step=step, scheduler=model.scheduler.state_dict())
            if describe is not None:
                describe(partial)
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2, default=str) + "\n")

    def flush() -> None:  # durable before it is published (_publish): megatron flushes its files, this the rest
        if rank == 0:
            atomic_files.fsync_tree(partial)

    on_every_rank(make_folder)
    _write_results_in_process()
    dist_checkpointing.save(_sharded_state(model, is_loading=False), str(partial))
    on_every_rank(write_rank_state)
    on_every_rank(flush)  # where delayed write errors (EIO, a quota) show: a CheckpointWriteError on every rank


def _publish(root: Path, final: Path, partial: Path, *, keep: int) -> None:
    """Collective: rename the complete ``partial`` to ``final``, point ``latest`` at it, prune (rank 0)."""
    if dist.get_rank() == 0:
        # `partial` was flushed to the disk by _write: a node crash after `latest` names it cannot leave its files
        # unwritten. The rename and the pointer are flushed here.
        if final.exists():  # a complete checkpoint of this step exists (e.g. re-run after resume): replace it
            shutil.rmtree(final)
        os.rename(partial, final)
        atomic_files.fsync_directory(root)
        atomic_files.write_text(root / LATEST, final.name + "\n")
        # The newest of the steps before this one. Folders of a higher step (left by an abandoned attempt, after
        # `latest` was pointed back at an earlier step) neither count nor go: counting them pruned this run's own
        # previous checkpoints; this run replaces each when it reaches its step.
        others = [p for p in complete_checkpoints(root.parent) if p.name < final.name]
        for old in others[:max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        # Saves of earlier attempts killed mid-write (a preemption's save at a step this run does not save again
        # would stay for good: a whole model and optimizer each). The run lock makes this run the only writer.
        for stale in root.glob(".step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()


def load_checkpoint(path: Path, model) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; returns the trainer state. Every
    file is checked before anything is read from it without restriction (module docstring: Trust); a refusal
    on any rank stops every rank (none is left waiting in megatron's collective load)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    def vetted() -> tuple[dict, dict]:
        trainer_state = read_trainer_state(path)
        source = _rank_state_source(path, dist.get_rank(), saved_layout(path))
        rng_state = _read_rank_state(path, source)
        _check_grad_buckets(path, trainer_state, model)
        vet_dist_checkpoint(path)
        return trainer_state, rng_state

    trainer_state, rng_state = platform.agreed(vetted, f"checking {path}", error=lambda message: ValueError(
        f"{message}: resume from a checkpoint you trust, or start over (checkpoint.resume=false "
        "checkpoint.overwrite=true)"))
    # RETURN_ALL: what the model asks for and the checkpoint lacks is left out of the load and returned (megatron's
    # annotation is a union with the state dict alone); only Transformer Engine's extra states may be (docstring).
    state, _, absent = typing.cast(tuple[dict, set[str], set[str]], dist_checkpointing.load(
        _sharded_state(model, is_loading=True), str(path), strict=StrictHandling.RETURN_ALL))
    absent = without_extra_states(absent)
    if platform.on_any_rank(bool(absent)):
        raise ValueError(f"{path} lacks parts this model has ({absent[:5] or 'on another rank'}): it was written "
                         "for another model; resume from a checkpoint of this run, or start over "
                         "(checkpoint.resume=false checkpoint.overwrite=true)")
    for index, module in enumerate(model.modules):
        load_module_state(module, state[_chunk_key(index)], source=path)
    with torch.no_grad():  # the optimizer copies into fp32 main params, which are the (leaf) params in fp32 runs
        model.optimizer.load_state_dict(state["optimizer"])
    _restore_adam_step_count(model.optimizer, int(trainer_state["scheduler"]["num_steps"]))
    model.scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(rng_state)
    return trainer_state




def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader with worker processes: they ignore the stop signals, which Slurm
    sends to every process of a step. torch's own SIGTERM handler in a worker kills it when the signal does not
    come from its parent, and the rank then failed mid-step ("DataLoader worker is killed by signal:
    Terminated") instead of finishing it and saving a checkpoint. A worker still dies with its rank."""
    import signal

    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption and time-limit warnings; one that came since the command started,
    held by ``stop_signals.held``, counts too); read collectively after each step so every rank stops at the same
    step."""

    def __init__(self, signals=STOP_SIGNALS):
        import signal

        self.received: str | None = stop_signals.take()
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        import signal

        self.received = signal.Signals(signum).name

    def any_rank(self) -> bool:
        return platform.on_any_rank(bool(self.received))
