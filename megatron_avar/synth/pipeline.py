"""Running a synthesis: output folder rules, executor choice, the Ray session, the manifest.

Output folder rules (resuming, overwriting, what makes a rerun the same run): synth.output_dir.

One run at a time: a run holds the lock of its output.dir and of its work_dir (``training.run_lock``:
``.avar.lock``, dropped by the kernel however the run ends) from before it changes either until it has
written its manifest; a second run on either is refused, naming the first. Every refusal comes first, from a
look that changes nothing (a foreign output.dir keeps no lock file, and no ``<output.dir>.work`` is made), and
is made again under the locks; the existing folders are locked first, so a refusal by a lock makes nothing.

Failed requests and unusable answers: a teacher stage none of whose questions (a record's or candidate's
request with its format retries) got a usable answer, or more than ``client.max_failed_share`` of whose
questions failed for good or were answered malformed every time, makes the run raise TeacherFailuresError
after the pipeline ends, before the manifest is written, naming the stage, the most common error and the most
common malformation with an example reply: the shards stay, the run counts as unfinished, and it resumes once
the endpoint is fixed (malformed answers are cached: more client.format_retries, or another teacher). A run that
keeps no record at all raises NothingKeptError the same way (a manifest over no data/ folder would only fail the
next step). Without these checks such runs "succeeded" with 0 records. A URL where nothing listens stops the run
sooner: the client raises TeacherConfigError when a request gives up on it before any request of the run was
answered (synth.client).

Ray: with RAY_ADDRESS set (a cluster started by slurm/synth.sh) the run joins that cluster and leaves it
running. Otherwise it starts a local Ray instance and stops it afterwards, also killing worker processes
that outlive `ray.shutdown()` (Xenna's NodeResourceMonitor actor does, docs/installation.md, 'Known dependency quirks').
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from megatron_avar import atomic_files
from megatron_avar.config import config_to_dict
from megatron_avar.synth.client import TeacherConfigError, chat_url
from megatron_avar.synth.config import SynthConfig
from megatron_avar.synth.output_dir import MANIFEST, REPLACED, RUN_RECORD, prepare_output
from megatron_avar.synth.progress import ProgressMonitor, progress_dir, read_progress
from megatron_avar.synth.writer import merge_counts
from megatron_avar.training.run_lock import holding_run_lock

logger = logging.getLogger("megatron_avar.synth")


class SynthRunError(RuntimeError):
    """The pipeline ran, but its result does not count as done: no manifest is written, the run stays unfinished
    (module docstring); `avar synth` exits 1."""


class TeacherFailuresError(SynthRunError):
    """Too many of a teacher stage's requests failed or were answered malformed (module docstring)."""


class NothingKeptError(SynthRunError):
    """Every record was dropped: there is no dataset to write (module docstring)."""


def resolve_paths(config: SynthConfig) -> SynthConfig:
    """The config with every path absolute (stage workers may run elsewhere than the driver's cwd)."""
    sources = tuple(dataclasses.replace(s, path=str(Path(s.path).resolve())) for s in config.sources)
    output = dataclasses.replace(config.output, dir=str(Path(config.output.dir).resolve()))
    run = dataclasses.replace(config.run, work_dir=str(config.work_dir.resolve()))
    return dataclasses.replace(config, sources=sources, output=output, run=run)


