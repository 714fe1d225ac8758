"""The evaluation loop: generate per benchmark, append predictions as they come, score from the files.

Output folder (``--out``):
    run_config.json              model, its weights by content, generation config (a rerun must match them), and
                                 per benchmark the widest ``--limit`` of the runs that generated it; a folder holding
                                 eval's other outputs without it is not eval's and is refused (`run_folder`)
    predictions/<benchmark>.jsonl one line per sample: id, prompt (text, ``<image>`` marks), response, target,
                                 and the judgement at write time (answer_source, extracted, correct); with
                                 ``--judge``, a judged sample also its ``judge`` field (`megatron_avar.eval.judge`)
    predictions/<benchmark>.done.json  written when the run (or shard) generating that file has finished: every
                                 sample of its share has a prediction there or in another file of the benchmark;
                                 the benchmark's sample count under that run's limit (never narrowed by a later run)
    predictions/<benchmark>.samples.json  a digest of each sample the predictions were made from, in data order: a
                                 resume reading other data is refused (`run_folder.SampleRecord`)
    scores.json                  per-benchmark summaries (headline ``score``, failure rates, breakdowns; with
                                 ``--judge`` also ``with_judge`` and the judge's counts)
    results.md                   the results table with the paper's rows (see `megatron_avar.eval.report`)
    judge_cache/                 with ``--judge``: every judge reply, as it arrives (unless cache_dir says elsewhere)

Resuming: samples whose id is already in a predictions file of the benchmark are skipped (under any sharding: the
folder's files share model and settings), so an interrupted run continues where it stopped (a half-written last line
is dropped), and scoring reads each sample once. One process at a time generates into a predictions file
(`run_folder.holding_eval_lock`; each shard has its own). Scoring refuses a benchmark whose generation has not
finished — no run has finished its samples (under the widest ``limit`` of its runs), or the files hold fewer
predictions than those samples (a shard still running, stopped, or never run) — unless asked to score the part
(``--allow-partial``; the scores then say so). Scoring only reads: it never repairs a file a shard may be
writing. Scores are always recomputed from the stored responses of the whole file, so scoring the same file twice
gives the same numbers, and a rule change re-scores old runs without generating again.

Data parallelism: ``num_shards`` processes (e.g. one per GPU, via Slurm array tasks or ``CUDA_VISIBLE_DEVICES``)
with ``shard_index`` 0..N-1 share one ``--out``; each appends to ``predictions/<benchmark>.shard-<i>-of-<n>.jsonl``
and does not score; ``--score-only`` afterwards scores the union of the shard files.

Judging (``--judge FILE.yaml``) happens while scoring, once generation is done: the items of the run's benchmarks
(``--benchmarks``) that the rules could not read go to the judge, and the predictions files are rewritten
(atomically) with each judged record's ``judge`` field. Score only when no process still appends to them (a sharded
run: after every shard has finished). The folder's other finished benchmarks stay in scores.json and results.md as
they were, judge results included, and are never sent to the judge (`score_run`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatron_avar import atomic_files
from megatron_avar.eval.benchmarks import BENCHMARKS, get_benchmark
from megatron_avar.eval.benchmarks.base import Sample
from megatron_avar.eval.generation import (
    GenerationConfig,
    HFGenerator,
    PromptDoesNotFitError,
    applied_settings,
    make_generator,
)
from megatron_avar.eval.judge import AnswerJudge, JudgeConfig, load_judge_config
from megatron_avar.eval.run_folder import SampleRecord, check_eval_folder, holding_eval_lock, read_json, read_run_config
from megatron_avar.eval.vas import benchmark_vas, read_vas, vas_path, write_vas

__all__ = ["EvalConfig", "run_eval", "score_run", "read_predictions", "predictions_path", "prediction_files",
           "folder_benchmarks"]

ALL_BENCHMARKS = tuple(BENCHMARKS)
PREDICTION_KEYS = ("id", "response", "target")  # what scoring reads of each predictions record
_VLLM_CHUNK = 256  # prompts handed to vLLM at once (it schedules them itself); also the resume granularity


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run.

    out: output folder. model: HF checkpoint directory (None only to re-score existing predictions).
    benchmarks: CLI names (default: all seven, `megatron_avar.eval.benchmarks.BENCHMARKS`). data_root: the folder
    holding one subfolder per benchmark (`megatron_avar.eval.data`); allow_hub: also try the hub. limit: the first
    ``limit`` samples of each benchmark (None = all). mathvision_split: "test" (the paper's) or "testmini".
    num_shards / shard_index: data parallelism over processes (one per GPU or GPU group): shard i generates
    the samples at positions p with p % num_shards == i into its own predictions file; scoring reads all
    shard files (run ``--score-only`` once every shard has finished).
    vas_samples: also compute the model's VAS on the first N samples of each benchmark (0 = off; hf backend;
    written to vas/<benchmark>.json, reported beside the scores).
    judge: a judge config YAML (`megatron_avar.eval.judge.JudgeConfig`): after the rules, a chat model extracts
    the answers they could not read, and rule and rule+judge scores are both reported (None = rules only).
    """

    out: Path
    model: str | None = None
    benchmarks: tuple[str, ...] = ALL_BENCHMARKS
    data_root: Path | None = None
    allow_hub: bool = False
    limit: int | None = None
    mathvision_split: str = "test"
    num_shards: int = 1
    shard_index: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    vas_samples: int = 0
    judge: Path | None = None

    def __post_init__(self):
        # values from YAML arrive as str / list: normalise once (the dataclass is frozen afterwards)
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "data_root", None if self.data_root is None else Path(self.data_root))
        object.__setattr__(self, "judge", None if self.judge is None else Path(self.judge))
        object.__setattr__(self, "model", None if self.model is None else str(self.model))
        object.__setattr__(self, "benchmarks", tuple(self.benchmarks))
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", GenerationConfig(**self.generation))
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise ValueError(f"benchmarks {unknown or '(none)'} unknown; choose from {', '.join(BENCHMARKS)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"benchmarks lists a name twice: {', '.join(self.benchmarks)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all samples), got {self.limit}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards) and num_shards >= 1, got "
                             f"{self.shard_index} / {self.num_shards}")
        if self.vas_samples < 0:
            raise ValueError(f"vas_samples must be >= 0 (0 = off), got {self.vas_samples}")
        if self.vas_samples and self.generation.backend != "hf":
            raise ValueError("vas_samples needs the hf backend (attention masses come from the HF model); run VAS "
                             "in a separate `avar eval --backend hf --vas-samples N` or with `avar vas`")
        if self.mathvision_split not in ("test", "testmini"):
            raise ValueError(f"mathvision_split must be 'test' or 'testmini', got {self.mathvision_split!r}")


