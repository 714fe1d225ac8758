"""Progress of a synthesis run: records in/out per stage, teacher requests and tokens, ETA.

Stage workers may run in other processes and on other nodes, so each worker writes its counters to its
own small JSON file, ``<work_dir>/progress/<stage>.<host>.<pid>.<random>.json`` (atomic replace after every
task), and the driver sums the files: a `ProgressMonitor` thread logs one line every
``run.progress_interval_s`` and the manifest takes the final sums.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from megatron_avar import atomic_files

logger = logging.getLogger("megatron_avar.synth")

STAGE_ORDER = ("read", "describe", "reason", "anchor", "verify", "write")
COUNTERS = ("tasks", "records_in", "records_out", "dropped")


def progress_dir(work_dir: str | os.PathLike) -> Path:
    """Where a run's stage workers write their counter files: ``<work_dir>/progress``."""
    return Path(work_dir) / "progress"


class StageProgress:
    """Counters of one stage worker, flushed to its own file."""

    def __init__(self, progress_dir: str | os.PathLike, stage: str):
        self.stage = stage
        self.path = Path(progress_dir) / f"{stage}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.json"
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.started = time.time()

    def update(self, rows_in: list[dict], rows_out: list[dict], client_stats: dict | None = None) -> None:
        """Count one task: live rows before and after the stage (dropped rows are not 'in')."""
        alive_in = sum(row["drop_reason"] is None for row in rows_in) if rows_in else 0
        alive_out = sum(row["drop_reason"] is None for row in rows_out)
        self.counts["tasks"] += 1
        self.counts["records_in"] += alive_in
        self.counts["records_out"] += alive_out
        self.counts["dropped"] += max(0, alive_in - alive_out)
        payload = {"stage": self.stage, "started": self.started, "updated": time.time(), **self.counts,
                   "client": client_stats or {}}
        atomic_files.write_json(self.path, payload, indent=None)


# <stage>.<host>.<pid>.<random>.json, and what an atomic write of one leaves when killed (atomic_files)
_PROGRESS_FILE = re.compile(rf"(?:{'|'.join(STAGE_ORDER)})\.[^/]+\.\d+\.[0-9a-f]{{8}}\.json"
                            r"|\.(?:[^/]+)\.json\.\d+\.[0-9a-f]{8}\.tmp")


def clear_progress(progress_dir: str | os.PathLike, *, check_only: bool = False) -> None:
    """Delete the progress files of an earlier run in ``progress_dir`` (the :class:`StageProgress` files and their
    atomic writes' leftovers); a ValueError naming the folder when it holds anything else (a folder of the user's
    given as run.work_dir): nothing is deleted then. ``check_only``: refuse, but delete nothing."""
    folder = Path(progress_dir)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, where avar synth keeps its progress; choose another run.work_dir")
    entries = list(folder.iterdir())
    foreign = sorted(entry.name for entry in entries if not (entry.is_file() and _PROGRESS_FILE.fullmatch(entry.name)))
    if foreign:
        raise ValueError(f"{folder} holds {foreign[:5]}, which avar synth did not write (it keeps its progress files "
                         "there and clears them on each start); choose another run.work_dir")
    if not check_only:
        for entry in entries:
            entry.unlink(missing_ok=True)


def read_progress(progress_dir: str | os.PathLike) -> dict[str, dict]:
    """Per stage: the sums over its workers' files (counters, and client counters under "client")."""
    totals: dict[str, dict] = {}
    for path in sorted(Path(progress_dir).glob("*.json")):
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now; the next read sees it
        stage = totals.setdefault(payload["stage"],
                                  {**dict.fromkeys(COUNTERS, 0), "client": {}, "started": payload["started"]})
        for name in COUNTERS:
            stage[name] += payload[name]
        for name, value in payload["client"].items():
            if isinstance(value, dict):  # by key (ClientStats.errors): counts summed, texts (examples): the first
                merged = stage["client"].setdefault(name, {})
                for key, item in value.items():
                    if isinstance(item, str):
                        merged.setdefault(key, item)
                    else:
                        merged[key] = merged.get(key, 0) + item
            else:
                stage["client"][name] = stage["client"].get(name, 0) + value
        stage["started"] = min(stage["started"], payload["started"])
    return totals


def format_progress(totals: dict[str, dict], elapsed_s: float, teacher_stages: tuple[str, ...] = ()) -> str:
    """One line: per stage records in→out, tokens spent, and an ETA: the longest remaining time of the
    started teacher stages at their current rates ("≥" while some of ``teacher_stages`` have not started)."""
    total = totals.get("read", {}).get("records_out", 0)
    parts, tokens, eta = [], 0, None
    for stage in STAGE_ORDER:
        if stage not in totals:
            continue
        counts = totals[stage]
        parts.append(f"{stage} {counts['records_in']}→{counts['records_out']}" if stage != "read"
                     else f"read {counts['records_out']}")
        client = counts["client"]
        tokens += client.get("prompt_tokens", 0) + client.get("completion_tokens", 0)
        if client and total and counts["records_in"]:
            rate = counts["records_in"] / max(1e-6, time.time() - counts["started"])
            remaining = max(0, total - counts["records_in"]) / rate
            eta = remaining if eta is None else max(eta, remaining)
    pending = any(stage not in totals for stage in teacher_stages)
    eta_text = "?" if eta is None else f"{'≥' if pending else ''}{eta / 60:.1f} min"
    return f"[synth {elapsed_s / 60:.1f} min] " + " | ".join(parts) + f" | tokens spent {tokens:,} | ETA {eta_text}"


class ProgressMonitor:
    """Logs `format_progress` every ``interval_s`` seconds in a daemon thread until stopped."""

    def __init__(self, progress_dir: str | os.PathLike, interval_s: float, teacher_stages: tuple[str, ...] = ()):
        self.progress_dir, self.interval_s, self.teacher_stages = Path(progress_dir), interval_s, teacher_stages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="synth-progress", daemon=True)
        self.started = time.time()

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        logger.info(format_progress(read_progress(self.progress_dir), time.time() - self.started, self.teacher_stages))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            logger.info(format_progress(read_progress(self.progress_dir), time.time() - self.started,
                                        self.teacher_stages))
