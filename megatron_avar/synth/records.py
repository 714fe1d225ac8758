"""Reading sources into the pipeline's working rows: normalise to one schema, store images by content,
drop duplicates.

A working row is a flat dict (one row of the Arrow table a Curator task carries between stages):

  id, source, question, answer        strings; answer is the ground truth
  image_path, image_mime, image_sha   the image, stored once per content under <work_dir>/images/<sha>.<ext>
  metadata                            JSON text: the source record's metadata
  description                         the describe stage's text (null until then, or when disabled)
  candidates                          JSON text: a list of reasoning candidates (see teachers.py)
  response                            the final "<think>…</think><answer>…</answer>" (verify stage)
  drop_reason                         null while the row is alive; "<stage>.<reason>" once it is dropped.
                                      Dropped rows travel on (without further requests) so the writer can
                                      count every record per source and per filter.
  tokens_spent, tokens_cached         teacher tokens paid by this run / reused from the request cache

Rows hold image paths, never image bytes, so tasks stay small; the work dir must be on a filesystem all
nodes see (as on any Slurm cluster) when the pipeline runs on several nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_avar import atomic_files
from megatron_avar.synth.config import SourceConfig

logger = logging.getLogger("megatron_avar.synth")
ROW_COLUMNS = ("id", "source", "question", "answer", "image_path", "image_mime", "image_sha", "metadata",
               "description", "candidates", "response", "drop_reason", "tokens_spent", "tokens_cached")
_MIME = {"PNG": ("image/png", "png"), "JPEG": ("image/jpeg", "jpg"), "WEBP": ("image/webp", "webp"),
         "GIF": ("image/gif", "gif"), "BMP": ("image/bmp", "bmp"),
         "MPO": ("image/jpeg", "jpg")}  # MPO: the JPEG of many phones (a JPEG with more frames after the first)
COLUMN_FILE_TYPES = (".jsonl", ".json", ".parquet")  # what a "columns" source's files may be


def new_row(**fields) -> dict:
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
    row.update(tokens_spent=0, tokens_cached=0, candidates="[]")
    row.update(fields)
    return row


def rows_to_table(rows: list[dict]):
    """Rows as a pyarrow Table with the fixed ROW_COLUMNS schema (so empty and full batches agree)."""
    import pyarrow as pa

    schema = pa.schema([(name, pa.int64() if name.startswith("tokens_") else pa.string()) for name in ROW_COLUMNS])
    return pa.Table.from_pylist([{name: row.get(name) for name in ROW_COLUMNS} for row in rows], schema=schema)


def table_to_rows(table) -> list[dict]:
    return table.to_pylist()


def store_image(image_bytes: bytes, store_dir: Path) -> tuple[str, str, str]:
    """Check the bytes decode as an image and store them by content; returns (path, mime, sha256).
    ValueError when they are not a readable image of a supported format: the writer's check
    (``data.conversations.verify_image``: a truncated JPEG, a decompression bomb), made before any teacher
    request is paid for, so a record the writer would refuse never reaches it."""
    from megatron_avar.data.conversations import verify_image

    image_format = verify_image(image_bytes, "image")
    if image_format not in _MIME:
        raise ValueError(f"image format {image_format} is not one of {sorted(_MIME)}")
    mime, extension = _MIME[image_format]
    sha = hashlib.sha256(image_bytes).hexdigest()
    path = store_dir / f"{sha}.{extension}"
    if not path.is_file():
        atomic_files.write_bytes(path, image_bytes)
    return str(path.resolve()), mime, sha


def _image_bytes(value, base_dir: Path) -> bytes:
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        raise ValueError(f"no image (got {type(value).__name__})")
    path = Path(path) if Path(path).is_absolute() else base_dir / path
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    return path.read_bytes()


def _conversation_records(source: SourceConfig) -> Iterator[tuple[str, str | None, str | None, object, Path, dict]]:
    """(id, question, answer, image or error, base_dir, metadata) from the project's conversation format. The
    whole source is validated first (``load_conversations``): a missing or corrupt image anywhere in it stops the
    read with that record's error, as training would; a record with other than one image is read.invalid."""
    from datasets import Image, List

    from megatron_avar.data.conversations import dataset_rows, load_conversations

    dataset = load_conversations(source.path)
    dataset = dataset.cast_column("images", List(Image(decode=False)))
    for row in dataset_rows(dataset):
        users = [m for m in row["messages"] if m["role"] == "user"]
        texts = [item["text"] for item in users[0]["content"] if item["type"] == "text"] if users else []
        image = row["images"][0] if len(row["images"]) == 1 else ValueError(
            f"{len(row['images'])} images (synthesis needs exactly one)")
        metadata = json.loads(row["metadata"]) if row["metadata"] else {}
        yield row["id"], "\n".join(texts).strip() or None, row["answer"], image, Path(source.path), metadata