def read_predictions(path: Path, *, repair: bool = True) -> dict[str, dict]:
    """id -> record of a predictions file; a half-written last line (an interrupted run) is cut from the file,
    and a whole last line the write left without its newline gets one (the next record would be glued to it).
    Both repairs touch the file's end only: a kill during one loses nothing written before. ``repair=False``
    (scoring: another process may be appending) skips a half-written last line and leaves the file as it is. A
    malformed line elsewhere, or one without :data:`PREDICTION_KEYS`, is an error naming it."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")  # decoded line by line: a cut write may end inside a character (records keep UTF-8)
    records: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number == len(lines):  # no trailing newline: the write was interrupted (or is under way)
                if repair:
                    os.truncate(path, len(data) - len(line))
                    print(f"{path}: dropped a half-written last line", file=sys.stderr)
                break
            kind = "UTF-8" if isinstance(error, UnicodeDecodeError) else "JSON"
            raise ValueError(f"{path}:{number} is not valid {kind} ({error}); fix or delete that line") from error
        if number == len(lines) and repair:  # whole, but the newline was never written
            with path.open("a") as handle:
                handle.write("\n")
        missing = [key for key in PREDICTION_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(f"{path}:{number} lacks {', '.join(missing)} (a predictions record holds "
                             f"{', '.join(PREDICTION_KEYS)}); fix or delete that line")
        records[record["id"]] = record
    return records


def _checked_out(out: str | Path) -> Path:
    """``out`` as a Path; ValueError when it names a file (a run folder holds predictions/, scores, a report)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the evaluation's predictions and scores")
    return out


