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
(``avar convert mcore-to-hf`` exports it); optimizer states resume at the layout they were written with.
Pruning never removes the checkpoint just written, whatever step numbers other folders carry.

Trust: a checkpoint folder may come from someone else, and unpickling runs code. What this module writes
itself holds no pickle: the trainer state is JSON, the RNG states are safetensors (a checkpoint written before
that, with ``rank_state/*.pt``, is read with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers). megatron's own torch_dist format cannot avoid pickle: torch.distributed.checkpoint
reads ``.metadata`` with plain ``pickle.load``, and its load planner reads the byte items stored in the
``*.distcp`` files (the layers' ``_extra_state``, the distributed optimizer's param groups) with
``torch.load(weights_only=False)``; ``common.pt`` is read with torch.load's default. So before megatron reads
a checkpoint, :func:`load_checkpoint` vets each of those with an allow-list (``.metadata``: only torch's
checkpoint-metadata records, sizes, dtypes and layouts; the byte items and ``common.pt``:
``torch.load(weights_only=True)``) and refuses the checkpoint, naming the file, when anything else is named.
Whatever passes holds only allow-listed objects, so megatron's unrestricted reads of it then build nothing else.
(A file swapped between the check and megatron's read is outside this: it needs write access to the run.)
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_avar import platform

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "read_trainer_state", "has_checkpoints",
           "remove_checkpoints", "vet_dist_checkpoint", "PreemptionFlag"]

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RANK_STATE = "rank_state"


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


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``<run_dir>/checkpoints`` holds anything a run wrote: a step folder (complete or partial) or the
    ``latest`` pointer."""
    root = _checkpoint_root(run_dir)
    return root.is_dir() and any(p.name == LATEST or p.name.startswith(("step_", ".step_")) for p in root.iterdir())


def remove_checkpoints(run_dir: str | Path) -> None:
    """Remove ``<run_dir>/checkpoints`` (a run starting over with the user's consent; rank 0, before it saves)."""
    shutil.rmtree(_checkpoint_root(run_dir), ignore_errors=True)


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
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        flat[f"tracker/{name}"] = state
    if platform.cuda_available():
        flat["cuda"] = torch.cuda.get_rng_state()
    return {name: t.detach().cpu().contiguous() for name, t in flat.items()}


def _set_rng_state(flat: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(flat["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name.split("/", 1)[1]: t for name, t in flat.items() if name.startswith("tracker/")})
    if "cuda" in flat and platform.cuda_available():
        torch.cuda.set_rng_state(flat["cuda"])


def _read_rank_state(path: Path, rank: int) -> dict[str, torch.Tensor]:
    """This rank's RNG states from checkpoint ``path``, read without unpickling anything (module docstring)."""
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


# -- vetting megatron's pickled parts before megatron reads them (module docstring) ----------------------------
_DCP_RECORD_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                       "torch.distributed.checkpoint.filesystem")


def _allowed_metadata_global(module: str, name: str):
    """What torch.distributed.checkpoint's ``.metadata`` pickle may name: its plain record classes (dataclasses
    and enums of the DCP modules), torch.Size, dtypes / layouts / memory formats; None for anything else."""
    import dataclasses
    import enum
    import importlib

    if "." in name:  # pickle resolves dotted names attribute by attribute: a way out of any allow-list
        return None
    if module in _DCP_RECORD_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and obj.__module__ == module and (dataclasses.is_dataclass(obj)
                                                                   or issubclass(obj, enum.Enum)):
            return obj
    elif module == "torch":
        obj = getattr(torch, name, None)
        if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    elif (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    elif (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _allowed_metadata_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which torch's checkpoint metadata never holds")
        return obj


def _refused(file: Path, error: BaseException) -> ValueError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"{file} is refused ({detail}): a checkpoint's pickled parts may hold only plain data, and "
                      "unpickling anything else could run code; this checkpoint was not written by avar or was "
                      "altered. Resume from a checkpoint you trust, or start over (checkpoint.resume=false "
                      "checkpoint.overwrite=true)")


def vet_dist_checkpoint(path: Path) -> None:
    """Refuse (ValueError naming the file) a megatron dist checkpoint whose pickled parts name anything but
    plain data, before megatron unpickles them without restriction (module docstring). Reads only metadata,
    the small byte items and ``common.pt``, not the tensors."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata_file = path / ".metadata"
    if not metadata_file.is_file():
        raise ValueError(f"{path} has no .metadata: it is not a complete megatron torch_dist checkpoint")
    try:
        with metadata_file.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        byte_items = [(index, info) for index, info in metadata.storage_data.items()
                      if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)]
    except Exception as error:  # noqa: BLE001 — UnpicklingError, AttributeError of a foreign object, ...
        raise _refused(metadata_file, error) from None
    for index, info in byte_items:
        data_file = path / str(info.relative_path)
        if Path(info.relative_path).name != info.relative_path or info.transform_descriptors:
            raise _refused(metadata_file, ValueError(f"item {index.fqn} is stored as {info.relative_path!r} with "
                                                     f"transforms {info.transform_descriptors}"))
        try:
            with data_file.open("rb") as stream:
                stream.seek(info.offset)
                blob = stream.read(info.length)
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise _refused(data_file, ValueError(f"item {index.fqn}: {error}")) from None
    common = path / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise _refused(common, error) from None


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
        (partial / RANK_STATE).mkdir()
    dist.barrier()
    from safetensors.torch import save_file

    save_file(_rng_state(), str(_rank_state_file(partial, rank)))
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
        # The newest by step number, but never the one just written: folders of a higher step than this
        # run's (left by another run) must not make it prune its own checkpoint and leave `latest` dangling.
        others = sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file() and p != final)
        for old in others[:max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; returns the trainer state. Every
    file is checked before anything is read from it without restriction (module docstring: Trust); a refusal
    on any rank stops every rank (none is left waiting in megatron's collective load)."""
    from megatron.core import dist_checkpointing

    refusal = None
    try:
        trainer_state = read_trainer_state(path)
        rng_state = _read_rank_state(path, dist.get_rank())
        vet_dist_checkpoint(path)
    except ValueError as error:
        refusal = error
    refused = torch.tensor([0.0 if refusal is None else 1.0], device=platform.current_device())
    dist.all_reduce(refused, op=dist.ReduceOp.MAX)
    if refusal is not None:
        raise refusal
    if refused.item():
        raise ValueError(f"{path} was refused on another rank (that rank's error names the file): resume from a "
                         "checkpoint you trust, or start over (checkpoint.resume=false checkpoint.overwrite=true)")
    state = dist_checkpointing.load(_sharded_state(model, is_loading=True), str(path))
    model.module.load_state_dict(state["model"])
    with torch.no_grad():  # the optimizer copies into fp32 main params, which are the (leaf) params in fp32 runs
        model.optimizer.load_state_dict(state["optimizer"])
    _restore_adam_step_count(model.optimizer, int(trainer_state["scheduler"]["num_steps"]))
    model.scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(rng_state)
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
