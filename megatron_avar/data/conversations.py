"""The conversation record format: one home for reading, validating and writing conversation datasets.

A record is one JSON object (a jsonl line) or one parquet row:

    {"id": "geo-17",                                   # optional, unique string; defaults to "<file> line <n>"
     "messages": [                                     # the Hugging Face chat format
        {"role": "system", "content": "..."},          # optional, first only
        {"role": "user", "content": [{"type": "image", "image": "images/geo-17.png"},
                                     {"type": "text", "text": "What is x?"}]},
        {"role": "assistant", "content": "<think>...</think><answer>3</answer>"}],
     "answer": "3",                                    # optional ground truth (GRPO rewards, evaluation)
     "metadata": {"source": "geo3k"}}                  # optional, free-form JSON object

- Image paths are relative to the data file's folder, or absolute. In parquet an image item may instead
  hold the encoded bytes, as {"bytes": b"...", "path": "name.png"} (what `write_conversations` writes).
- LLaVA-style records are accepted too: a top-level "images" list of paths and one "<image>"
  placeholder per image in the message texts, in order. They are rewritten into image items.
- So is the Hugging Face/TRL vision layout (and the canonical schema below, exported as JSON): image items
  without a payload, ``{"type": "image"}``, and a top-level "images" list holding their images in order.
- Unknown top-level keys are errors: a typo like "answers" must not silently drop the ground truth.

Loaded, a dataset has one canonical Arrow schema, so records of any origin mix and shard freely:
``id``, ``messages`` (content always a list of {"type", "text"} items; an image item's text is null),
``images`` (the images in order of appearance, a `datasets.Image` sequence: path or embedded bytes),
``answer`` and ``metadata`` (JSON text). `to_chat_messages(row)` turns a row back into the chat format
with PIL images, ready for `megatron_avar.roles.render_conversation`.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_avar import atomic_files
from megatron_avar.data.synth_output import refuse_unfinished_synthesis
from megatron_avar.roles import IMAGE_FORMATS, validate_messages

if TYPE_CHECKING:  # loaded lazily: `import megatron_avar.data` stays light
    import datasets

__all__ = [
    "RECORD_KEYS",
    "undecoded",
    "LLAVA_IMAGE_PLACEHOLDER",
    "load_conversations",
    "single_split",
    "dataset_rows",
    "normalize_record",
    "to_chat_messages",
    "write_conversations",
]

RECORD_KEYS = ("id", "messages", "answer", "metadata", "images")
LLAVA_IMAGE_PLACEHOLDER = "<image>"
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _features():
    from datasets import Features, Image, List, Value

    item = {"type": Value("string"), "text": Value("string")}
    return Features(
        {
            "id": Value("string"),
            "messages": List({"role": Value("string"), "content": List(item)}),
            "images": List(Image()),
            "answer": Value("string"),
            "metadata": Value("string"),
        }
    )


def verify_image(source: Path | bytes, where: str) -> str:
    """Check that an image file (or embedded bytes) decodes as an image: PIL's verify (for a PNG, every chunk's
    checksum), and for every other format a decode, of a JPEG at 1/8 scale (their verify reads only the headers,
    so a truncated file would pass and fail mid-training). Returns PIL's name of its format ("PNG", "JPEG", ...)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Path):
        try:
            found = source.is_file()
        except OSError as error:  # a name too long for the file system, ...
            raise ValueError(f"{where}: image path {str(source)[:200]!r} cannot be read ({error.strerror})") from None
        if not found:
            problem = f"image path {source} is a folder, not a file" if source.is_dir() else \
                f"image file not found: {source}"
            raise ValueError(f"{where}: {problem} (paths are relative to the data file's folder)")
    what = f"image file {source}" if isinstance(source, Path) else "embedded image bytes"
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=IMAGE_FORMATS) as image:
            image.verify()  # PNG: every chunk's checksum; the other formats: only the headers
        if image.format != "PNG":  # a truncated JPEG, GIF, BMP, TIFF or WebP passes verify(): decode it to find out
            with Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=IMAGE_FORMATS) as image:
                if image.format == "JPEG":  # at 1/8 scale: cheap, and it still reads every byte
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
    except Image.DecompressionBombError as error:
        # PIL refuses to open images over twice Image.MAX_IMAGE_PIXELS (a crafted file that would take
        # gigabytes to decode, or a huge scan); the model sees at most max_pixels of it anyway.
        raise ValueError(f"{where}: {what} is refused as a decompression bomb ({error}); downscale it (training "
                         "resizes every image to at most data.max_pixels) or drop the record") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{where}: {what} is unreadable or corrupt, or not one of {', '.join(IMAGE_FORMATS)} "
                         f"({error})") from error
    assert image.format is not None  # (an image PIL opened with `formats` has one of them)
    return image.format


