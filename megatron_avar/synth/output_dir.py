"""The output folder of `avar synth`: what a run finds there, what it may replace, and how a rerun resumes.

Resuming: a run writes ``<output.dir>/manifest.json`` last. Without it the run is unfinished (the data loader
refuses its shards while its RUN_RECORD is there: megatron_avar.data.synth_output, the home of both file names)
and the same command resumes it: shards are rewritten from scratch (deterministic names), and every teacher answer
already in the request cache (``<work_dir>/cache``) is reused, so nothing paid for is asked again. With it
the run is finished and is replaced only with ``output.overwrite=true``. The run it replaces is moved aside
into ``<output.dir>/.replaced`` (its manifest, then its shards) and deleted only once the new run has written its
own manifest: a replacing run that fails, or is killed, leaves the finished run it replaced there, whole.

The same command: a run records the settings that decide what it writes (`run_identity`: sources, read,
the describe/reason/anchor teachers' model and sampling and their stages' settings, verify, output.system_prompt,
run.prompt_version) in ``<output.dir>/.synth_run.json`` before it changes anything there, and removes the file
once finished. Settings of how the run goes do not count (client.*: concurrency, timeouts, retries, format
retries, max_failed_share; the teachers' base_url and api_key_env; run.executor, batch_records, work_dir,
progress_interval_s, ray_num_cpus): a resume may change them. A rerun with other settings over an unfinished
run that has written shards (or moved a finished run aside) is refused, naming the settings that differ,
unless ``output.overwrite=true``, which means "replace what output.dir holds": an unfinished run's shards are
deleted (its teacher answers stay in its request cache), a finished run is moved aside as above. An unfinished
run that has written nothing is simply started over with the new settings.

The rules are applied by `prepare_output`, under the run's locks (synth.pipeline.run_synthesis), after the
same function has made every refusal once with ``check_only`` (changing nothing) before the locks are taken.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import time
from pathlib import Path

from megatron_avar import atomic_files
from megatron_avar.config import config_to_dict
from megatron_avar.data.synth_output import MANIFEST, RUN_RECORD
from megatron_avar.synth.config import SynthConfig
from megatron_avar.synth.progress import clear_progress, progress_dir
from megatron_avar.training.run_lock import LOCK_FILE

REPLACED = ".replaced"  # the finished run output.overwrite=true replaces, kept until the new one is finished

# Settings that do not decide what a run writes (module docstring), as dotted keys of config_to_dict: how
# requests are sent, where teachers are served, how the run is executed and reported. Every other setting,
# a new one included, identifies the run.
NOT_IDENTIFYING = ("client.*", "*.teacher.base_url", "*.teacher.api_key_env", "output.dir", "output.overwrite",
                   "run.executor", "run.batch_records", "run.work_dir", "run.progress_interval_s", "run.ray_num_cpus")


def run_identity(config: SynthConfig) -> dict:
    """The settings that decide what the run writes, as {dotted key: value} (lists by index: ``sources.0.path``);
    a switched-off stage's other settings do not count. Paths as given (run_synthesis resolves them first)."""
    flat: dict = {}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{prefix}.{key}", item)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                add(f"{prefix}.{index}", item)
        else:
            flat[prefix] = value

    for key, value in config_to_dict(config).items():
        add(key, value)
    off = [f"{stage}.*" for stage in ("describe", "anchor") if not getattr(config, stage).enabled]
    ignored = [*NOT_IDENTIFYING, *off]
    return {key: value for key, value in flat.items()
            if key in ("describe.enabled", "anchor.enabled") or not any(fnmatch.fnmatch(key, p) for p in ignored)}


