"""Vetting a megatron torch_dist checkpoint before megatron reads it: nothing in it may run code, and no file
may be cut short.

Trust: a checkpoint folder may come from someone else, and unpickling runs code. megatron's torch_dist format
cannot avoid pickle: torch.distributed.checkpoint reads ``.metadata`` with plain ``pickle.load``, and its load
planner reads the byte items stored in the ``*.distcp`` files (the layers' ``_extra_state``, the distributed
optimizer's param groups) with ``torch.load(weights_only=False)``; ``common.pt`` is read with torch.load's
default. So :func:`vet_dist_checkpoint` checks each of those against an allow-list first (``.metadata``: only
torch's checkpoint-metadata records, sizes, dtypes and layouts; the byte items and ``common.pt``:
``torch.load(weights_only=True)``) and refuses the checkpoint, naming the file, when anything else is named.
Whatever passes holds only allow-listed objects, so megatron's unrestricted reads of it then build nothing else.
(A file swapped between the check and megatron's read is outside this: it needs write access to the folder.)

Completeness: ``.metadata`` records where every stored item lies (file, offset, length). A ``*.distcp`` shorter
than its items' extent (a copy cut short, a file system that lost the tail) is refused here, naming the file and
the missing bytes, instead of an ``EOFError`` deep inside megatron's collective load. The check reads only sizes.

Used by training resumes, ``avar convert`` and ``avar vas``; a leaf module (torch only), so every command can
use it.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch

__all__ = ["vet_dist_checkpoint"]

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
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    metadata_file = path / ".metadata"
    if not metadata_file.is_file():
        raise ValueError(f"{path} has no .metadata: it is not a complete megatron torch_dist checkpoint")
    # rank-local metadata, which torch.distributed.checkpoint falls back to reading (plain pickle) when .metadata
    # cannot be used: megatron never writes one, so none is read unvetted
    rank_local = sorted(p.name for p in path.glob("__*.metadata"))
    if rank_local:
        raise ValueError(f"{path} holds {rank_local}, rank-local metadata megatron never writes (torch would unpickle "
                         "it unchecked): it was not written by avar; delete those files or resume from a checkpoint "
                         "you trust")
    try:
        with metadata_file.open("rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        byte_items = [(index, info) for index, info in metadata.storage_data.items()
                      if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata)]
        if not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
            raise ValueError(f"storage_meta is a {type(metadata.storage_meta).__name__}, not StorageMeta")
    except Exception as error:  # noqa: BLE001 — UnpicklingError, AttributeError of a foreign object, ...
        raise _refused(metadata_file, error) from None
    _check_file_sizes(path, metadata.storage_data)
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


def _check_file_sizes(path: Path, storage: dict) -> None:
    """Refuse a checkpoint whose data files are missing or shorter than the items ``.metadata`` places in them."""
    needed: dict[str, int] = {}
    for info in storage.values():
        name = str(info.relative_path)
        if Path(name).name != name:
            raise _refused(path / ".metadata", ValueError(f"an item is stored as {name!r}, outside the folder"))
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        file = path / name
        actual = file.stat().st_size if file.is_file() else None
        if actual is None or actual < size:
            state = ("is missing" if actual is None
                     else f"holds {actual} bytes, {size - actual} fewer than .metadata places in it")
            raise ValueError(f"{file} {state}: the checkpoint is incomplete (a copy cut short, or a damaged file "
                             "system). Copy it again or use another complete checkpoint (a training run resumes "
                             f"from an earlier one once {path.parent / 'latest'} names that step_* folder, or "
                             "starts over with checkpoint.resume=false checkpoint.overwrite=true)")