def _column_records(source: SourceConfig) -> Iterator[tuple[str, str | None, str | None, object, Path, dict]]:
    import datasets

    from megatron_avar.data.conversations import LLAVA_IMAGE_PLACEHOLDER, dataset_rows, single_split

    path = Path(source.path)
    kinds = "/".join(COLUMN_FILE_TYPES)
    if path.is_file() and path.suffix not in COLUMN_FILE_TYPES:
        raise ValueError(f"source {source.name}: {path} is not a {kinds} file; format columns reads those, a folder "
                         "of them, or a datasets save_to_disk folder")
    saved = path.is_dir() and (path / "dataset_info.json").is_file()  # a datasets save_to_disk folder
    files = [path] if not path.is_dir() else [p for p in sorted(path.iterdir()) if p.suffix in COLUMN_FILE_TYPES]
    if not saved and (not files or not all(f.is_file() for f in files)):
        raise ValueError(f"source {source.name}: no {kinds} data at {path}")
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(
            "parquet" if files[0].suffix == ".parquet" else "json", data_files=[str(f) for f in files], split="train")
    except Exception as error:  # datasets' loaders raise many kinds (DatasetGenerationError, ArrowInvalid, OSError)
        raise ValueError(f"source {source.name}: cannot read {path} as a table ({_first_line(error)}); check the "
                         "file, or set sources[].format") from error
    dataset, base_dir = single_split(loaded, str(path)), path if saved else files[0].parent
    for column in (source.image_column, source.question_column, source.answer_column, source.id_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"source {source.name}: no column {column!r} in {path} (columns: {dataset.column_names}); "
                             f"set sources[].image_column/question_column/answer_column/id_column")
    if isinstance(dataset.features[source.image_column], datasets.Image):
        dataset = dataset.cast_column(source.image_column, datasets.Image(decode=False))
    for index, row in enumerate(dataset_rows(dataset)):
        record_id = str(row[source.id_column]) if source.id_column else f"{source.name}-{index}"
        answer, question = row[source.answer_column], row[source.question_column]
        if isinstance(question, str):  # a LLaVA-style "<image>" marks where the image column's image goes
            question = question.replace(LLAVA_IMAGE_PLACEHOLDER, " ").strip()
        yield (record_id, question, None if answer is None else str(answer), row[source.image_column], base_dir, {})


def _first_line(error: BaseException) -> str:
    """The innermost cause's first line: datasets wraps a parser's error ("JSON parse error: ... in row 1") in one
    that says only "An error occurred while generating the dataset"."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _normal_question(question: str) -> str:
    return re.sub(r"\s+", " ", question.strip())


def read_sources(sources: tuple[SourceConfig, ...], store_dir: Path, dedup: bool) -> list[dict]:
    """Every record of every source as a working row, in config then file order. Records that cannot be
    used (no question, no answer, not exactly one readable image) become rows dropped as "read.invalid" (the
    reason in their metadata, and the first few logged); repeats of an earlier (image bytes, question) pair
    are dropped as "read.duplicate" when ``dedup``. ValueError, before any teacher request, when two records
    share an id (the written dataset could not be loaded; ids are ``<source name>/<record id>``), or when a source
    has no record or none usable (a wrong column or image folder, not a dataset to pay teachers for)."""
    rows, seen = [], set()
    written_ids: dict[str, tuple[str, int]] = {}  # the ids the dataset gets, across sources: (source, record index)
    for source in sources:
        reader = _conversation_records if source.format == "conversations" else _column_records
        ids: dict[str, int] = {}
        invalid: list[tuple[str, str]] = []
        for count, (record_id, question, answer, image, base_dir, metadata) in enumerate(reader(source)):
            if source.limit is not None and count >= source.limit:
                break
            if record_id in ids:
                raise ValueError(f"source {source.name}: records {ids[record_id]} and {count} have the same id "
                                 f"{record_id!r} (column {source.id_column!r}); the written dataset needs unique ids: "
                                 "make them unique, or unset sources[].id_column (ids are then <name>-<index>)")
            ids[record_id] = count
            written_id = f"{source.name}/{record_id}"
            if written_id in written_ids:  # (source names hold no "/", so only a source config built around that)
                other, index = written_ids[written_id]
                raise ValueError(f"sources {other} (record {index}) and {source.name} (record {count}) both give the "
                                 f"id {written_id!r}; the written dataset needs unique ids: rename a source")
            written_ids[written_id] = (source.name, count)
            row = new_row(id=written_id, source=source.name, question=question, answer=answer,
                          metadata=json.dumps(metadata, sort_keys=True))
            try:
                if isinstance(image, Exception):
                    raise image
                if not isinstance(question, str) or not question.strip():
                    raise ValueError("no question text" if not question else
                                     f"the question is a {type(question).__name__}, not text")
                if answer is None or not str(answer).strip():
                    raise ValueError("no ground-truth answer")
                folder = base_dir if base_dir.is_dir() else base_dir.parent
                row["image_path"], row["image_mime"], row["image_sha"] = store_image(_image_bytes(image, folder),
                                                                                     store_dir)
            except ValueError as error:
                row["drop_reason"] = "read.invalid"
                row["metadata"] = json.dumps({**metadata, "invalid": str(error)}, sort_keys=True)
                invalid.append((row["id"], str(error)))
                rows.append(row)
                continue
            key = (row["image_sha"], _normal_question(question))
            if dedup and key in seen:
                row["drop_reason"] = "read.duplicate"
            seen.add(key)
            rows.append(row)
        _report_invalid(source, invalid, len(ids))
    return rows


def _report_invalid(source: SourceConfig, invalid: list[tuple[str, str]], records: int) -> None:
    """Log a source's unusable records (the first few with their reasons); ValueError when none is usable."""
    if records == 0:
        raise ValueError(f"source {source.name}: no records at {source.path}")
    if not invalid:
        return
    examples = "; ".join(f"{record}: {reason}" for record, reason in invalid[:3])
    if len(invalid) == records:
        raise ValueError(f"source {source.name}: none of its {records} records is usable (e.g. {examples}); check "
                         "sources[].path and the image/question/answer columns")
    logger.warning("synth: source %s: %d of %d records unusable (read.invalid), e.g. %s", source.name,
                   len(invalid), records, examples)
