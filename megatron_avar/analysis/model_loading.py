"""Open the checkpoint an analysis job names: an HF Qwen2.5-VL directory (model + processor), its identity.

A megatron checkpoint of ours (``avar_checkpoint.json``, or a torch_dist layout without config.json) is
refused with the conversion command to run first; so is a folder whose JSON files (config, tokenizer, processor)
do not parse, naming the file (``json`` and ``tokenizers`` name none).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from megatron_avar.models.hf_inference import DTYPES

__all__ = ["check_hf_checkpoint", "checkpoint_identity", "load_hf_model", "resolve_device",
           "DTYPES"]

DEVICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

_HEAD_BYTES = 16 << 20  # the first shard's first 16 MiB (safetensors header + leading tensors) identify the weights


def check_hf_checkpoint(path: str | Path) -> Path:
    """The directory as a Path, or ValueError naming what is wrong with it and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a directory; pass an HF Qwen2.5-VL checkpoint directory")
    megatron = (path / "avar_checkpoint.json").is_file() or (path / "latest_checkpointed_iteration.txt").is_file() \
        or (path / ".metadata").is_file() or any(path.glob("iter_*"))
    if megatron and not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: Megatron checkpoint: export with avar convert mcore-to-hf first")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json; pass an HF Qwen2.5-VL checkpoint directory")
    config = _check_json_files(path)
    if config.get("model_type") not in ("qwen2_5_vl",):
        raise ValueError(f"--model {path}: model_type is {config.get('model_type')!r}; these tools need a Qwen2.5-VL "
                         "checkpoint (model_type 'qwen2_5_vl')")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"--model {path}: no *.safetensors weights found")
    return path


def _check_json_files(path: Path) -> dict:
    """The checkpoint's config.json, after every top-level JSON file of ``path`` (config, generation config,
    tokenizer, processor, safetensors index) has parsed: ValueError naming the first that does not, before a
    loader reads it and fails without saying which file."""
    parsed = {}
    for file in sorted(path.glob("*.json")):
        try:
            parsed[file.name] = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"--model {path}: {file} is not valid JSON ({error}); the file is damaged or was cut "
                             "short (an interrupted download or copy): copy or download it again") from None
    if not isinstance(parsed["config.json"], dict):
        raise ValueError(f"--model {path}: {path / 'config.json'} is not a JSON object; copy or download it again")
    return parsed["config.json"]


def _sha256(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = limit
        while remaining is None or remaining > 0:
            chunk = handle.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def checkpoint_identity(path: str | Path) -> dict:
    """What identifies the weights a report was computed on: the resolved path, sha256 of config.json and of
    the safetensors index (if any), every shard's name / size / mtime, and the sha256 of the first shard's
    first 16 MiB (its header, which lists every tensor with its offsets, and the leading tensor bytes)."""
    path = Path(path).resolve()
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    return dict(
        path=str(path),
        config_sha256=_sha256(path / "config.json"),
        index_sha256=_sha256(index) if index.is_file() else None,
        shards=[dict(name=s.name, bytes=s.stat().st_size, mtime=s.stat().st_mtime) for s in shards],
        first_shard_head_sha256=_sha256(shards[0], _HEAD_BYTES) if shards else None,
    )


def resolve_device(device: str) -> str:
    """The torch device ``--device`` names: "auto" is cuda when CUDA is available, else cpu. ValueError for a name
    outside auto, cpu, cuda, cuda:N (torch's own error lists every backend it knows, most of which these tools do
    not run on), or a CUDA device this machine does not have."""
    from megatron_avar import platform

    if not _DEVICE.fullmatch(device):
        raise ValueError(f"--device {device!r}: use one of {DEVICES}")
    if device == "auto":
        return "cuda" if platform.cuda_available() else "cpu"
    if device.startswith("cuda") and not platform.cuda_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda:"):
        import torch

        count = torch.cuda.device_count()
        if int(device.partition(":")[2]) >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to "
                             f"cuda:{count - 1}); pick one of them, or --device cuda")
    return device


def load_hf_model(path: str | Path, *, device: str = "auto", dtype: str = "auto", device_map: str | None = None):
    """(model in eval mode, processor, resolved device) of an HF Qwen2.5-VL directory
    (``models.hf_inference.load_model``, as eval and the rollout backend load it).

    dtype "auto": bfloat16 on CUDA, float32 on CPU. device_map (e.g. "auto") spreads a large model over the
    visible GPUs through accelerate instead of placing it on ``device``."""
    from megatron_avar.models.hf_inference import load_model, resolve_dtype
    from megatron_avar.processor import load_processor

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {DTYPES}")
    path = check_hf_checkpoint(path)
    device = resolve_device(device)
    processor = load_processor(path)
    model = load_model(path, device=device, dtype=resolve_dtype(dtype, device), device_map=device_map)
    return model, processor, str(model.device)
