"""Hugging Face checkpoint folders, the writing side: write sharded safetensors with an index, copy the non-weight
files, and publish an output folder atomically. Reading them (the shard list, headers, lazy tensors, the check that
every file is whole) is ``models.hf_weights``, which the HF loader uses too."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_avar import atomic_files
from megatron_avar.models.hf_weights import INDEX_NAME, SINGLE_NAME

# Weight files are rewritten, never copied; everything else at the top level of an HF folder (config.json,
# generation_config.json, tokenizer.json, tokenizer_config.json, vocab/merges, preprocessor_config.json,
# chat_template.json / .jinja, ...) travels with the checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def write_sharded_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, *,
                              max_shard_bytes: int, progress=None) -> list[str]:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each (a
    larger tensor gets a file of its own) plus ``model.safetensors.index.json``; one file when everything fits,
    as ``save_pretrained`` does. Only one shard is held in memory. Returns the file names."""
    from safetensors.torch import save_file

    temp_names, weight_map, total = [], {}, 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(temp_names):05d}.tmp"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            temp_names.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes += size
        total += size
        if progress is not None:
            progress.update(1)
    flush()
    if len(temp_names) == 1:
        os.replace(out_dir / temp_names[0][0], out_dir / SINGLE_NAME)
        return [SINGLE_NAME]
    final = []
    for i, (temp, names) in enumerate(temp_names):
        file_name = f"model-{i + 1:05d}-of-{len(temp_names):05d}.safetensors"
        os.replace(out_dir / temp, out_dir / file_name)
        weight_map.update((n, file_name) for n in names)
        final.append(file_name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return final


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the top-level non-weight files (config, tokenizer, processor, chat template) from src to dst."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name != INDEX_NAME and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def record_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Make ``folder/config.json`` name ``dtype``, the dtype its weights were written in: its top-level ``dtype``,
    and every ``dtype`` / ``torch_dtype`` its sub-configs carry. The copied config names the dtype of the model
    a run started from, which ``from_pretrained(dtype="auto")`` and vLLM's ``dtype=auto`` load the weights as
    (found in review: an fp32-trained export of a bf16 model loaded in bf16, its training rounded away)."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    name = str(dtype).removeprefix("torch.")

    def set_in(section: dict) -> None:
        for key, value in section.items():
            if key in ("dtype", "torch_dtype"):
                section[key] = name
            elif isinstance(value, dict):
                set_in(value)

    set_in(config)
    config["dtype"] = name
    atomic_files.write_json(file, config)


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """ValueError, before anything is written, when the file system of ``folder`` (the conversion's temporary
    output, beside --out) has less room than the ``needed_bytes`` the conversion writes (2% spare): a write that
    fills the disk fails far into a 72B conversion, in megatron's case without a word of ENOSPC."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.02:
        raise ValueError(f"the conversion writes {needed_bytes / 1e9:.2f} GB, but the file system of "
                         f"{folder.parent} has {free / 1e9:.2f} GB free: free space there, or choose an --out on "
                         "another file system")


@contextlib.contextmanager
def explaining_write_failures(folder: Path):
    """Turn a failure to write into ``folder`` with an OS error behind it (a full disk, a quota, EIO) into one
    ValueError line naming the cause and the fix; other errors pass unchanged. The output is not published
    (:func:`atomic_output_dir` removes the temporary folder)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        yield
    except (Exception, CheckpointException) as error:
        cause = atomic_files.os_error_in(error)
        if cause is None:
            raise
        where = Path(folder).parent
        fix = (f"free space on the file system of {where} ({shutil.disk_usage(where).free / 1e9:.2f} GB free now), "
               "or choose an --out on another one" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else
               f"check the file system of {where}")
        raise ValueError(f"writing the converted checkpoint failed ({os.strerror(cause.errno or 0)}); nothing was "
                         f"published: {fix}, then rerun") from error


def check_output_apart(out: Path, inputs: dict[str, Path]) -> None:
    """ValueError unless the output folder ``out`` and each input (``{"--flag": path}``) are disjoint: neither is
    the other nor lies inside it, symlinks resolved. An --out equal to or containing the input would be replaced
    (with --overwrite) by the conversion of that input, deleting it (and, for a checkpoint inside a run
    directory, the whole run); an --out inside the input would write into the folder being read."""
    out_real = Path(out).resolve()
    for flag, path in inputs.items():
        real = Path(path).resolve()
        relation = ("is the same folder as" if out_real == real else "contains" if out_real in real.parents else
                    "is inside" if real in out_real.parents else None)
        if relation is not None:
            resolved = "" if (out_real, real) == (Path(out).absolute(), Path(path).absolute()) else \
                f" (resolved: {out_real} and {real})"
            raise ValueError(f"--out {out} {relation} {flag} {path}{resolved}: the output would replace or write "
                             f"into the input; choose an --out that neither is, contains nor lies inside {path}")


def _replaceable_by_a_conversion(out: Path) -> bool:
    """Whether ``--overwrite`` may replace the folder ``out``: empty, a Hugging Face model folder or a megatron
    checkpoint of ``avar convert hf-to-mcore`` — never a folder of the user's that merely exists (a home, a
    repository, a run directory) nor a training checkpoint (its optimizer and RNG states would go, and the run
    could no longer resume)."""
    from megatron_avar.convert.checkpoint import CHECKPOINT_INFO, RANK_STATE, TRAINER_STATE

    if not any(out.iterdir()):
        return True
    if (out / TRAINER_STATE).exists() or (out / RANK_STATE).exists():  # a training checkpoint (optimizer, RNG)
        return False
    if (out / CHECKPOINT_INFO).is_file() and (out / ".metadata").is_file():
        return True
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool, inputs: dict[str, Path]):
    """Yield a fresh temporary folder next to ``out``; on success it becomes ``out`` by a rename (an existing
    ``out`` is replaced only with ``overwrite``), on failure it is removed and ``out`` is untouched. ``inputs``
    (``{"--flag": path}``): the folders the conversion reads, which ``out`` must not overlap (see
    :func:`check_output_apart`; checked here too, since this is what replaces ``out``)."""
    check_output_apart(out, inputs)
    out = Path(out).absolute()
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # --overwrite replaces a folder this wrote, never a file of the user's
        raise ValueError(f"--out {out}: {blocked} is a file; choose an --out folder elsewhere")
    atomic_files.remove_stale_siblings(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists: choose another --out or pass --overwrite")
    if out.exists() and not _replaceable_by_a_conversion(out):
        raise ValueError(f"--out {out} holds other things than a model: --overwrite replaces only a Hugging Face "
                         "model folder (config.json and safetensors weights), a megatron checkpoint `avar convert` "
                         "wrote (not a training run's), or an empty folder. Choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = atomic_files.sibling_folder(out, "tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    try:  # on the disk before it replaces anything: a node crash after the renames cannot leave empty files
        with explaining_write_failures(temp):
            atomic_files.fsync_tree(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    taken = ValueError(f"{out} was written by another process while this conversion ran; it is kept. Choose "
                       "another --out or pass --overwrite")
    if out.exists() and not overwrite:  # written meanwhile, by another conversion into the same --out
        shutil.rmtree(temp, ignore_errors=True)
        raise taken
    if out.exists():
        old = atomic_files.sibling_folder(out, "old")
        os.replace(out, old)
        os.replace(temp, out)
        atomic_files.fsync_directory(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(temp, out)  # fails where out appeared in between with content (never replaces it)
        except OSError:
            shutil.rmtree(temp, ignore_errors=True)
            raise taken from None
        atomic_files.fsync_directory(out.parent)
