"""The synthesis pipeline as NeMo Curator stages.

    read (EmptyTask -> DocumentBatch x N) -> describe -> reason -> anchor -> verify -> write (-> shard stats)

Each stage is a thin `ProcessingStage` around the row logic in records.py / teachers.py / writer.py: the
task's pyarrow Table becomes a list of working rows, the logic fills columns or sets drop_reason, and
the rows go back into a Table with the fixed schema (records.ROW_COLUMNS). Teacher clients are built in
``setup`` (once per worker, in the worker's process) and count their requests into progress files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import DocumentBatch, EmptyTask

from megatron_avar.synth import teachers
from megatron_avar.synth.client import ChatClient, RequestCache
from megatron_avar.synth.config import SynthConfig
from megatron_avar.synth.progress import StageProgress, progress_dir
from megatron_avar.synth.records import read_sources, rows_to_table, table_to_rows
from megatron_avar.synth.writer import write_rows

DATASET_NAME = "avar_synth"


def work_paths(config: SynthConfig) -> dict[str, Path]:
    work = config.work_dir.resolve()
    return {"cache": work / "cache", "images": work / "images", "progress": progress_dir(work)}


class _RowStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """A stage that maps the rows of one task to the same rows, updated."""

    name = "synth_rows"
    resources = Resources(cpus=1.0)
    teacher_stage: str | None = None  # the config section whose teacher this stage calls

    def __init__(self, config: SynthConfig):
        self.config = config
        self._client: ChatClient | None = None
        self._progress: StageProgress | None = None

    def setup(self, worker_metadata=None) -> None:
        paths = work_paths(self.config)
        self._progress = StageProgress(paths["progress"], self.name)
        if self.teacher_stage is not None:
            teacher = getattr(self.config, self.teacher_stage).teacher
            self._client = ChatClient(self.teacher_stage, teacher, self.config.client, RequestCache(paths["cache"]),
                                      self.config.run.prompt_version)

    def _teacher(self) -> ChatClient:
        """The teacher client of a teacher stage (made by setup)."""
        if self._client is None:
            raise RuntimeError(f"stage {self.name}: no teacher client (not a teacher stage, or setup() not run)")
        return self._client

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], ["id", "drop_reason"]

    def apply(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def process(self, task: DocumentBatch) -> DocumentBatch:
        if self._progress is None:
            self.setup()
        assert self._progress is not None  # made by setup()
        rows = table_to_rows(task.to_pyarrow())
        alive_before = [dict(row) for row in rows]
        rows = self.apply(rows)
        self._progress.update(alive_before, rows, self._client.stats.as_dict() if self._client else None)
        return DocumentBatch(dataset_name=task.dataset_name, data=rows_to_table(rows),
                             _metadata=task._metadata, _stage_perf=task._stage_perf)


class DescribeStage(_RowStage):
    name = "describe"
    teacher_stage = "describe"

    def apply(self, rows):
        return teachers.describe_rows(rows, self._teacher(), self.config)


class ReasonStage(_RowStage):
    name = "reason"
    teacher_stage = "reason"

    def apply(self, rows):
        return teachers.reason_rows(rows, self._teacher(), self.config)


class AnchorStage(_RowStage):
    name = "anchor"
    teacher_stage = "anchor"

    def apply(self, rows):
        return teachers.anchor_rows(rows, self._teacher(), self.config)


class VerifyStage(_RowStage):
    name = "verify"

    def apply(self, rows):
        return teachers.verify_rows(rows, self.config)


class ReadStage(ProcessingStage[EmptyTask, DocumentBatch]):
    """Reads every source, normalises and deduplicates (a global step, so one worker does it), and fans
    out tasks of run.batch_records rows."""

    name = "read"
    resources = Resources(cpus=1.0)

    def __init__(self, config: SynthConfig):
        self.config = config

    def num_workers(self) -> int | None:
        return 1

    def process(self, task: EmptyTask) -> list[DocumentBatch]:
        paths = work_paths(self.config)
        rows = read_sources(self.config.sources, paths["images"], self.config.read.dedup)
        StageProgress(paths["progress"], self.name).update([], rows)
        size = self.config.run.batch_records
        return [DocumentBatch(dataset_name=DATASET_NAME, data=rows_to_table(rows[start:start + size]))
                for start in range(0, len(rows), size)]


class WriteStage(ProcessingStage[DocumentBatch, DocumentBatch]):
    """Writes a task's kept rows as one parquet shard; emits one row of stats (shard name, counts)."""

    name = "write"
    resources = Resources(cpus=1.0)

    def __init__(self, config: SynthConfig):
        self.config = config
        self._progress: StageProgress | None = None

    def process(self, task: DocumentBatch) -> DocumentBatch:
        if self._progress is None:
            self._progress = StageProgress(work_paths(self.config)["progress"], self.name)
        rows = table_to_rows(task.to_pyarrow())
        data_dir = Path(self.config.output.dir).resolve() / "data"
        result = write_rows(rows, data_dir, self.config.output.system_prompt)
        self._progress.update(rows, rows)
        return DocumentBatch(dataset_name=task.dataset_name, data=pa.table({"shard": [result["shard"]],
                             "records": [result["records"]], "counts": [json.dumps(result["counts"])]}),
                             _metadata=task._metadata, _stage_perf=task._stage_perf)


def build_stages(config: SynthConfig) -> list[ProcessingStage]:
    """The enabled stages in order (describe and anchor can be switched off)."""
    stages: list[ProcessingStage] = [ReadStage(config)]
    if config.describe.enabled:
        stages.append(DescribeStage(config))
    stages.append(ReasonStage(config))
    if config.anchor.enabled:
        stages.append(AnchorStage(config))
    stages += [VerifyStage(config), WriteStage(config)]
    return stages