def _resolve_image(image: Any, base_dir: Path, where: str) -> dict:
    """An image reference as the Arrow image struct {"bytes", "path"}, checked to be readable."""
    if isinstance(image, dict) and image.get("bytes") is not None:
        verify_image(image["bytes"], where)
        return {"bytes": image["bytes"], "path": image.get("path")}
    if isinstance(image, dict):
        image = image.get("path")
    if not isinstance(image, (str, os.PathLike)) or not str(image):
        raise ValueError(f"{where}: an image must be a file path (or embedded bytes in parquet), "
                         f"got {type(image).__name__}")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(image)):  # (a Path would read it as http:/host/...)
        raise ValueError(f"{where}: image {image} is a URL; images are read from files only: download it and give "
                         "its path (relative to the data file's folder)")
    path = Path(image)
    if not path.is_absolute():
        path = base_dir / path
    verify_image(path, where)
    return {"bytes": None, "path": str(path.resolve())}


def _expand_llava_placeholders(messages: list, images: list, where: str) -> list:
    """Rewrite "<image>" placeholders in texts (LLaVA style) into image items, in order."""
    if not isinstance(images, list):
        raise ValueError(f"{where}: 'images' must be a list of image paths")
    num_placeholders, expanded = 0, []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (str, list)):
            expanded.append(message)  # validate_messages reports the malformed turn
            continue
        new_items = []
        for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            text = item.get("text") if isinstance(item, dict) and item.get("type", "text") == "text" else None
            if not isinstance(text, str):
                new_items.append(item)
                continue
            for index, piece in enumerate(text.split(LLAVA_IMAGE_PLACEHOLDER)):
                if index > 0:
                    if num_placeholders < len(images):
                        new_items.append({"type": "image", "image": images[num_placeholders]})
                    num_placeholders += 1
                if piece:
                    new_items.append({"type": "text", "text": piece})
        expanded.append({**message, "content": new_items})
    if num_placeholders != len(images):
        raise ValueError(
            f"{where}: {num_placeholders} '{LLAVA_IMAGE_PLACEHOLDER}' placeholders but {len(images)} images; "
            "give exactly one placeholder per entry of 'images'"
        )
    return expanded