def _ray_worker_pids(raylet_pids: set[int]) -> list:
    """Live processes spawned under one of our raylets (Ray puts RAY_RAYLET_PID in their environment)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and \
                    int(process.environ().get("RAY_RAYLET_PID", -1)) in raylet_pids:
                found.append(process)
        except (psutil.Error, ValueError, OSError):
            continue
    return found


@contextlib.contextmanager
def ray_session(config: SynthConfig):
    """Join the cluster at RAY_ADDRESS, or start (and afterwards stop, without leftovers) a local one."""
    import psutil
    import ray

    if os.environ.get("RAY_ADDRESS"):
        yield
        return
    num_cpus = config.run.ray_num_cpus or max(8, os.cpu_count() or 1)
    # The dashboard stays on: Xenna lists actors through its state API.
    ray.init(num_cpus=num_cpus, logging_level=logging.WARNING)
    raylets = {p.pid for p in psutil.Process().children(recursive=True) if p.name() == "raylet"}
    try:
        yield
    finally:
        ray.shutdown()
        # Several rounds: a worker's own children (e.g. a multiprocessing forkserver) can appear late.
        for _ in range(3):
            leftovers = _ray_worker_pids(raylets) if raylets else []
            if not leftovers:
                break
            logger.info("synth: stopping %d Ray worker process(es) left after ray.shutdown()", len(leftovers))
            for process in leftovers:
                with contextlib.suppress(psutil.Error):
                    process.terminate()
            _, alive = psutil.wait_procs(leftovers, timeout=5)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            time.sleep(1)


def run_local(stages) -> list:
    """Run the stages in this process, one after the other over all tasks (no Ray): what the Curator
    executors do, minus the distribution. For debugging and tests."""
    from nemo_curator.tasks import EmptyTask

    tasks = [EmptyTask()]
    for stage in stages:
        stage.setup()
        outputs = []
        for task in tasks:
            result = stage.process(task)
            outputs.extend(result if isinstance(result, list) else [] if result is None else [result])
        stage.teardown()
        tasks = outputs
    return tasks


@contextlib.contextmanager
def _naming_the_replaced_run(out: Path):
    """A stage's bad-input error (a teacher where nothing listens, a missing column) in a run that replaces a
    finished one says where that run is kept: ``<out>/.replaced``, until a run finishes."""
    try:
        yield
    except ValueError as error:
        replaced = out / REPLACED
        if type(error) not in (ValueError, TeacherConfigError) or not replaced.is_dir():
            raise
        raise type(error)(f"{error} (the finished run this one replaces stays in {replaced} until a run "
                          "finishes)") from error


@contextlib.contextmanager
def _stage_errors_unwrapped():
    """A stage's bad-input error (ValueError: a missing column, a teacher that refuses every request, an image
    the writer cannot read) reaches the caller as itself, with its message naming the problem and the fix, not
    as Ray's task error around a remote traceback. Ray Data raises a worker's original exception only when told
    to (DataContext.raise_original_map_exception, else a UserCodeException that drops it); Ray then wraps it
    in a RayTaskError, whose ``cause`` is the original."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.raise_original_map_exception
    context.raise_original_map_exception = True
    try:
        yield
    except Exception as error:
        original = _stage_error(error)
        if original is None:
            raise
        raise original.with_traceback(original.__traceback__) from original.__cause__
    finally:
        context.raise_original_map_exception = before


def _stage_error(error: BaseException) -> ValueError | None:
    """The first ValueError that is not one of Ray's own wrappers among ``error``'s causes (Ray's ``cause``,
    Python's ``__cause__``), or None."""
    from ray.exceptions import RayError

    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        current = stack.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ValueError) and not isinstance(current, RayError):
            return current
        stack += [e for e in (getattr(current, "cause", None), current.__cause__) if isinstance(e, BaseException)]
    return None


def _executor(config: SynthConfig):
    if config.run.executor == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        # Streaming mode refuses to start on a 2-core machine; batch mode runs anywhere
        # (docs/installation.md, 'Known dependency quirks').
        return XennaExecutor(config={"execution_mode": "batch", "logging_interval": config.run.progress_interval_s})
    from nemo_curator.backends.ray_data import RayDataExecutor

    return RayDataExecutor()


