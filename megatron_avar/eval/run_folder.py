"""The output folder of `avar eval` (``--out``): whose it is, who writes it now, and which data it holds.

* :func:`check_eval_folder`: eval writes ``run_config.json``, ``scores.json``, ``results.md``, ``predictions/``,
  ``vas/`` and ``judge_cache/`` into ``--out`` and replaces the first three on every run. A folder holding such a
  file that eval did not write (the user's report), or predictions without the run_config.json of the run that
  made them, is refused before anything is written, as `avar vas` / `avar intervene` refuse an ``--out`` of an
  earlier run (eval resumes its own runs instead of replacing them, so it has no ``--overwrite``).
* :func:`holding_eval_lock`: one process per predictions file family (``training.run_lock``, as `avar vas`): two
  runs of the same shard (or two unsharded runs) on one folder would both generate the missing samples and
  interleave their appends. Shards of one run write their own files, so each shard has its own lock.
* :class:`SampleRecord`: ``predictions/<benchmark>.samples.json`` lists a digest of every sample the folder's
  predictions of that benchmark were made from, in data order. A resume reading other data (another split file
  under ``--data-root``) is refused at the first sample that differs, before that sample is generated: samples of
  two datasets are never scored together. Different ``--limit`` values compare on their common samples.
* :func:`read_json`: a damaged JSON file of the folder is named, with the fix (``json`` names no file).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_avar import atomic_files

__all__ = ["check_eval_folder", "holding_eval_lock", "read_json", "read_run_config", "SampleRecord", "sample_digest"]

RUN_CONFIG = "run_config.json"
REPORTS = ("scores.json", "results.md")  # replaced by every run that scores
RESULTS = ("predictions", "vas", "judge_cache")  # what a run adds to
LOCKS = ".avar-locks"  # the lock folders of sharded runs (an unsharded run locks --out itself)
_RECORD_FIX = "delete it; the next run records the samples again (and checks resumes against them from then on)"


def read_json(path: Path, *, fix: str) -> dict | None:
    """The JSON object at ``path``; None when there is none (also when it vanished since it was listed). A file
    that is not a JSON object is a ValueError naming it and ``fix`` (what to do about it)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): {fix}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not the object `avar eval` writes: {fix}")
    return value


def read_run_config(out: Path) -> dict | None:
    """``out/run_config.json`` (None when absent); a damaged one is named with the way out."""
    return read_json(out / RUN_CONFIG, fix=f"it records the model and settings of the predictions in {out}, which "
                                            "cannot be checked without it: restore it, or use another --out")


def _written_by_eval(path: Path) -> bool:
    """Whether ``path`` (scores.json or results.md of a folder) is what `avar eval` writes there."""
    from megatron_avar.eval.report import TABLE_HEADER

    text = path.read_text(errors="replace") if path.is_file() else ""
    if path.name == "results.md":
        return text.startswith(TABLE_HEADER + "\n")
    try:
        scores = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(scores, dict) and {"model", "benchmarks"} <= set(scores)


def check_eval_folder(out: Path, *, generating: bool) -> None:
    """ValueError unless ``out`` is a folder `avar eval` may write into: absent or empty, an earlier run's (its
    run_config.json), or (``generating`` False: scoring) a folder of predictions. Refused: a run_config.json that
    `avar eval` did not write, in a folder without one a scores.json or results.md it did not write (a run replaces
    both), and for a generating run predictions without the run_config.json that says which model and settings made
    them (this run's would be scored with them). Called before anything is written into ``out``."""
    if not out.is_dir():
        return
    run_config = read_run_config(out)
    if run_config is not None and not {"model", "generation"} <= set(run_config):
        raise ValueError(f"{out / RUN_CONFIG} is not the run_config.json of an `avar eval` run (it lacks model and "
                         "generation), and `avar eval` would replace it: choose another --out")
    foreign = [] if run_config is not None else [name for name in REPORTS if (out / name).exists()
                                                 and not _written_by_eval(out / name)]
    if foreign:
        raise ValueError(f"--out {out} holds {' and '.join(foreign)} that `avar eval` did not write, and a run would "
                         "replace them: choose another --out (or move them away)")
    held = [name for name in RESULTS if (out / name).exists()]
    if generating and run_config is None and held:
        raise ValueError(f"--out {out} holds {', '.join(held)} but no {RUN_CONFIG}: no `avar eval` run wrote it (that "
                         "records the model and settings of the predictions), and this run's predictions would be "
                         "scored with those of unknown origin. Choose another --out")


@contextmanager
def holding_eval_lock(out: Path, *, num_shards: int, shard_index: int) -> Iterator[None]:
    """Hold the lock of the predictions files this run appends to (``training.run_lock``) for the ``with`` block:
    ``out`` itself for an unsharded run, ``out/.avar-locks/shard-<i>-of-<n>`` for a shard. ValueError naming the
    holder when another process has it."""
    from megatron_avar.training.run_lock import holding_run_lock

    if num_shards == 1:
        folder, which = out, "unsharded `avar eval` runs"
    else:
        folder, which = out / LOCKS / f"shard-{shard_index}-of-{num_shards}", \
            f"`avar eval` runs of shard {shard_index} of {num_shards}"
    conflict = (f"two {which} on one --out would both generate the missing samples and interleave their "
                "predictions. Wait for that run to end (or stop it), or give this one another --out")
    with holding_run_lock(folder, conflict=conflict):
        yield