def predictions_path(out: Path, benchmark: str, config: EvalConfig) -> Path:
    """``predictions/<benchmark>.jsonl``, or ``<benchmark>.shard-<i>-of-<n>.jsonl`` for a sharded run."""
    suffix = "" if config.num_shards == 1 else f".shard-{config.shard_index}-of-{config.num_shards}"
    return out / "predictions" / f"{benchmark}{suffix}.jsonl"


def prediction_files(out: Path, benchmark: str, *, suffix: str = ".jsonl") -> list[Path]:
    """Every predictions file of ``benchmark`` in ``out`` (unsharded and shard files), sorted; with another
    ``suffix``, the files of that kind beside them (".done.json": their completion records)."""
    folder = out / "predictions"
    return sorted([*folder.glob(f"{benchmark}{suffix}"), *folder.glob(f"{benchmark}.shard-*-of-*{suffix}")])


def _done_path(predictions: Path) -> Path:
    """``<benchmark>[.shard-i-of-n].done.json`` beside a predictions file: a run generating it has finished."""
    return predictions.with_suffix(".done.json")


def _read_done(predictions: Path) -> dict | None:
    """The completion record of a predictions file (None: none); a damaged one is named with the fix."""
    return read_json(_done_path(predictions), fix=f"delete it and rerun the `avar eval` command that generated "
                                                  f"{predictions.name}: it generates what is missing and records it "
                                                  "again")


def _covers(limit: int | None, required: int | None) -> bool:
    """Whether a run over the first ``limit`` samples (None: all) covers the first ``required`` ones."""
    return limit is None or (required is not None and limit >= required)


def _record_finished(path: Path, samples: int, limit: int | None) -> None:
    """Record that a run with ``limit`` writing ``path`` has finished: every sample of its share has a prediction
    there or in another file of the benchmark (``samples``: the benchmark's samples under that limit); a record
    covering more samples stays (a shorter rerun narrows nothing). The predictions reach the disk before the record
    does."""
    if path.is_file():
        atomic_files.fsync_file(path)
    previous = _read_done(path)
    if previous is not None and _covers(previous.get("limit"), limit) and previous.get("samples", 0) >= samples:
        return
    atomic_files.write_json(_done_path(path), {"samples": samples, "limit": limit})


def _wider(limit: int | None, other: int | None) -> int | None:
    """The wider of two ``--limit`` values (None: every sample)."""
    return None if limit is None or other is None else max(limit, other)


def _holds_results(out: Path, name: str) -> bool:
    """Whether ``out`` holds predictions (or a VAS) of benchmark ``name``."""
    return bool(prediction_files(out, name)) or vas_path(out, name).is_file()


def _recorded_limits(run_config: dict | None, out: Path) -> dict[str, int | None]:
    """benchmark -> the ``--limit`` its predictions in ``out`` are of: the widest of the runs that generated it
    (None: every sample). A folder from before per-benchmark limits recorded one ``limit`` for all its benchmarks."""
    if run_config is None:
        return {}
    if "limits" in run_config:
        return dict(run_config["limits"])
    return {name: run_config.get("limit") for name in BENCHMARKS if _holds_results(out, name)}


def _finish_command(limit: int | None) -> str:
    return "`avar eval` without --limit" if limit is None else f"`avar eval --limit {limit}`"


def _unfinished(out: Path, name: str, files: list[Path], predicted: int) -> str | None:
    """What is unfinished about the predictions ``files`` of benchmark ``name`` (``predicted`` distinct samples in
    all), or None when its generation has finished: a run whose limit covers the benchmark's (run_config.json's
    ``limits``: the widest of its runs) has finished, and the files hold all of that run's samples. Leftover files
    of an unfinished run (another sharding, say) do not matter once the others hold every sample. A folder from
    before these records is not checked (run_config.json without ``records_completion``)."""
    run_config = read_run_config(out)
    if run_config is None or not run_config.get("records_completion"):
        return None
    # (a benchmark missing from ``limits`` has no record of its runs: it must hold every sample)
    required = _recorded_limits(run_config, out).get(name)
    # (every record: a run that found its share in the other files has finished without a file of its own)
    records = [record for path in prediction_files(out, name, suffix=".done.json")
               if (record := _read_done(path.with_suffix("").with_suffix(".jsonl")))]
    covering = [record["samples"] for record in records if _covers(record.get("limit"), required)]
    if not covering:
        wanted = "all its samples" if required is None else f"its first {required} samples"
        return (f"no run has finished generating {wanted} ({', '.join(path.name for path in files)}: a run still "
                f"generating, or one that stopped; {_finish_command(required)} finishes it)")
    if predicted < max(covering):
        return (f"{predicted} of its {max(covering)} samples have predictions (a shard still running, stopped, or "
                "never run)")
    return None