def _read_json(path: Path) -> dict | None:
    """A JSON object of ours, or None when it is absent or unreadable (a concurrent run may be replacing it)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _unfinished_work(out: Path) -> list[str]:
    """What an unfinished run in ``out`` has done that a run of other settings would undo: its shards (those in
    data/ that the finished run it replaces does not list) and that finished run, moved aside to .replaced."""
    replaced = _read_json(out / REPLACED / MANIFEST) or {}
    listed = {shard["file"] for shard in replaced.get("shards", [])}
    data = out / "data"
    shards = [p for p in (data.iterdir() if data.is_dir() else ()) if fnmatch.fnmatch(p.name, "shard-*.parquet")
              and f"data/{p.name}" not in listed]
    done = [f"{len(shards)} shard(s) in data/"] if shards else []
    return done + ([f"the finished run it replaces, kept in {REPLACED}/"] if (out / REPLACED).exists() else [])


def _check_same_run(config: SynthConfig, out: Path) -> None:
    """ValueError when ``out`` holds an unfinished run whose recorded settings (RUN_RECORD) are not ``config``'s
    and which has done work a rerun would undo, unless output.overwrite=true consents (module docstring)."""
    done = _unfinished_work(out)
    if not done or config.output.overwrite:
        return
    record = _read_json(out / RUN_RECORD)
    ways = (f"pass output.overwrite=true to replace it (teacher answers stay in the request cache, "
            f"{config.work_dir / 'cache'}), or choose another output.dir")
    if record is None or not isinstance(record.get("identity"), dict):
        raise ValueError(f"output.dir {out} holds an unfinished run ({', '.join(done)}) without a readable "
                         f"{RUN_RECORD} (started by an earlier avar synth, or the file was removed), so whether this "
                         f"run's settings are its own cannot be told: {ways}")
    recorded, current = record["identity"], run_identity(config)
    differing = [key for key in sorted(set(recorded) | set(current))
                 if recorded.get(key, _UNSET) != current.get(key, _UNSET)]
    if not differing:
        return
    shown = "; ".join(f"{key}: {_short(recorded.get(key, _UNSET))} (that run) vs {_short(current.get(key, _UNSET))} "
                      "(this one)" for key in differing[:4]) + (f"; and {len(differing) - 4} more"
                                                                 if len(differing) > 4 else "")
    raise ValueError(f"output.dir {out} holds an unfinished run ({', '.join(done)}) with other settings: {shown}. "
                     f"Rerun with that run's settings to resume it, {ways}")


_UNSET = object()  # a setting one of two runs does not have (a source more, an extra_body key)


def _short(value, limit: int = 60) -> str:
    text = "(unset)" if value is _UNSET else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def prepare_output(config: SynthConfig, *, check_only: bool = False) -> None:
    """Apply the resume/overwrite rules (module docstring), record the run's settings (RUN_RECORD) and clear its
    progress files; under the run's locks (run_synthesis, which has refused an output.dir that is a file).
    ``check_only``: make every refusal, but change nothing (run_synthesis calls it so before taking the locks,
    which create their folders and lock files: a refused run leaves no trace)."""
    out = Path(config.output.dir)
    progress = progress_dir(config.work_dir)
    clear_progress(progress, check_only=True)  # a folder of the user's named as run.work_dir: refused before any change
    if out.is_dir():
        if not check_only:
            # a kill while the manifest or the record was being written leaves its temporary file: ours, no result
            atomic_files.remove_leftovers(out / MANIFEST)
            atomic_files.remove_leftovers(out / RUN_RECORD)
        data = out / "data"
        leftovers = (f".{MANIFEST}.*.tmp", f".{RUN_RECORD}.*.tmp")
        foreign = sorted([p.name for p in out.iterdir() if p.name not in ("data", MANIFEST, LOCK_FILE, REPLACED,
                                                                            RUN_RECORD)
                          and not any(fnmatch.fnmatch(p.name, pattern) for pattern in leftovers)] +
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
            if not check_only:  # a finished run killed before it removed the run it replaced, or its record
                if replaced.exists():
                    shutil.rmtree(replaced)
                (out / RUN_RECORD).unlink(missing_ok=True)
            if not config.output.overwrite:
                raise ValueError(f"output.dir {out} holds a finished run ({MANIFEST}); pass output.overwrite=true to "
                                 "replace it, or choose another output.dir")
            if check_only:
                return
            _record_run(config, out)  # first: a kill from here on leaves a run of these settings, unfinished
            replaced.mkdir()
            (out / MANIFEST).rename(replaced / MANIFEST)  # first: out/ no longer looks finished
        else:
            _check_same_run(config, out)
            if check_only:
                return
            _record_run(config, out)
        if (replaced / MANIFEST).is_file():  # its shards follow (again, after a kill part-way through)
            _move_replaced_shards(out)
        if data.is_dir():  # holding only what the check above let through: an earlier run's shards
            for shard in data.iterdir():
                shard.unlink()
            data.rmdir()
    elif not check_only:
        _record_run(config, out)
    if check_only:
        return
    clear_progress(progress)
    progress.mkdir(parents=True, exist_ok=True)


def _record_run(config: SynthConfig, out: Path) -> None:
    """Write the settings that identify this run (RUN_RECORD), before it changes anything else in ``out``."""
    atomic_files.write_json(out / RUN_RECORD, {"identity": run_identity(config), "started": time.time()},
                            sort_keys=True)


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