def sample_digest(sample) -> str:
    """16 hex digits of sha256 over what identifies a benchmark sample: its id, its prompt text (``<image>`` where
    each image goes), its target (gold answer and grouping keys) and each image's size and mode. The pixels are
    not hashed: ids, questions and answers already tell one split from another, and hashing every decoded image on
    every resume would cost more than it catches."""
    images = [[*item["image"].size, item["image"].mode] for item in sample.content if item["type"] == "image"]
    identity = json.dumps([sample.id, sample.prompt_text, sample.target, images], sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class SampleRecord:
    """The samples a folder's predictions of one benchmark were made from (``predictions/<benchmark>.samples.json``:
    ``digests``, per limit group the digests in data order; ``complete`` when they are the whole data; ``data``
    where they were read). A limit group is what ``--limit`` counts (``Benchmark.limit_group``): the whole benchmark,
    or each MMMU-Pro setting. So a run with any limit reads, in each group, a prefix of the same sequence.

    A run calls :meth:`check` on every sample it reads, in order, :meth:`save` before appending predictions and
    :meth:`finish` at the end. The first sample whose digest differs from the recorded one at its place is refused
    before it is generated, so everything appended comes from samples both datasets share. A run reading fewer
    (``--limit``) or more samples than recorded compares the ones both read; but data with more samples than a
    complete record, or a complete read with fewer, differ too."""

    def __init__(self, path: Path, benchmark: str, data: str):
        self.path, self.benchmark, self.data = path, benchmark, data
        recorded = read_json(path, fix=_RECORD_FIX)
        self.recorded: dict[str, list[str]] = {} if recorded is None else dict(recorded.get("digests", {}))
        self.complete = recorded is not None and bool(recorded.get("complete"))
        self.recorded_data = None if recorded is None else recorded.get("data")
        self.seen: dict[str, list[str]] = {}

    def _differ(self, what: str) -> ValueError:
        where = "" if self.recorded_data is None else f" ({self.recorded_data})"
        return ValueError(
            f"{self.benchmark}: the data ({self.data}) differ from those the predictions in {self.path.parent} were "
            f"made from{where}: {what}. Resuming would score samples of two datasets together: give another --out for "
            f"these data, or the --data-root the predictions came from")

    def check(self, sample, group: str = "") -> None:
        """Record the next sample of limit group ``group`` (data order); ValueError when it differs from the one
        recorded at its place, or the record is complete and has no sample there."""
        seen, recorded, digest = self.seen.setdefault(group, []), self.recorded.get(group, []), sample_digest(sample)
        position, label = len(seen), f"sample {len(seen)}{f' of {group}' if group else ''} (id {sample.id!r})"
        if position < len(recorded) and recorded[position] != digest:
            raise self._differ(f"{label} differs in its id, question, answer or images")
        if position >= len(recorded) and self.complete:
            raise self._differ(f"{label} is one more than the {len(recorded)} recorded")
        seen.append(digest)

    def save(self, *, complete: bool = False) -> None:
        """Write the record when this run has read more samples than it holds (or read all of them); a record that
        another process (a shard) extended meanwhile is kept. Replaced whole and atomically, not appended to: the
        shards of a run write the same record at once (each reads every sample), and any write landing last leaves
        a whole record of a prefix of the data, where appends would interleave; it costs ~20 bytes a sample, once
        per generated chunk (a few ms for MathVision's 3040 samples, against seconds of generation per sample)."""
        on_disk = read_json(self.path, fix=_RECORD_FIX)
        longest = 0 if on_disk is None else sum(map(len, dict(on_disk.get("digests", {})).values()))
        read = sum(map(len, self.seen.values()))
        if read > longest or (complete and not self.complete and read >= longest):
            atomic_files.write_json(self.path, {"data": self.data, "digests": self.seen, "complete": complete},
                                    indent=None)
            self.recorded = {group: list(digests) for group, digests in self.seen.items()}
            self.complete, self.recorded_data = complete, self.data

    def finish(self, *, limit: int | None) -> None:
        """The run has read its last sample under ``limit`` (None: all). ValueError when the data ended before the
        recorded samples did; else the record is saved, complete when the data ended before the limit in every
        group (a group of exactly ``limit`` samples may have more)."""
        complete = limit is None or all(len(digests) < limit for digests in self.seen.values())
        short = [group for group, digests in self.recorded.items() if len(self.seen.get(group, [])) < len(digests)]
        if complete and short:
            group = short[0]
            of_group = f" of {group}" if group else ""
            raise self._differ(f"they end after {len(self.seen.get(group, []))} samples{of_group}, where the "
                               f"predictions were made from {len(self.recorded[group])} or more")
        self.save(complete=complete)
