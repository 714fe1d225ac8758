"""Helpers of the synthesis tests, also used by tests/slurm/test_slurm_synth.py: the procedural source with the
answers the fake teacher needs, configs that point every teacher at it (fast retries, local executor), a written
dataset's rows for comparing two runs (and the row count of an unfinished one), and the processes left of a Ray
instance."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from megatron_avar.config import load_config
from megatron_avar.synth.config import SynthConfig
from synth_fake_teacher import FakeTeacher

# Fast client settings: retries with millisecond backoff, a short timeout for the "timeout" fault.
FAST_CLIENT = ["client.timeout_s=5", "client.backoff_initial_s=0.01", "client.backoff_max_s=0.05",
               "client.max_retries=3", "client.concurrency=4"]


def write_procedural_source(root: Path, num_samples: int = 8) -> tuple[Path, dict[str, str], list[dict]]:
    """(data.jsonl, facts: image sha256 -> answer, records) of a procedural dataset written under root/src."""
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset

    data = write_dataset(ProceduralConfig(num_samples=num_samples, seed=0), root / "src")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    facts = {}
    for record in records:
        image = data.parent / record["messages"][0]["content"][0]["image"]
        facts[hashlib.sha256(image.read_bytes()).hexdigest()] = record["answer"]
    return data, facts, records


def synth_overrides(tmp_path: Path, data: Path, teacher: FakeTeacher, *overrides: str, name: str = "run") -> list[str]:
    """The `avar synth` KEY=VALUE arguments of ``synth_config`` (later overrides win)."""
    base = [f"sources=[{{name: proc, path: '{data}'}}]", f"output.dir='{tmp_path / name}'",
            f"run.work_dir='{tmp_path / 'work'}'",
            "run.executor=local", "run.batch_records=3", "run.progress_interval_s=60", *FAST_CLIENT]
    base += [f"{stage}.teacher.base_url={teacher.base_url}" for stage in ("describe", "reason", "anchor")]
    return [*base, *overrides]


def synth_config(tmp_path: Path, data: Path, teacher: FakeTeacher, *overrides: str, name: str = "run"):
    """A config reading ``data`` with all teachers at ``teacher``, output in tmp_path/<name>,
    request cache shared by all runs of a test (tmp_path/work)."""
    return load_config(SynthConfig, None, synth_overrides(tmp_path, data, teacher, *overrides, name=name))


def ray_processes(ray_tmpdir: Path) -> list[str]:
    """Live (not zombie) processes of the Ray instances whose folder is ``ray_tmpdir``: every process with
    RAY_TMPDIR=ray_tmpdir in its environment (Ray's daemons, its workers and their children inherit it from the
    process that started Ray), except this one. A test that gives its Ray a folder of its own so finds what is
    left of that Ray, whatever other Ray runs on the machine."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "ppid", "name", "cmdline", "status"]):
        try:
            if process.pid == os.getpid() or process.info["status"] == psutil.STATUS_ZOMBIE or \
                    process.environ().get("RAY_TMPDIR") != str(ray_tmpdir):
                continue
        except (psutil.Error, OSError):
            continue
        command = " ".join(process.info["cmdline"] or [])
        found.append(f"{process.info['name']} (pid {process.pid}, parent {process.info['ppid']}): {command[:160]}")
    return found


def dataset_rows(folder: Path) -> list[dict]:
    """The rows of the dataset written to ``folder`` (OUT/data), sorted by id, images as their bytes."""
    from datasets import Image, List

    from megatron_avar.data.conversations import load_conversations

    dataset = load_conversations(folder).cast_column("images", List(Image(decode=False)))
    rows = sorted(dataset.to_list(), key=lambda row: row["id"])
    for row in rows:
        row["images"] = [image["bytes"] for image in row["images"]]
    return rows


def shard_rows(folder: Path) -> int:
    """The number of rows in the shards in ``folder`` (OUT/data), read from their parquet footers: how many records
    an unfinished run has written, which the loader refuses to load."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(shard).num_rows for shard in folder.glob("shard-*.parquet"))
