"""The safetensors weights of a Hugging Face model folder, read: which files hold them, every tensor's name and shape
from the headers alone, tensors one at a time, and the check that every file is whole.

Every reader of HF weights uses these: the HF loader (``models.hf_inference.load_model``: eval, the GRPO local
rollout backend, `avar vas` / `avar intervene`), the trainers' start from an HF checkpoint and `avar convert`
(whose writing side is ``convert.hf_files``). A damaged file is a ValueError naming it: safetensors' own error (a
SafetensorError out of ``from_pretrained`` or vLLM) names no file. Imports torch and safetensors only, so every
package may import it (convert imports ``models``, so the check cannot live there).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["INDEX_NAME", "SINGLE_NAME", "safetensors_files", "tensor_names_and_shapes", "iter_lazy_tensors",
           "check_weights_readable"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The weight files of an HF folder, in index order. Raises ValueError if there are none."""
    if not hf_dir.is_dir():
        raise ValueError(f"{hf_dir} is {'a file' if hf_dir.exists() else 'missing'}: give the HF model folder "
                         "(the one holding config.json and the safetensors weights)")
    index = hf_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map' of tensor "
                             f"name -> shard file; {type(error).__name__}: {error}): download or copy it again"
                             ) from None
        absent = [f for f in files if not (hf_dir / f).is_file()]
        if absent:
            raise ValueError(f"{index} names shard files that are missing: {absent}")
        return [hf_dir / f for f in files]
    if (hf_dir / SINGLE_NAME).is_file():
        return [hf_dir / SINGLE_NAME]
    raise ValueError(f"{hf_dir} has neither {INDEX_NAME} nor {SINGLE_NAME} (only safetensors checkpoints are "
                     "supported)")


@contextlib.contextmanager
def _open_shard(path: Path):
    """safetensors' reader of one weight file; a damaged file (a download cut short) is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        reader = safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); a download or copy that was cut "
                         "short leaves such a file: download or copy it again") from None
    with reader:
        yield reader


def tensor_names_and_shapes(hf_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string) of every tensor, from the safetensors headers only (no tensor is read)."""
    out = {}
    for path in safetensors_files(hf_dir):
        with _open_shard(path) as reader:
            for name in reader.keys():
                piece = reader.get_slice(name)
                out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def iter_lazy_tensors(hf_dir: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) for every tensor, file by file; ``read()`` loads that one tensor. One file open at a time."""
    for path in safetensors_files(hf_dir):
        with _open_shard(path) as reader:
            for name in reader.keys():
                yield name, (lambda reader=reader, name=name: reader.get_tensor(name))


def check_weights_readable(path: str | Path) -> None:
    """ValueError naming a safetensors file of the HF folder ``path`` that is truncated or damaged (a download or
    copy cut short), or a shard its index names that is missing. Reads the headers only, which also give every
    tensor's extent: a file shorter than its header says is caught here (safetensors checks that the data cover
    the extents the header lists)."""
    tensor_names_and_shapes(Path(path))
