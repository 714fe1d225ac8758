"""Open the checkpoint an analysis job names: an HF Qwen2.5-VL directory (model + processor), its identity.

A megatron checkpoint (``convert.checkpoint.is_megatron_checkpoint``) is refused with the conversion command to
run first (one Megatron-LM wrote, with the model it came from); so is a folder whose JSON files (config,
tokenizer, processor) do not parse, naming the file (``json`` and ``tokenizers`` name none).
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_avar.models.hf_inference import DTYPES

__all__ = ["check_hf_checkpoint", "checkpoint_identity", "weights_differ", "load_hf_model", "resolve_device",
           "DTYPES"]

DEVICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

_CHUNK = 8 << 20  # bytes hashed at a time
_HASH_THREADS = 8  # shards hashed at once: enough to keep a parallel file system busy
_LEGACY_HEAD_BYTES = 16 << 20  # what identities before content hashes hashed of the first shard


def check_hf_checkpoint(path: str | Path) -> Path:
    """The directory as a Path, or ValueError naming what is wrong with it and the fix."""
    from megatron_avar.convert.checkpoint import export_hint, is_megatron_checkpoint, not_a_checkpoint_hint

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a directory; pass an HF Qwen2.5-VL checkpoint directory")
    hint = not_a_checkpoint_hint(path, hf_only=True)
    if hint is not None:
        raise ValueError(f"--model {hint}")
    if is_megatron_checkpoint(path):
        raise ValueError(f"--model {export_hint(path)}")
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
            chunk = handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def _file_stat(path: Path) -> list[int]:
    """What a rewrite, a copy or a replacement of a file changes: device, inode, size, mtime and ctime (ns). ctime
    cannot be set back (``touch -d``, ``cp -p`` set mtime only), so a file with the same stat holds the same bytes."""
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _shard_record(path: Path, known: dict[tuple[str, tuple], str]) -> dict:
    """{name, bytes, sha256 of the whole file, stat}: the sha256 is taken from ``known`` ((name, stat) -> sha256)
    while the file's stat is unchanged, else read. A file that changed while it was read gets no stat (never
    reused)."""
    before = _file_stat(path)
    digest = known.get((path.name, tuple(before))) or _sha256(path)
    return dict(name=path.name, bytes=before[2], sha256=digest, stat=before if _file_stat(path) == before else None)


def checkpoint_identity(path: str | Path, *, known: dict | None = None) -> dict:
    """What identifies the weights a result was computed on: the resolved path, sha256 of config.json and of the
    safetensors index (if any), and every shard's name, size and sha256 of its whole content, with
    ``weights_sha256`` over all of them. Content, not modification times: a copy of the same weights (``cp``
    without ``-p``, staging to node-local disk, a new LFS pull) is the same model, and a fine-tune written over
    them is another also where it left the first shard's header and leading tensors as they were (a hash of the
    first 16 MiB, as recorded before, covers ~2,300 rows of the 7B embedding table, which a fine-tune may freeze).

    Reading every byte costs about one more load of the model: sha256 runs at ~1-2 GB/s per core and the shards
    are hashed in parallel, so 7B (~17 GB) takes ~5-15 s, 72B (~146 GB) ~1-3 min depending on the file system.
    ``known``: an earlier identity of these files (e.g. the one an `avar eval` folder recorded); a shard whose
    ``stat`` (device, inode, size, mtime, ctime) is unchanged since keeps its sha256 without being read again, so a
    resume in place costs nothing and a re-copied file is read once."""
    path = Path(path).resolve()
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    reusable = {}
    for shard in (known or {}).get("shards") or []:
        if isinstance(shard, dict) and isinstance(shard.get("stat"), list) and isinstance(shard.get("sha256"), str):
            reusable[(shard.get("name"), tuple(shard["stat"]))] = shard["sha256"]
    with ThreadPoolExecutor(max_workers=max(1, min(_HASH_THREADS, len(shards)))) as pool:  # (hashlib frees the GIL)
        records = list(pool.map(lambda shard: _shard_record(shard, reusable), shards))
    weights = hashlib.sha256("".join(f"{r['name']} {r['sha256']}\n" for r in records).encode()).hexdigest()
    return dict(
        path=str(path),
        config_sha256=_sha256(path / "config.json"),
        index_sha256=_sha256(index) if index.is_file() else None,
        shards=records,
        weights_sha256=weights,
    )


def _legacy_mismatch(recorded: dict, path: Path) -> str | None:
    """`weights_differ` for an identity recorded before content hashes (shards by name, size and mtime, and the
    sha256 of the first shard's first 16 MiB), compared as it was then: that hash does not tell a fine-tune from
    its base, so a shard whose mtime changed is not taken for a copy."""
    shards = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    head = _sha256(shards[0], _LEGACY_HEAD_BYTES) if shards else None
    same_files = [(s.get("name"), s.get("bytes")) for s in recorded.get("shards") or [] if isinstance(s, dict)] \
        == [(s.name, s.stat().st_size) for s in shards]
    if (recorded.get("path"), recorded.get("config_sha256"), recorded.get("index_sha256"),
            recorded.get("first_shard_head_sha256"), same_files) != \
            (str(path), _sha256(path / "config.json"), _sha256(index) if index.is_file() else None, head, True):
        return "their content differs"
    times = {s["name"]: s.get("mtime") for s in recorded["shards"]}
    # (1 µs: the float seconds recorded do not round-trip every nanosecond through `touch -d @T`)
    moved = [s for s in shards if not isinstance(times[s.name], (int, float))
             or abs(s.stat().st_mtime - times[s.name]) > 1e-6]
    if not moved:
        return None
    return (f"recorded by size and mtime, before weights were identified by content, and {len(moved)} shard(s) "
            "have another mtime: a copy, or a fine-tune of the same size, which that record cannot tell apart. If "
            f"these are the very weights, give them back the recorded times (`touch -d @{times[moved[0].name]} "
            f"{moved[0]}`, each shard as run_config.json lists) and rerun")


_CONTENT_KEYS = ("config_sha256", "index_sha256", "weights_sha256")


def weights_differ(recorded: dict, current: dict) -> str | None:
    """Why the weights of identity ``recorded`` are not those of ``current`` (both `checkpoint_identity`; None:
    the same): compared by content, not by where the files are or their ``stat``. An identity recorded before
    content hashes (no ``weights_sha256``) is compared as it was then (`_legacy_mismatch`)."""
    if "weights_sha256" not in recorded:
        return _legacy_mismatch(recorded, Path(current["path"]))
    same = all(recorded.get(key) == current.get(key) for key in _CONTENT_KEYS)
    return None if same else "their content differs"


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
