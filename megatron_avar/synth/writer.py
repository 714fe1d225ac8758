"""The write stage's logic: kept rows become conversation records (megatron_avar.data.conversations),
written as one parquet shard per task with the images embedded; every row is counted per source and per
filter for the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megatron_avar.data.conversations import normalize_record, write_conversations


def conversation_record(row: dict, system_prompt: str | None) -> dict:
    """A kept working row as a record of the project's conversation format (image by absolute path)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages += [
        {"role": "user",
         "content": [{"type": "image", "image": row["image_path"]}, {"type": "text", "text": row["question"]}]},
        {"role": "assistant", "content": row["response"]},
    ]
    metadata = json.loads(row["metadata"]) if row["metadata"] else {}
    metadata["source"] = row["source"]
    return {"id": row["id"], "messages": messages, "answer": row["answer"], "metadata": metadata}


def shard_name(rows: list[dict]) -> str:
    """Deterministic name from the task's record ids, so a rerun rewrites the same shard."""
    digest = hashlib.sha256("\n".join(row["id"] for row in rows).encode("utf-8")).hexdigest()[:16]
    return f"shard-{digest}.parquet"


def count_rows(rows: list[dict]) -> dict:
    """{source: {"read", "kept", "dropped": {reason: n}, "tokens_spent", "tokens_cached"}} over ``rows``."""
    counts: dict[str, dict] = {}
    for row in rows:
        source = counts.setdefault(row["source"],
                                   {"read": 0, "kept": 0, "dropped": {}, "tokens_spent": 0, "tokens_cached": 0})
        source["read"] += 1
        source["tokens_spent"] += row["tokens_spent"] or 0
        source["tokens_cached"] += row["tokens_cached"] or 0
        if row["drop_reason"] is None:
            source["kept"] += 1
        else:
            source["dropped"][row["drop_reason"]] = source["dropped"].get(row["drop_reason"], 0) + 1
    return counts


def write_rows(rows: list[dict], data_dir: Path, system_prompt: str | None) -> dict:
    """Write the kept rows of one task; returns {"shard": file name or None, "records": n, "counts": ...}."""
    kept = [row for row in rows if row["drop_reason"] is None]
    if any(row["response"] is None for row in kept):
        raise AssertionError("a kept row reached the writer without a response (verify stage skipped?)")
    shard = None
    if kept:
        canonical = [normalize_record(conversation_record(row, system_prompt), Path("/"), row["id"]) for row in kept]
        shard = shard_name(rows)
        write_conversations(canonical, data_dir / shard, overwrite=True)
    return {"shard": shard, "records": len(kept), "counts": count_rows(rows)}


def merge_counts(parts: list[dict]) -> dict:
    """Sum count_rows results (per source, per reason)."""
    merged: dict[str, dict] = {}
    for part in parts:
        for name, source in part.items():
            target = merged.setdefault(name,
                                       {"read": 0, "kept": 0, "dropped": {}, "tokens_spent": 0, "tokens_cached": 0})
            for key in ("read", "kept", "tokens_spent", "tokens_cached"):
                target[key] += source[key]
            for reason, count in source["dropped"].items():
                target["dropped"][reason] = target["dropped"].get(reason, 0) + count
    return merged