def folder_benchmarks(out: Path, *, allow_partial: bool = False) -> tuple[list[str], dict[str, str]]:
    """(benchmarks of ``out`` to score, {benchmark left out: why}): those with predictions whose generation has
    finished (``allow_partial``: every one with predictions)."""
    chosen, notes = [], {}
    for name in BENCHMARKS:
        files = prediction_files(out, name)
        if not files:
            continue
        predicted = len({key for path in files for key in read_predictions(path, repair=False)})
        unfinished = None if allow_partial else _unfinished(out, name, files, predicted)
        if unfinished is None:
            chosen.append(name)
        else:
            notes[name] = f"{name} left out of the scores: its generation has not finished ({unfinished})"
    return chosen, notes


def _check_run_config(out: Path, config: EvalConfig) -> Callable[[str], None]:
    """Record the run's model and generation settings; refuse to mix different ones in one folder. The recorded
    ``limits`` say what the folder holds of each benchmark: the widest limit of the runs that generated it, None once
    one ran every sample. Returns the function that widens a benchmark's to this run's: called before the run writes
    its first prediction or completion record of that benchmark, so that a run refused before (other data under
    --data-root, a model that does not load) leaves the folder's limits as they were, and its benchmarks finished."""
    from megatron_avar.analysis.model_loading import checkpoint_identity, weights_differ

    path = out / "run_config.json"
    # batch_size may change between greedy runs: greedy outputs do not depend on it (tested); sampled ones do.
    # max_model_len changes no response (a prompt that does not fit with max_new_tokens is refused, not cut)
    generation = {k: v for k, v in config.generation.to_dict().items()
                  if (k != "batch_size" or config.generation.do_sample) and k != "max_model_len"}
    previous = read_run_config(out)
    recorded_weights = previous.get("weights") if previous is not None else None
    recorded_weights = recorded_weights if isinstance(recorded_weights, dict) else None
    # the folder (however its path is spelt) and its weights, by content: a folder whose weights were replaced is
    # another model, a copy of them the same (the recorded hashes of files unchanged since are not read again)
    assert config.model is not None  # (run_eval checked it)
    current = {"model": str(config.model), "weights": checkpoint_identity(config.model, known=recorded_weights),
               "generation": generation, "mathvision_split": config.mathvision_split}
    # a run that stopped before its first prediction (a bad backend, a missing model) holds nothing to mix
    holding = {name for name in BENCHMARKS if _holds_results(out, name)}
    if previous is not None and holding:
        weights_gap = None if recorded_weights is None else weights_differ(recorded_weights, current["weights"])
        # the model folder by path, or anywhere once the weights are known by content (staged per Slurm task)
        by_content = recorded_weights is not None and "weights_sha256" in recorded_weights and weights_gap is None
        same = {"model": lambda old, new: by_content or Path(str(old)).resolve() == Path(new).resolve(),
                "weights": lambda old, new: weights_gap is None,  # (None recorded: before weights were)
                # a setting the run did not use (a greedy run's temperature, recorded before those were refused)
                "generation": lambda old, new: applied_settings(old or {}) == applied_settings(new)}
        mismatched = [k for k in current if not same.get(k, lambda old, new: old == new)(previous.get(k), current[k])]
        if mismatched:
            why = "" if weights_gap is None else f": {weights_gap}"
            raise ValueError(
                f"{out} holds predictions made with different {', '.join(mismatched)} ({path}{why}); resuming would "
                f"mix them. Use another --out, or delete {out} to start over")
        if not previous.get("records_completion"):  # a folder from before the records: its files stay unchecked
            for predictions in (out / "predictions").glob("*.jsonl"):
                if not _done_path(predictions).exists():
                    atomic_files.write_json(_done_path(predictions), {"samples": 0, "limit": previous.get("limit"),
                                                                      "recorded": "before completion records"})
    # scoring reads every stored record: a benchmark's limit is the widest of the runs that generated it. A
    # benchmark without results takes this run's at once; one with results keeps its own until widen() is called.
    held = {**_recorded_limits(previous if holding else None, out),
            **{name: config.limit for name in config.benchmarks if name not in holding}}

    def write(limits: dict[str, int | None]) -> None:
        # atomic: shards of one run write this file concurrently (with the same content). records_completion: each
        # predictions file has its .done.json once generated (a folder written before that is scored unchecked)
        atomic_files.write_json(path, {**current, "limits": limits, "records_completion": True})

    write(held)
    widened = {name for name in config.benchmarks if name in held and _wider(held[name], config.limit) == held[name]}

    def widen(name: str) -> None:
        if name in widened:
            return
        limits = _recorded_limits(read_run_config(out), out)  # (a shard may have widened one meanwhile)
        write({**limits, name: _wider(limits.get(name, config.limit), config.limit)})
        widened.add(name)

    return widen