def run_synthesis(config: SynthConfig) -> dict:
    """Run the whole pipeline; returns the manifest (also written to <output.dir>/manifest.json)."""
    try:
        from nemo_curator.pipeline import Pipeline
    except ImportError as error:
        raise ValueError(f"avar synth needs NeMo Curator ({error}); install it with "
                         "pip install -e '.[synth]'") from None
    from megatron_avar.synth.stages import build_stages

    config = resolve_paths(config)
    conflict = ("two syntheses on one output.dir or run.work_dir would delete and overwrite each other's shards "
                "and progress. Wait for that run to end (or stop it), or choose another output.dir and run.work_dir")
    out = Path(config.output.dir)
    for key, path in (("output.dir", out), ("run.work_dir", config.work_dir)):
        if path.exists() and not path.is_dir():  # (before the lock, which would make the folder)
            raise ValueError(f"{key} {path} exists and is not a folder; choose another {key}")
    prepare_output(config, check_only=True)  # every refusal before a lock makes its folder and lock file
    with contextlib.ExitStack() as locks:
        # The existing folders first: a missing one has no holder (a holder makes it), so a refusal by a lock
        # comes before this run has made anything (sorted() keeps output.dir first when both exist).
        for folder in sorted((out, config.work_dir), key=lambda folder: not folder.exists()):
            locks.enter_context(holding_run_lock(folder, conflict=conflict))
        prepare_output(config)  # again under the locks, now acting: another run may have changed the folders
        stages = build_stages(config)
        started = time.time()
        teacher_stages = tuple(stage.name for stage in stages if getattr(stage, "teacher_stage", None))
        with ProgressMonitor(progress_dir(config.work_dir), config.run.progress_interval_s, teacher_stages), \
                _naming_the_replaced_run(out):
            if config.run.executor == "local":
                results = run_local(stages)
            else:
                with ray_session(config), _stage_errors_unwrapped():
                    pipeline = Pipeline(name="avar_synth", description="AVAR visual-anchored reflection data",
                                        stages=stages)
                    results = pipeline.run(executor=_executor(config))
        if results is None:  # NeMo Curator's run() is typed Optional; its executors return the last stage's tasks
            raise RuntimeError("NeMo Curator's pipeline returned no tasks; expected the writer stage's output")
        manifest = build_manifest(config, results, time.time() - started)
        check_teacher_failures(config, manifest)
        check_records_kept(config, manifest)
        atomic_files.write_json(out / MANIFEST, manifest, sort_keys=True)
        if (out / REPLACED).exists():  # the finished run this one replaced: now it is replaced
            shutil.rmtree(out / REPLACED)
        (out / RUN_RECORD).unlink(missing_ok=True)  # finished: the manifest holds the whole config
    logger.info("synth: kept %d of %d records; output %s", manifest["kept"], manifest["read"], out / "data")
    return manifest


def build_manifest(config: SynthConfig, results: list, elapsed_s: float) -> dict:
    shards, parts = [], []
    for task in results:
        for row in task.to_pyarrow().to_pylist():
            parts.append(json.loads(row["counts"]))
            if row["shard"] is not None:
                shards.append({"file": f"data/{row['shard']}", "records": row["records"]})
    sources = merge_counts(parts)
    filters: dict[str, int] = {}
    for source in sources.values():
        for reason, count in source["dropped"].items():
            filters[reason] = filters.get(reason, 0) + count
    progress = read_progress(progress_dir(config.work_dir))
    teachers = {stage: totals["client"] for stage, totals in progress.items() if totals["client"]}
    return {
        "read": sum(s["read"] for s in sources.values()),
        "kept": sum(s["kept"] for s in sources.values()),
        "sources": sources,
        "filters": dict(sorted(filters.items())),
        "shards": sorted(shards, key=lambda s: s["file"]),
        "teachers": teachers,
        "tokens": {"spent": sum(s["tokens_spent"] for s in sources.values()),
                   "cached": sum(s["tokens_cached"] for s in sources.values())},
        "elapsed_s": round(elapsed_s, 3),
        "config": config_to_dict(config),  # env var names only, no secrets
    }