def normalize_record(record: Any, base_dir: Path, where: str) -> dict:
    """Validate one record and return it in the canonical schema (see module docstring).

    ``where`` names the record in error messages (e.g. "data.jsonl line 12").
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a record may have {list(RECORD_KEYS)}")
    if "messages" not in record:
        raise ValueError(f"{where}: missing 'messages' (a list of chat turns)")
    messages = record["messages"]
    if not isinstance(messages, list):
        hint = (" (it is text: store the turns as a list of {role, content} objects, not as JSON in a string)"
                if isinstance(messages, str) else "")
        raise ValueError(f"{where}: messages must be a non-empty list of chat turns, got "
                         f"{type(messages).__name__}{hint}")
    if record.get("images") is not None:
        messages = _expand_llava_placeholders(list(messages), record["images"], where)
    try:
        turns = validate_messages(messages)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None

    images, canonical_messages = [], []
    for role, items in turns:
        content = []
        for item in items:
            if item["type"] == "image":
                images.append(_resolve_image(item["image"], base_dir, where))
                content.append({"type": "image", "text": None})
            else:
                content.append({"type": "text", "text": item["text"]})
        canonical_messages.append({"role": role, "content": content})

    answer = record.get("answer")
    if answer is not None and (not isinstance(answer, (str, int, float)) or isinstance(answer, bool)
                               or (isinstance(answer, float) and not math.isfinite(answer))):
        raise ValueError(f"{where}: 'answer' must be a string or a finite number, got {answer!r}")
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"{where}: 'metadata' must be a JSON object")
    record_id = record.get("id", where)
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise ValueError(f"{where}: 'id' must be a string")
    return {
        "id": str(record_id),
        "messages": canonical_messages,
        "images": images,
        "answer": None if answer is None else str(answer),
        "metadata": None if metadata is None else json.dumps(metadata, sort_keys=True),
    }


def _inline_canonical_images(row: Any, where: str, *, columnar: bool) -> Any:
    """A row in the canonical schema (image items without payload, images in an 'images' list, metadata as JSON
    text; also the Hugging Face/TRL vision layout of ``{"type": "image"}`` items and an 'images' list) back in the
    chat format; other rows (chat format, LLaVA style) are returned unchanged. ``columnar``: the row comes from a
    parquet file or a saved dataset, where every row has an 'images' column: an empty one is no images, not a
    LLaVA record without any (whose "<image>" in a text would be refused as a placeholder without an image)."""
    if not isinstance(row, dict):  # normalize_record names it
        return row
    if columnar and row.get("images") == []:
        del row["images"]
    if isinstance(row.get("metadata"), str):
        try:
            row["metadata"] = json.loads(row["metadata"])
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: 'metadata' text is not valid JSON ({error})") from None
    messages = row.get("messages")
    if not isinstance(messages, list):  # JSON text or a wrong type: normalize_record names it
        return row
    image_items = [
        item for message in messages if isinstance(message, dict) and isinstance(message.get("content"), list)
        for item in message["content"] if isinstance(item, dict) and item.get("type") == "image"
    ]
    if not image_items or any(item.get("image") is not None for item in image_items):
        return row
    images = row.pop("images", None) or []
    if len(images) != len(image_items):
        raise ValueError(f"{where}: {len(image_items)} image items but {len(images)} entries in 'images'")
    for item, image in zip(image_items, images):
        item["image"] = image
    return row


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in _DATA_SUFFIXES:
            raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use one of {list(_DATA_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _DATA_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{path}: no {'/'.join(_DATA_SUFFIXES)} files in this folder")
        return files
    raise ValueError(f"data path not found: {path}")


def _raw_records(file: Path) -> Iterator[tuple[Any, str]]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        for index, row in enumerate(pq.read_table(file).to_pylist()):
            where = f"{file.name} row {index}"
            yield _inline_canonical_images({k: v for k, v in row.items() if v is not None}, where,
                                           columnar=True), where
        return
    if file.suffix == ".json":
        raw = file.read_bytes()
        try:
            records = json.loads(_utf8(raw, file, line_number=None))
        except json.JSONDecodeError as error:
            raise ValueError(f"{file.name} line {error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{file}: a .json data file must hold a list of records (or use .jsonl)")
        for index, record in enumerate(records):
            where = f"{file.name} record {index}"
            yield _inline_canonical_images(record, where, columnar=False), where
        return
    with file.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            line = _utf8(raw_line, file, line_number=line_number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file.name} line {line_number}: not valid JSON ({error})") from None
            where = f"{file.name} line {line_number}"
            yield _inline_canonical_images(record, where, columnar=False), where


def _utf8(raw: bytes, file: Path, *, line_number: int | None) -> str:
    """``raw`` decoded as UTF-8; ValueError naming the file, line and column of the first invalid byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        if line_number is None:  # a whole file: find the line
            line_number = raw.count(b"\n", 0, error.start) + 1
            column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        else:
            column = error.start + 1
        raise ValueError(f"{file.name} line {line_number}: byte {raw[error.start]:#04x} at column {column} is not "
                         "UTF-8; data files must be UTF-8 (re-encode the file, e.g. iconv -f <its encoding> -t "
                         "UTF-8)") from None


def load_conversations(path: str | Path) -> datasets.Dataset:
    """Load and validate a conversation dataset: a .jsonl/.json/.parquet file, a folder of them, or a
    folder written by `datasets.Dataset.save_to_disk` in the canonical schema. Returns a `datasets.Dataset`.

    Every record is validated before anything is returned; the first bad record raises ValueError naming
    the file, the line/row, the problem and the fix. Duplicate ids are errors. The output of an `avar synth`
    run that has not finished is refused: its shards are only part of the dataset (``synth_output``).
    """
    import datasets

    path = Path(path)
    refuse_unfinished_synthesis(path)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        dataset = single_split(datasets.load_from_disk(str(path)), str(path))
        if set(dataset.column_names) != set(_features()):
            raise ValueError(f"{path}: a saved dataset must have the columns {sorted(_features())}")
        if len(dataset) == 0:
            raise ValueError(f"{path}: no records")
        dataset = dataset.cast(_features())
        rows = ((row, f"{path.name} row {index}") for index, row in enumerate(dataset_rows(undecoded(dataset))))
        for _ in _checked_records((_inline_canonical_images({k: v for k, v in row.items() if v is not None}, where,
                                                            columnar=True), path, where) for row, where in rows):
            pass  # the checks a data file's records get; the saved dataset itself is returned
        return dataset
    records = list(_checked_records((raw, file.parent, where) for file in _data_files(path)
                                    for raw, where in _raw_records(file)))
    if not records:
        raise ValueError(f"{path}: no records")
    return datasets.Dataset.from_list(records, features=_features())