def _data_source(config: EvalConfig) -> str:
    """Where a run reads its benchmarks, as the samples record names it."""
    if config.data_root is None:
        return "the hub"
    return f"--data-root {config.data_root.resolve()}" + (" (or the hub)" if config.allow_hub else "")


def _in_shard(position: int, config: EvalConfig) -> bool:
    """Whether the sample at ``position`` (data order) of a benchmark is this run's shard's to generate."""
    return position % config.num_shards == config.shard_index


def _predicted_ids(out: Path, name: str, path: Path, *, repair: bool) -> set[str]:
    """The samples of benchmark ``name`` with a prediction in any of its files in ``out``: this run's ``path``
    (repaired with ``repair``) and those of other shardings, which were made with the same model and settings
    (`_check_run_config`) and are only read (a shard may be appending to one)."""
    done = set(read_predictions(path, repair=repair))
    for other in prediction_files(out, name):
        if other != path:
            done.update(read_predictions(other, repair=False))
    return done


def _samples_to_generate(config: EvalConfig, out: Path) -> Iterator[tuple[str, Sample]]:
    """(benchmark name, sample) for each sample this run generates: in its shard, without a prediction yet. (Reads
    the data; the predictions files only.)"""
    for name in config.benchmarks:
        done = _predicted_ids(out, name, predictions_path(out, name, config), repair=False)
        benchmark = get_benchmark(name, mathvision_split=config.mathvision_split)
        for position, sample in enumerate(benchmark.samples(config.data_root, allow_hub=config.allow_hub,
                                                            limit=config.limit)):
            if _in_shard(position, config) and sample.id not in done:
                yield name, sample


def _generation_settings(config: EvalConfig, out: Path) -> GenerationConfig:
    """``config.generation`` as the generator is built with: for vLLM with ``max_model_len`` 0, that derived from the
    samples this run generates (`vllm_backend.needed_max_model_len`)."""
    generation = config.generation
    if generation.backend != "vllm" or generation.max_model_len:
        return generation
    from megatron_avar.eval.vllm_backend import needed_max_model_len

    assert config.model is not None  # (run_eval checked it)
    needed = needed_max_model_len(config.model, generation, _samples_to_generate(config, out))
    return dataclasses.replace(generation, max_model_len=needed)