def check_teacher_failures(config: SynthConfig, manifest: dict) -> None:
    """Raise TeacherFailuresError when a teacher stage's requests too often got no usable answer: failed for
    good, or answered malformed every time (module docstring). Shares are per stage, since each stage has its
    own endpoint: a dead anchor server must not hide behind a healthy describe server's successes."""
    problems = {stage: problem for stage, stats in manifest["teachers"].items()
                if (problem := _stage_problem(config, stage, stats)) is not None}
    if not problems:
        return
    advice = []
    if any(manifest["teachers"][stage].get("failures") for stage in problems):
        advice.append("Once the endpoint answers (is its server up? are base_url and model right?), rerun the same "
                      "command: it resumes, reusing every cached answer and asking only the failed requests again.")
    if any(manifest["teachers"][stage].get("malformed") for stage in problems):
        advice.append("Malformed answers are cached, so the same command gets them again: raise client.format_retries "
                      "(each retry asks with a new seed; the run resumes from the cache), or make the teacher answer "
                      "in the form asked for (the model the stage needs? enough max_tokens?) and rerun.")
    advice.append("A changed teacher model or sampling setting makes another run: add output.overwrite=true to "
                  "replace this one (its cached answers stay in the request cache).")
    kept = (f"Kept {manifest['kept']} of {manifest['read']} records (shards in {Path(config.output.dir) / 'data'}), "
            if manifest["kept"] else f"Kept 0 of {manifest['read']} records, ")
    raise TeacherFailuresError("; ".join(problems.values()) + f". {kept}but {_unfinished(config)} " + " ".join(advice)
                               + " To accept the loss instead, raise client.max_failed_share.")


def _stage_problem(config: SynthConfig, stage: str, stats: dict) -> str | None:
    """What is wrong with one teacher stage's answers (its client counters, summed over workers), or None.

    A request here is one record's or candidate's question with its format retries: usable, malformed every time,
    or failed for good. Cached answers count as usable: on a resumed run they are most of the work, and a few
    requests that fail again must stay acceptable through client.max_failed_share, as the error promises."""
    limit = config.client.max_failed_share
    failed, malformed, usable = stats.get("failures", 0), stats.get("malformed", 0), stats.get("usable", 0)
    lost = failed + malformed
    total = usable + lost
    if not lost or (usable and lost <= limit * total):
        return None
    what = [f"{failed} of {total} requests failed"] if failed else []
    if malformed:
        what.append(f"{malformed} {'' if failed else f'of {total} requests '}got only malformed answers "
                    f"(client.format_retries={config.client.format_retries})")
    why = (f"more than client.max_failed_share={limit}" if usable else "every request failed" if not malformed
           else "every answer was malformed" if not failed else "none usable")
    details = []
    if failed:
        reason, count = max((stats.get("errors") or {"unknown": failed}).items(), key=lambda item: item[1])
        details.append(f"most common error ({count} of {failed}): {reason}")
    if malformed:
        reason, count = max((stats.get("malformed_reasons") or {"unknown": malformed}).items(),
                            key=lambda item: item[1])
        example = (stats.get("malformed_examples") or {}).get(reason, "")
        details.append(f"most common malformation ({count} of {malformed}): {reason}, e.g. the reply "
                       f"{example[:100]!r}{'…' * (len(example) > 100)}")
    teacher = getattr(config, stage).teacher
    return (f"{stage} teacher {teacher.model!r} at {chat_url(teacher)}: {' and '.join(what)} ({lost / total:.0%}; "
            f"{why}); " + "; ".join(details))


def check_records_kept(config: SynthConfig, manifest: dict) -> None:
    """Raise NothingKeptError when the run kept no record: a finished run with no data/ folder would only fail
    the next step ("data path not found"), so it does not count as finished (module docstring)."""
    if manifest["kept"]:
        return
    drops = ", ".join(f"{reason}: {count}" for reason, count in
                      sorted(manifest["filters"].items(), key=lambda item: -item[1]))
    raise NothingKeptError(
        f"kept 0 of {manifest['read']} records ({drops}): there is no dataset to write, so it {_unfinished(config)} "
        "Each drop reason names the stage that dropped the records (verify.wrong_answer: the teachers' final answers "
        "differ from the sources' ground truth: check the sources' answer column and the teachers); change what "
        "dropped them and rerun (cached teacher answers are reused).")


def _unfinished(config: SynthConfig) -> str:
    """What a failed run's error says it left: no manifest, and the finished run it replaces, if any."""
    out = Path(config.output.dir)
    replaced = (f" (the finished run it replaces stays in {out / REPLACED} until a run finishes)"
                if (out / REPLACED).is_dir() else "")
    return f"wrote no {MANIFEST}: the run is unfinished{replaced}."