def _checked_records(raw_records: Iterable[tuple[Any, Path, str]]) -> Iterator[dict]:
    """:func:`normalize_record` of each (raw record, base folder, where), in order; ValueError for an id seen
    before, naming both places."""
    seen_ids: dict[str, str] = {}
    for raw, base_dir, where in raw_records:
        record = normalize_record(raw, base_dir, where)
        if record["id"] in seen_ids:
            raise ValueError(f"{where}: duplicate id {record['id']!r} (first seen at {seen_ids[record['id']]})")
        seen_ids[record["id"]] = where
        yield record


def single_split(dataset: object, source: str) -> datasets.Dataset:
    """``dataset`` (what ``datasets.load_dataset(..., split=...)`` or ``load_from_disk`` returned) when it is one
    split; ValueError naming ``source`` for a DatasetDict or a streaming dataset."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{source}: expected one split (a datasets.Dataset), got a {type(dataset).__name__}")
    return dataset


def undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """The dataset with every image column (a `datasets.Image`, or a list of them) as {"bytes", "path"}
    references: nothing decoded. `datasets` would decode an image with any format PIL knows (PostScript through
    Ghostscript among them); the readers decode the references with ``roles.open_image`` (``IMAGE_FORMATS``)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a cast of a few columns is not worth a progress bar per call
    try:
        for name, feature in list(dataset.features.items()):
            kept = _references(feature)
            if kept != feature:
                dataset = dataset.cast_column(name, kept)
        return dataset
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _references(feature: Any) -> Any:
    """``feature`` with each `datasets.Image` in it (itself, or the items of a list) set not to decode."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(_references(feature.feature), length=feature.length)
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_references(feature.feature))
    return feature


def dataset_rows(dataset: datasets.Dataset) -> Iterator[dict[str, Any]]:
    """The rows of ``dataset`` in order, each a dict of its columns: datasets' own iterator, typed (the datasets
    package ships no annotations for it)."""
    return typing.cast(Iterator[dict[str, Any]], iter(dataset))


def to_chat_messages(row: dict) -> list[dict]:
    """A canonical dataset row back in the chat format, images as PIL images (in order of appearance)."""
    images = iter(row["images"])
    messages = []
    for message in row["messages"]:
        content = []
        for item in message["content"]:
            if item["type"] == "image":
                content.append({"type": "image", "image": next(images)})
            else:
                content.append({"type": "text", "text": item["text"]})
        messages.append({"role": message["role"], "content": content})
    return messages


def _embedded_image(image) -> dict:
    """An image (PIL, or an Arrow {"bytes", "path"} struct) as a struct holding its encoded bytes."""
    import io

    from PIL import Image

    if isinstance(image, Image.Image):  # rows of a loaded dataset decode images; PNG keeps pixels exact
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if image.get("bytes") is not None:
        return image
    return {"bytes": Path(image["path"]).read_bytes(), "path": Path(image["path"]).name}


def write_conversations(rows: Iterable[dict], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write canonical rows (e.g. a loaded dataset) to one parquet file with the image bytes embedded
    (files are embedded as they are; decoded PIL images are encoded as PNG).

    The file is written next to its destination and renamed into place, so a crash never leaves a
    half-written dataset, and an existing file is replaced only with ``overwrite=True``.
    """
    import datasets

    path = Path(path)
    if path.suffix != ".parquet":
        raise ValueError(f"{path}: write_conversations writes parquet; name the file *.parquet")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it")
    embedded = []
    for row in rows:
        images = []
        for image in row["images"]:
            images.append(_embedded_image(image))
        embedded.append({**row, "images": images})
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = datasets.Dataset.from_list(embedded, features=_features())
    with atomic_files.replacing(path) as temporary:
        dataset.to_parquet(str(temporary))
    return path
