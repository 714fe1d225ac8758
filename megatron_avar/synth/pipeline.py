"""Running a synthesis: output folder rules, executor choice, the Ray session, the manifest.

Resuming: a run writes ``<output.dir>/manifest.json`` last. Without it the run is unfinished and the same
command resumes it: shards are rewritten from scratch (deterministic names), and every teacher answer
already in the request cache (``<work_dir>/cache``) is reused, so nothing paid for is asked again. With it
the run is finished and is replaced only with ``output.overwrite=true``.

Ray: with RAY_ADDRESS set (a cluster started by slurm/synth.sh) the run joins that cluster and leaves it
running. Otherwise it starts a local Ray instance and stops it afterwards, also killing worker processes
that outlive `ray.shutdown()` (Xenna's NodeResourceMonitor actor does, ENVIRONMENT.md).
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

from megatron_avar.synth.config import SynthConfig, to_dict
from megatron_avar.synth.progress import ProgressMonitor, read_progress
from megatron_avar.synth.writer import merge_counts

logger = logging.getLogger("megatron_avar.synth")
MANIFEST = "manifest.json"


def resolve_paths(config: SynthConfig) -> SynthConfig:
    """The config with every path absolute (stage workers may run elsewhere than the driver's cwd)."""
    sources = tuple(dataclasses.replace(s, path=str(Path(s.path).resolve())) for s in config.sources)
    output = dataclasses.replace(config.output, dir=str(Path(config.output.dir).resolve()))
    run = dataclasses.replace(config.run, work_dir=str(config.work_dir.resolve()))
    return dataclasses.replace(config, sources=sources, output=output, run=run)


def prepare_output(config: SynthConfig) -> None:
    """Apply the resume/overwrite rules (module docstring) and clear this run's progress files."""
    out = Path(config.output.dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output.dir {out} exists and is not a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ("data", MANIFEST))
        if foreign:
            raise ValueError(f"output.dir {out} holds {foreign[:5]}, which avar synth did not write; choose another output.dir")
        if (out / MANIFEST).is_file():
            if not config.output.overwrite:
                raise ValueError(f"output.dir {out} holds a finished run ({MANIFEST}); pass output.overwrite=true to "
                                 "replace it, or choose another output.dir")
            (out / MANIFEST).unlink()
        shutil.rmtree(out / "data", ignore_errors=True)
    progress = config.work_dir / "progress"
    shutil.rmtree(progress, ignore_errors=True)
    progress.mkdir(parents=True, exist_ok=True)


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


def _executor(config: SynthConfig):
    if config.run.executor == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        # Streaming mode refuses to start on a 2-core machine; batch mode runs anywhere (ENVIRONMENT.md).
        return XennaExecutor(config={"execution_mode": "batch", "logging_interval": config.run.progress_interval_s})
    from nemo_curator.backends.ray_data import RayDataExecutor

    return RayDataExecutor()


def run_synthesis(config: SynthConfig) -> dict:
    """Run the whole pipeline; returns the manifest (also written to <output.dir>/manifest.json)."""
    try:
        from nemo_curator.pipeline import Pipeline
    except ImportError as error:
        raise ValueError(f"avar synth needs NeMo Curator ({error}); install it with pip install -e '.[synth]'") from None
    from megatron_avar.synth.stages import build_stages

    config = resolve_paths(config)
    prepare_output(config)
    stages = build_stages(config)
    started = time.time()
    teacher_stages = tuple(stage.name for stage in stages if getattr(stage, "teacher_stage", None))
    with ProgressMonitor(config.work_dir / "progress", config.run.progress_interval_s, teacher_stages):
        if config.run.executor == "local":
            results = run_local(stages)
        else:
            with ray_session(config):
                pipeline = Pipeline(name="avar_synth", description="AVAR visual-anchored reflection data", stages=stages)
                results = pipeline.run(executor=_executor(config))
    manifest = build_manifest(config, results, time.time() - started)
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
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
    progress = read_progress(config.work_dir / "progress")
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
        "config": to_dict(config),
    }
