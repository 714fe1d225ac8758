"""Per-sample token accounting for packing, computed without decoding or resizing any image.

The packer needs, for every sample, its token count, its loss-token count and whether it must be cut.
Those follow from the text and each image's size alone: the Qwen2.5-VL image processor resizes an image
of (height, width) with `smart_resize` to a grid of (1, H/14, W/14) patches, and the chat template
expands each image to H*W/(14*14*4) `<|image_pad|>` tokens. So a sample's roles are computed here with
the very segment renderer of `megatron_avar.roles` (same segments, same single tokenization, same role
rule), the image token counts coming from each image's size read from its file header — exactly what
`render_conversation` produces, minus the pixels. Rendering rows later re-checks the count and fails
loudly on any disagreement, so a stale cache or a processor change can never pass silently.

All bad samples are reported together before training starts (ValueError naming ids and the fix).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_avar import atomic_files
from megatron_avar import roles as roles_module
from megatron_avar.roles import IMAGE_FORMATS, TokenRole, validate_messages

__all__ = ["SampleStats", "image_grid", "sample_roles", "kept_length", "compute_sample_stats",
           "dataset_fingerprint", "processor_fingerprint", "load_or_compute_stats"]

_CACHE_FORMAT = 1
_MAX_LISTED = 8  # bad samples named in one error message


@dataclass
class SampleStats:
    """Token accounting of every sample of a dataset, index-aligned with it.

    ids: the dataset ``id`` column. full_lengths: tokens of the whole rendered sample. lengths: tokens
    kept (= full length, or seq_length for a truncated sample). num_loss_tokens: positions with a
    shifted label among the kept tokens. num_images: images per sample (all kept).
    """

    ids: list[str]
    full_lengths: list[int]
    lengths: list[int]
    num_loss_tokens: list[int]
    num_images: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_truncated(self) -> int:
        return sum(full != kept for full, kept in zip(self.full_lengths, self.lengths))


def image_grid(width: int, height: int, image_processor) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the Qwen2.5-VL image processor gives an image of this size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if not image_processor.do_resize:
        raise ValueError("the image processor has do_resize=False; token counts assume Qwen2.5-VL's resizing "
                         "(set do_resize=True in its preprocessor_config.json)")
    patch, merge = image_processor.patch_size, image_processor.merge_size
    resized_height, resized_width = smart_resize(
        height, width, factor=patch * merge,
        min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"])
    return 1, resized_height // patch, resized_width // patch


def _image_size(reference: dict) -> tuple[int, int]:
    """(width, height) of an undecoded dataset image ({"bytes", "path"}), read from its header only.

    `datasets.Image` applies the EXIF rotation when it decodes, which may swap the sides; the token count
    does not change (`smart_resize` treats both sides alike), and only counts are taken from here. Reading
    the EXIF block is not free (for PNG it can force a full decode), so it is not read.
    """
    from PIL import Image

    source = io.BytesIO(reference["bytes"]) if reference.get("bytes") is not None else reference["path"]
    with Image.open(source, formats=IMAGE_FORMATS) as image:
        return image.size


def sample_roles(messages: list[dict], grids: list[tuple[int, int, int]], processor) -> torch.Tensor:
    """int64 [L]: the roles `render_conversation` gives this conversation, with image k expanded to the
    tokens of grid ``grids[k]`` (its images are not needed). Image items may hold any placeholder."""
    turns = validate_messages(messages)
    merge = processor.image_processor.merge_size
    counts = [t * h * w // merge**2 for t, h, w in grids]
    segments = roles_module._segments(turns, counts, processor.image_token)
    text = "".join(segment for segment, _ in segments)
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _roles_from_offsets_fast(segments, encoding["offset_mapping"])


def _roles_from_offsets_fast(segments, offsets) -> torch.Tensor:
    """`roles._roles_from_offsets`, vectorised for the common case: a token inside one segment takes that
    segment's role (what the rule gives it); the few tokens spanning segments go through the rule itself.
    (The per-token Python loop costs ~5 us a token, minutes over 30K long samples.)"""
    lengths = np.array([len(text) for text, _ in segments])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    segment_roles = np.array([int(role) for _, role in segments])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if (spans[:, 1] <= spans[:, 0]).any():
        raise RuntimeError("a token has an empty character span; cannot assign its role")
    first = np.searchsorted(starts, spans[:, 0], side="right") - 1  # = bisect_right - 1, as the rule does
    last = np.searchsorted(starts, spans[:, 1] - 1, side="right") - 1
    roles = segment_roles[first]
    spanning = np.nonzero(first != last)[0]
    if spanning.size:
        roles[spanning] = roles_module._roles_from_offsets(segments, [tuple(spans[k]) for k in spanning])
    return torch.from_numpy(roles).long()


def kept_length(roles: torch.Tensor, seq_length: int, truncate: bool, sample_id: str) -> int:
    """How many leading tokens of a sample are trained on; raises ValueError with the fix when the sample
    is too long without ``truncate``, when the cut would fall inside or before the end of an image (through
    its `<|vision_end|>`), or when no token with a loss is left."""
    length = int(roles.numel())
    kept = length
    if length > seq_length:
        if not truncate:
            raise ValueError(f"sample {sample_id!r} has {length} tokens, more than seq_length {seq_length}: "
                             f"raise data.seq_length to >= {length}, lower data.max_pixels, drop the sample, or "
                             "set data.truncate=true")
        image_at = torch.nonzero(roles == TokenRole.IMAGE)
        needed = int(image_at[-1]) + 2 if image_at.numel() else 0  # last image token, then <|vision_end|>
        if needed > seq_length:
            raise ValueError(f"sample {sample_id!r} has {length} tokens and its images end at token {needed}; "
                             f"truncating to data.seq_length {seq_length} would cut an image: raise "
                             f"data.seq_length to >= {needed} (or {length} to keep it whole) or lower data.max_pixels")
        kept = seq_length
    if not bool((roles[1:kept] == TokenRole.RESPONSE).any()):
        where = f" in its first {kept} tokens (it has {length})" if kept < length else ""
        raise ValueError(f"sample {sample_id!r} has no response token to train on{where}: give it an assistant "
                         "turn" + (", or raise seq_length" if kept < length else ""))
    return kept


def _row_stats(row: dict, processor, seq_length: int, truncate: bool) -> tuple[Any, ...]:
    """(id, full length, kept length, loss tokens, images) of one undecoded dataset row, or (id, error)."""
    from megatron_avar.data.conversations import to_chat_messages

    sample_id = row["id"]
    try:
        grids = [image_grid(*_image_size(ref), processor.image_processor) for ref in row["images"]]
        sample = sample_roles(to_chat_messages(row), grids, processor)
        kept = kept_length(sample, seq_length, truncate, sample_id)
    except (ValueError, OSError, SyntaxError) as error:  # OSError, SyntaxError: PIL on an unreadable image header
        text = str(error) if isinstance(error, ValueError) else f"its image is unreadable or corrupt ({error})"
        return sample_id, text if repr(sample_id) in text else f"sample {sample_id!r}: {text}"
    loss = int((sample[1:kept] == TokenRole.RESPONSE).sum())
    return sample_id, int(sample.numel()), kept, loss, len(grids)


class _StatsTask(torch.utils.data.Dataset):
    def __init__(self, dataset, processor, seq_length: int, truncate: bool):
        self.dataset, self.processor, self.seq_length, self.truncate = dataset, processor, seq_length, truncate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return _row_stats(self.dataset[index], self.processor, self.seq_length, self.truncate)


def compute_sample_stats(dataset, processor, *, seq_length: int, truncate: bool, num_workers: int = 0) -> SampleStats:
    """`SampleStats` of a canonical conversation dataset (`load_conversations`); ``num_workers`` processes
    (0: this one). Raises ValueError listing every bad sample (id and fix) when any is unusable."""
    from megatron_avar.data.conversations import undecoded
    from megatron_avar.training.checkpointing import ignore_stop_signals

    task = _StatsTask(undecoded(dataset), processor, seq_length, truncate)
    loader = torch.utils.data.DataLoader(task, batch_size=64, num_workers=num_workers, collate_fn=list,
                                         worker_init_fn=ignore_stop_signals)
    results = [result for batch in loader for result in batch]
    errors = [result[1] for result in results if len(result) == 2]
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED])
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise ValueError(f"{len(errors)} of {len(results)} samples cannot be trained on:\n  {listed}{more}")
    ids, full, kept, loss, images = (list(column) for column in zip(*results))
    return SampleStats(ids=ids, full_lengths=full, lengths=kept, num_loss_tokens=loss, num_images=images)


def dataset_fingerprint(dataset) -> str:
    """sha256 over every row's id, messages and images: embedded bytes hashed; files by their name relative to
    the folder holding all of them, byte size and pixel dimensions (read from the header). Changes whenever
    anything that decides token counts may have changed, and stays the same when the data move (a Slurm job
    staging them to node-local disk) or a file's modification time changes."""
    from megatron_avar.data.conversations import dataset_rows, undecoded

    rows = list(dataset_rows(undecoded(dataset).select_columns(["id", "messages", "images"])))
    paths = [ref["path"] for row in rows for ref in row["images"] if ref.get("bytes") is None]
    root = os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else ""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["id"], row["messages"]], sort_keys=True).encode())
        for ref in row["images"]:
            if ref.get("bytes") is not None:
                digest.update(hashlib.sha1(ref["bytes"]).digest())
            else:
                size = os.stat(ref["path"]).st_size
                width, height = _image_size(ref)
                digest.update(f"{os.path.relpath(ref['path'], root)}|{size}|{width}x{height}".encode())
    return digest.hexdigest()