def _generate_benchmark(benchmark, config: EvalConfig, get_generator, path: Path, widen_limit: Callable[[], None]
                        ) -> tuple[int, tuple[str, Exception] | None]:
    """Generate the samples of one benchmark in this run's shard that no predictions file of the folder holds (a
    resume under another sharding keeps what the others generated) into ``path``, then record that the run is
    finished (``_record_finished``); returns (how many were generated, the first (sample id, error) the rules
    failed on or None: every response is kept, and the failure reported once everything is generated). Every
    sample read is compared with those the folder's predictions were made from (``run_folder.SampleRecord``) before
    it is generated, and the record covers every sample before its prediction is appended. ``widen_limit``: from
    ``_check_run_config``, called before anything is written."""
    from tqdm import tqdm

    done = _predicted_ids(path.parent.parent, benchmark.name, path, repair=True)
    data_record = SampleRecord(path.parent / f"{benchmark.name}.samples.json", benchmark.name, _data_source(config))
    seen: set[str] = set()
    chunk_size = _VLLM_CHUNK if config.generation.backend == "vllm" else config.generation.batch_size
    pending, written = [], 0
    failed = None  # the first sample the rules failed on: reported once the benchmark is generated
    progress = tqdm(desc=benchmark.name, unit="sample", file=sys.stderr)

    def flush():
        nonlocal written, failed
        try:
            responses = get_generator().generate(pending)
        except PromptDoesNotFitError as error:  # (it names the sample)
            raise ValueError(f"{benchmark.name}: {error}") from None
        # (after generation, which may fail on a bad setting: nothing is written for nothing)
        widen_limit()
        data_record.save()
        with path.open("a") as handle:
            for sample, response in zip(pending, responses):
                record = {"id": sample.id, "prompt": sample.prompt_text, "response": response, "target": sample.target}
                try:
                    record.update(benchmark.evaluate(response, sample.target))
                except Exception as error:  # noqa: BLE001 — the response is kept whatever the rules do with it
                    failed = failed or (sample.id, error)
                    record["scoring_error"] = f"{type(error).__name__}: {error}"
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += len(pending)
        progress.update(len(pending))
        pending.clear()

    try:  # (closed either way: an error is then said on a line of its own, not after the bar)
        for position, sample in enumerate(benchmark.samples(config.data_root, allow_hub=config.allow_hub,
                                                            limit=config.limit)):
            if sample.id in seen:
                raise ValueError(f"{benchmark.name}: sample id {sample.id!r} occurs twice in the data; ids must be "
                                 "unique")
            seen.add(sample.id)
            data_record.check(sample, benchmark.limit_group(sample))
            if not _in_shard(position, config):
                continue
            if sample.id in done:
                progress.update(1)
                continue
            pending.append(sample)
            if len(pending) >= chunk_size:
                flush()
        if pending:
            flush()
    finally:
        progress.close()
    data_record.finish(limit=config.limit)
    widen_limit()
    _record_finished(path, len(seen), config.limit)
    return written, failed


def _rewrite_predictions(path: Path, records: dict[str, dict]) -> None:
    """Replace a predictions file by ``records`` (id -> record, in file order), atomically."""
    atomic_files.write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n"
                                          for record in records.values()))


def _read_benchmark(out: Path, name: str) -> tuple[dict[Path, dict[str, dict]], dict[str, dict], dict[str, Path]]:
    """(each predictions file of ``name`` -> its records, id -> record over all of them, id -> the file it was read
    from: the first file holding an id); ValueError when there are none. Only reads (a shard may be appending)."""
    files = {path: read_predictions(path, repair=False) for path in prediction_files(out, name)}
    records, home = {}, {}
    for path, file_records in files.items():
        for sample_id, record in file_records.items():
            if sample_id not in records:
                records[sample_id], home[sample_id] = record, path
    if not records:
        raise ValueError(f"no predictions for {name} in {out / 'predictions'}; run `avar eval --model ...` first")
    return files, records, home


def _ruled(benchmark, records: list[dict]) -> list[dict]:
    """`Benchmark.evaluate` of each stored response, with its target (what ``Benchmark.aggregate`` reads)."""
    return [{"target": r["target"], **benchmark.evaluate(r["response"], r["target"])} for r in records]


_JUDGE_FIELDS = ("with_judge", "judge")  # a benchmark summary's fields that come from the judge


