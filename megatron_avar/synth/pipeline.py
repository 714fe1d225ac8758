"""Running a synthesis: output folder rules, executor choice, the Ray session, the manifest.

Resuming: a run writes ``<output.dir>/manifest.json`` last. Without it the run is unfinished and the same
command resumes it: shards are rewritten from scratch (deterministic names), and every teacher answer
already in the request cache (``<work_dir>/cache``) is reused, so nothing paid for is asked again. With it
the run is finished and is replaced only with ``output.overwrite=true``. The run it replaces is moved aside
into ``<output.dir>/.replaced`` (its manifest, then its shards) and deleted only once the new run has written its
own manifest: a replacing run that fails, or is killed, leaves the finished run it replaced there, whole.

One run at a time: a run holds the lock of its output.dir and of its work_dir (``training.run_lock``:
``.avar.lock``, dropped by the kernel however the run ends) from before it looks at either until it has
written its manifest; a second run on either is refused, naming the first.

Failed requests: a teacher stage whose every request failed (a server answering errors), or more than
``client.max_failed_share`` of whose requests failed, makes the run raise TeacherFailuresError after the
pipeline ends, before the manifest is written: the shards stay, the run counts as unfinished, and the same
command resumes it once the endpoint is fixed (without the check such a run "succeeded" with 0 records). A URL
where nothing listens stops the run sooner: the client raises TeacherConfigError when a request gives up on it
before any request of the run was answered (synth.client).

Ray: with RAY_ADDRESS set (a cluster started by slurm/synth.sh) the run joins that cluster and leaves it
running. Otherwise it starts a local Ray instance and stops it afterwards, also killing worker processes
that outlive `ray.shutdown()` (Xenna's NodeResourceMonitor actor does, docs/installation.md, 'Known dependency quirks').
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
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
from megatron_avar.synth.progress import ProgressMonitor, clear_progress, progress_dir, read_progress
from megatron_avar.synth.writer import merge_counts
from megatron_avar.training.run_lock import LOCK_FILE, holding_run_lock

logger = logging.getLogger("megatron_avar.synth")
MANIFEST = "manifest.json"
REPLACED = ".replaced"  # the finished run output.overwrite=true replaces, kept until the new one is finished


class TeacherFailuresError(RuntimeError):
    """Too many teacher requests failed for the run to count as done (module docstring); `avar synth` exits 1."""


def resolve_paths(config: SynthConfig) -> SynthConfig:
    """The config with every path absolute (stage workers may run elsewhere than the driver's cwd)."""
    sources = tuple(dataclasses.replace(s, path=str(Path(s.path).resolve())) for s in config.sources)
    output = dataclasses.replace(config.output, dir=str(Path(config.output.dir).resolve()))
    run = dataclasses.replace(config.run, work_dir=str(config.work_dir.resolve()))
    return dataclasses.replace(config, sources=sources, output=output, run=run)


def prepare_output(config: SynthConfig) -> None:
    """Apply the resume/overwrite rules (module docstring) and clear this run's progress files; under the run's
    locks (run_synthesis, which has refused an output.dir that is a file)."""
    out = Path(config.output.dir)
    progress = progress_dir(config.work_dir)
    clear_progress(progress, check_only=True)  # a folder of the user's named as run.work_dir: refused before any change
    if out.is_dir():
        # a kill while the manifest was being written leaves its temporary file: ours, and never a result
        atomic_files.remove_leftovers(out / MANIFEST)
        data = out / "data"
        foreign = sorted([p.name for p in out.iterdir() if p.name not in ("data", MANIFEST, LOCK_FILE, REPLACED)] +
                         [f"data/{p.name}" for p in (data.iterdir() if data.is_dir() else ())
                          if not fnmatch.fnmatch(p.name, "shard-*.parquet")
                          and not fnmatch.fnmatch(p.name, ".shard-*.parquet.*.tmp")])
        if foreign or (data.exists() and not data.is_dir()):
            raise ValueError(f"output.dir {out} holds {(foreign or ['data'])[:5]}, which avar synth did not write; "
                             "choose another output.dir")
        inside = [source.name for source in config.sources if Path(source.path).resolve().is_relative_to(out)]
        if inside:
            raise ValueError(f"the data of source(s) {inside} lies inside output.dir {out}, which a run replaces; "
                             "choose an output.dir apart from the sources")
        replaced = out / REPLACED
        if (out / MANIFEST).is_file():
            if replaced.exists():  # a finished replacement killed before it removed the run it replaced
                shutil.rmtree(replaced)
            if not config.output.overwrite:
                raise ValueError(f"output.dir {out} holds a finished run ({MANIFEST}); pass output.overwrite=true to "
                                 "replace it, or choose another output.dir")
            replaced.mkdir()
            (out / MANIFEST).rename(replaced / MANIFEST)  # first: out/ no longer looks finished
        if (replaced / MANIFEST).is_file():  # its shards follow (again, after a kill part-way through)
            _move_replaced_shards(out)
        if data.is_dir():  # holding only what the check above let through: an earlier run's shards
            for shard in data.iterdir():
                shard.unlink()
            data.rmdir()
    clear_progress(progress)
    progress.mkdir(parents=True, exist_ok=True)


def _move_replaced_shards(out: Path) -> None:
    """Move the shards the manifest in ``<out>/.replaced`` lists from ``<out>/data`` into ``<out>/.replaced/data``,
    those not there yet: one rename each, so a kill part-way leaves each shard in one place or the other, and the
    next start moves the rest. A shard of the new run never moves: its name is in .replaced already when the
    replaced run listed it (the move finished before the new run started)."""
    listed = json.loads((out / REPLACED / MANIFEST).read_text())["shards"]
    (out / REPLACED / "data").mkdir(exist_ok=True)
    for shard in listed:
        source, target = out / shard["file"], out / REPLACED / shard["file"]
        if source.is_file() and not target.exists():
            source.rename(target)


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
    with holding_run_lock(out, conflict=conflict), holding_run_lock(config.work_dir, conflict=conflict):
        prepare_output(config)
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
        atomic_files.write_json(out / MANIFEST, manifest, sort_keys=True)
        if (out / REPLACED).exists():  # the finished run this one replaced: now it is replaced
            shutil.rmtree(out / REPLACED)
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
    """Raise TeacherFailuresError when a teacher stage failed too often (module docstring). Shares are per
    stage, since each stage has its own endpoint: a dead anchor server must not hide behind a healthy
    describe server's successes."""
    limit = config.client.max_failed_share
    problems = []
    for stage, stats in manifest["teachers"].items():
        failed = stats.get("failures", 0)
        succeeded = stats.get("answered", 0) + stats.get("cache_hits", 0)
        total = failed + succeeded
        # Cached answers count as successes: on a resumed run they are most of the work, and a few requests
        # that fail again must stay acceptable through client.max_failed_share, as the message below promises.
        if not failed or (succeeded and failed <= limit * total):
            continue
        errors = stats.get("errors") or {}
        reason, count = max(errors.items(), key=lambda item: item[1]) if errors else ("unknown", failed)
        why = "every request failed" if not succeeded else f"more than client.max_failed_share={limit}"
        teacher = getattr(config, stage).teacher
        problems.append(f"{stage} teacher {teacher.model!r} at {chat_url(teacher)}: {failed} of {total} requests "
                        f"failed ({failed / total:.0%}; {why}); most common error ({count} of {failed}): {reason}")
    if problems:
        raise TeacherFailuresError(
            "; ".join(problems) + f". Kept {manifest['kept']} of {manifest['read']} records (shards in "
            f"{Path(config.output.dir) / 'data'}), but wrote no {MANIFEST}: the run is unfinished"
            + (f" (the finished run it replaces stays in {Path(config.output.dir) / REPLACED} until it finishes)"
               if (Path(config.output.dir) / REPLACED).is_dir() else "") + ". Once the endpoint "
            "answers (is its server up? are base_url and model right?), rerun the same command: it resumes, reusing "
            "every cached answer and asking only the failed requests again. To accept the loss instead, raise "
            "client.max_failed_share.")