def processor_fingerprint(processor) -> str:
    """sha256 of what decides token counts: the tokenizer's size and added tokens, the image processor's
    patch/merge sizes and pixel bounds, and the source of the role renderer."""
    tokenizer, images = processor.tokenizer, processor.image_processor
    settings = {
        "tokenizer": type(tokenizer).__name__,
        "vocab": len(tokenizer),
        "added": sorted((str(token), index) for token, index in tokenizer.get_added_vocab().items()),
        "image_token": processor.image_token,
        "image": [images.patch_size, images.merge_size, images.size["shortest_edge"],
                  images.size["longest_edge"], bool(images.do_resize)],
        "renderer": hashlib.sha256(inspect.getsource(roles_module).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _cache_folder(cache_dir: str | Path) -> Path:
    """``cache_dir``, made if absent; a ValueError naming data.cache_dir when it cannot hold the stats — found
    before the samples are counted (minutes at 30K samples), not when their stats are written."""
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        what = "is a file" if folder.exists() else f"cannot be made ({error.strerror or error})"
        raise ValueError(f"data.cache_dir={cache_dir} {what}; give a folder this job can write, or drop "
                         "data.cache_dir (the stats are then counted on every start)") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"data.cache_dir={cache_dir} is not writable by this job; give a folder it can write, or "
                         "drop data.cache_dir (the stats are then counted on every start)")
    return folder


def _cached_stats(path: Path, ids: list[str]) -> SampleStats | None:
    """The stats cached in ``path`` for a dataset with ``ids``, or None (said once) when the file is damaged or
    is not such a cache: a cache is recomputed and replaced, never the reason a run fails."""
    from megatron_avar.console import note_once

    problem = None
    try:
        content = json.loads(path.read_text())
        stats = SampleStats(**content) if isinstance(content, dict) else None
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        stats, problem = None, f"{type(error).__name__}: {error}"
    if stats is not None and any(not isinstance(column, list) or len(column) != len(ids)
                                 for column in asdict(stats).values()):
        stats = None
    if stats is not None and stats.ids != ids:
        stats, problem = None, "its ids are not the dataset's"
    if stats is None:
        note_once(f"{path} is not a readable sample-stats cache ({problem or 'wrong fields or lengths'}); "
                  "recomputing it")
    return stats


def load_or_compute_stats(dataset, processor, *, seq_length: int, truncate: bool, num_workers: int = 0,
                          cache_dir: str | Path | None = None) -> tuple[SampleStats, str, str]:
    """`SampleStats` of the dataset, their fingerprint (dataset + processor + seq_length + truncate) and the
    dataset's alone (:func:`dataset_fingerprint`).

    With ``cache_dir`` the stats are read from / written to ``cache_dir/sample_stats_<fingerprint>.json``
    (written atomically), so a 30K-sample dataset is tokenized once per setting.
    """
    data = dataset_fingerprint(dataset)
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, data, processor_fingerprint(processor),
                                     seq_length, truncate]).encode()).hexdigest()[:32]
    path = None if cache_dir is None else _cache_folder(cache_dir) / f"sample_stats_{key}.json"
    if path is not None and path.is_file():
        stats = _cached_stats(path, list(dataset["id"]))
        if stats is not None:
            return stats, key, data
    stats = compute_sample_stats(dataset, processor, seq_length=seq_length, truncate=truncate,
                                 num_workers=num_workers)
    if path is not None:
        atomic_files.write_json(path, asdict(stats), indent=None)
    return stats, key, data