def _kept_summary(out: Path, name: str, mathvision_split: str, previous: dict, judge: dict | None) -> dict:
    """The summary of a finished benchmark of ``out`` that this scoring was not asked for. It is scored by the rules
    from its predictions and never judged (the judge's requests cost money, and only the named benchmarks were asked
    for); when that equals its entry in the earlier scores.json (``previous``, `report.read_scores`) without the
    judge's fields, the entry is kept as it was, judge results included: unless ``judge`` (this scoring's judge's
    description, None: no judge) is another judge than the one that gave them. Where judge results are dropped (the
    predictions changed since, or another judge), a note says so."""
    from megatron_avar.eval.judge import same_judge

    _, records, _ = _read_benchmark(out, name)
    benchmark = get_benchmark(name, mathvision_split=mathvision_split)
    summary = benchmark.aggregate(_ruled(benchmark, list(records.values())))
    vas = read_vas(out, name)
    if vas is not None:
        summary["vas"] = vas
    entry = previous["benchmarks"].get(name) if previous else None
    if not isinstance(entry, dict):
        return summary
    again = f"`avar eval --score-only --benchmarks {name} --judge JUDGE.yaml` judges it"
    if {key: value for key, value in entry.items() if key not in _JUDGE_FIELDS} != json.loads(json.dumps(summary)):
        if any(key in entry for key in _JUDGE_FIELDS):
            print(f"{name}: its predictions changed since scores.json was written: reported with its rule score only "
                  f"({again})", file=sys.stderr)
        return summary
    earlier = previous.get("judge")
    another = not isinstance(earlier, dict) or (judge is not None and not same_judge(judge, earlier))
    if "with_judge" in entry and another:
        by = earlier.get("model") if isinstance(earlier, dict) else None
        print(f"{name}: its rule+judge score came from another judge ({by!r}) than this run's: reported with its rule "
              f"score only ({again} with this one)", file=sys.stderr)
        return summary
    return entry


def score_run(out: Path, benchmarks: tuple[str, ...], *, mathvision_split: str = "test",
              judge: JudgeConfig | None = None, allow_partial: bool = False) -> dict:
    """Score every predictions file of ``benchmarks`` in ``out``; write scores.json and results.md. With a
    ``judge``, also judge the rule failures of ``benchmarks`` (`megatron_avar.eval.judge`), record the judge's
    replies in the predictions files and report both scores; then raise JudgeFailuresError if too many judge
    requests failed. The folder's other benchmarks whose generation has finished stay in the report as the earlier
    scores.json had them, and are never judged (`_kept_summary`); its unfinished others are left out, saying so.
    A benchmark of ``benchmarks`` whose generation has not finished is refused (every one is checked before any is
    scored or judged), or with ``allow_partial`` scored with a ``partial`` note saying what is missing. The files are
    only read (a shard may still be appending), and rewritten only by the judge, which needs finished generation."""
    from megatron_avar.eval.report import read_scores, write_report

    out = _checked_out(out)
    check_eval_folder(out, generating=False)
    if judge is not None and allow_partial:
        raise ValueError("--judge records its replies by rewriting the predictions files, which a shard may still be "
                         "writing: judge once generation has finished (without --allow-partial)")
    finished, notes = folder_benchmarks(out)
    for name, note in notes.items():
        if name not in benchmarks:
            print(note, file=sys.stderr)
    read = {}
    for name in benchmarks:
        files, records, home = _read_benchmark(out, name)
        read[name] = files, records, home, _unfinished(out, name, list(files), len(records))
    unfinished = {name: gap for name, (*_, gap) in read.items() if gap is not None}
    if unfinished and not allow_partial:
        raise ValueError(f"generation has not finished in {out / 'predictions'}: "
                         + "; ".join(f"{name}: {gap}" for name, gap in unfinished.items())
                         + ". Scores now would be of part of a benchmark: finish it (the same `avar eval` command "
                           "resumes, each shard its own), or score the part with --allow-partial")
    answer_judge = None if judge is None else AnswerJudge(judge, out)
    summaries = {}
    for name, (files, records, home, gap) in read.items():
        benchmark = get_benchmark(name, mathvision_split=mathvision_split)
        ids, records = list(records), list(records.values())
        ruled = _ruled(benchmark, records)
        summaries[name] = benchmark.aggregate(ruled)
        if answer_judge is not None:
            with_judge, changed = answer_judge.judge_benchmark(benchmark, records, ruled)
            for path in {home[ids[index]] for index in changed}:  # records are the files' own dicts
                _rewrite_predictions(path, files[path])
            summaries[name]["with_judge"] = benchmark.aggregate(with_judge)
            summaries[name]["judge"] = answer_judge.counts[name]
        if gap is not None:
            summaries[name]["partial"] = gap
        vas = read_vas(out, name)
        if vas is not None:
            summaries[name]["vas"] = vas
    previous = read_scores(out)
    described = None if answer_judge is None else answer_judge.describe()
    for name in finished:
        if name not in benchmarks:
            summaries[name] = _kept_summary(out, name, mathvision_split, previous, described)
    if described is None and any("with_judge" in summary for summary in summaries.values()):
        described = previous["judge"]  # (a kept judged summary: _kept_summary checked that scores.json names it)
    run_config = read_run_config(out) or {}
    # the table's "first N samples" note: the widest limit of a scored benchmark that does not hold every sample
    limited = [limit for name, limit in _recorded_limits(run_config, out).items()
               if name in summaries and limit is not None]
    scores = write_report(out, summaries, {**run_config, "limit": max(limited, default=None)}, judge=described)
    if answer_judge is not None:
        answer_judge.check_failures()
    return scores


def run_eval(config: EvalConfig) -> dict | None:
    """Generate what is missing for every benchmark, then score all of them; returns the scores dict
    (None for one shard of a sharded run: score with `score_run` once all shards are done)."""
    if config.model is None:
        raise ValueError("a model directory is needed to generate (--model); use --score-only to re-score")
    from megatron_avar.analysis.model_loading import check_hf_checkpoint

    check_hf_checkpoint(config.model)  # (its weights identify the predictions of a folder: _check_run_config)
    # loaded first, so that a bad config or an unset key fails before hours of generation; a shard never judges
    judge = None if config.judge is None or config.num_shards > 1 else load_judge_config(config.judge)
    out = _checked_out(config.out)
    check_eval_folder(out, generating=True)
    with holding_eval_lock(out, num_shards=config.num_shards, shard_index=config.shard_index):
        return _run_locked(config, out, judge)


def _run_locked(config: EvalConfig, out: Path, judge: JudgeConfig | None) -> dict | None:
    """The body of :func:`run_eval` once ``out`` is checked and this run's predictions files are locked."""
    assert config.model is not None  # (run_eval checked it)
    model_dir = config.model
    widen = _check_run_config(out, config)
    (out / "predictions").mkdir(exist_ok=True)
    generator = None

    def get_generator():  # loaded only when something is left to generate
        nonlocal generator
        if generator is None:
            generator = make_generator(model_dir, _generation_settings(config, out))
        return generator

    failures = []  # (benchmark, path, (sample id, error)): reported once every benchmark is generated
    for name in config.benchmarks:
        benchmark = get_benchmark(name, mathvision_split=config.mathvision_split)
        path = predictions_path(out, name, config)
        written, failed = _generate_benchmark(benchmark, config, get_generator, path, functools.partial(widen, name))
        print(f"{name}: {written} new predictions", file=sys.stderr)
        if failed is not None:
            failures.append((name, path, failed))
        if not config.vas_samples or config.shard_index != 0:
            continue
        limit = config.vas_samples if config.limit is None else min(config.limit, config.vas_samples)
        # kept on a rerun asking for the same samples; another --vas-samples (or --limit) computes it again
        if (read_vas(out, name) or {}).get("requested_samples") != limit:
            samples = list(benchmark.samples(config.data_root, allow_hub=config.allow_hub, limit=limit))
            hf = get_generator()
            assert isinstance(hf, HFGenerator), "EvalConfig allows vas_samples with the hf backend only"
            write_vas(out, name, {**benchmark_vas(hf.model, hf.processor, samples,
                                                  batch_size=config.generation.batch_size, device=hf.device),
                                  "requested_samples": limit})
    if failures:
        name, path, (sample_id, error) = failures[0]
        others = "" if len(failures) == 1 else f" (and in {', '.join(f[0] for f in failures[1:])})"
        raise ValueError(f"{name}: scoring sample {sample_id!r} failed ({type(error).__name__}: {error}){others}; "
                         f"every response is saved in {path}: after a fix, `avar eval --score-only` scores the stored "
                         "responses without generating them again") from error
    if config.num_shards > 1:
        return None
    return score_run(out, config.benchmarks, mathvision_split=config.mathvision_split, judge=judge)
