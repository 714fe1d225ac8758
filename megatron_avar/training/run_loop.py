"""The step loop shared by `avar sft` and `avar grpo`: run the steps, log them, checkpoint (every
``checkpoint.interval`` steps, after the last step, and after the step during which SIGTERM / SIGUSR1 arrived on
any rank, then stop), and keep the per-step history for the run summary.

The trainer supplies one step (``step_fn(step) -> metrics``, already reduced over the world) and the object that
knows the data position (``data.state_dict()``, saved in every checkpoint); this loop adds the peak memory of
the step and does everything else the same way for both trainers.

Also shared: where a run starts (:func:`plan_start`: resume, refuse, or a finished run that a rerun leaves
alone) and what it does to its directory before the first step (:func:`prepare_run_dir`, once the resume is
loaded, so a refused resume changes nothing), and the check that
an update is finite (:func:`nonfinite_update`). Invariants: a step whose update is not finite is neither logged
nor saved (``latest`` stays the last good checkpoint); a run never mixes its checkpoints with another run's;
a resumed run trains with the schedule it was started with; metrics.jsonl holds each step once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_avar import atomic_files
from megatron_avar.training.config import RESCHEDULABLE
from megatron_avar.training.metrics import WANDB_RUN_FILE, recorded_wandb_run
from megatron_avar.training.run_lock import acquire_run_lock, release_run_lock

__all__ = ["run_steps", "hf_export_describer", "RunStart", "plan_start", "prepare_run_dir", "resume_checkpoint",
           "enter_run_dir", "finished_run_summary", "schedule_record", "nonfinite_update", "NonFiniteUpdateError",
           "begin_run", "holding_run", "check_run_inputs"]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class NonFiniteUpdateError(ValueError):
    """A step whose loss, gradient norm, objective terms or updated weights are not finite. The run stops
    before the step is logged or saved, so ``latest`` stays the last good checkpoint. A ValueError: the cause
    is a setting (learning rate, objective weights) or the data, and the CLI shows the message alone."""


def nonfinite_update(model, values: dict[str, float]) -> list[str]:
    """Collective over the world, after an optimizer step: what is not finite — ``values`` (world-reduced
    metrics and the gradient norm, the same on every rank) and this model's weights on any rank — as
    "name = value" strings; empty when everything is finite. The weights are checked too because a finite
    gradient can still make them non-finite (an enormous step), and they are what a checkpoint saves."""
    import torch.distributed as dist

    from megatron_avar import platform

    problems = [f"{name} = {value}" for name, value in values.items() if not math.isfinite(value)]
    params = list(model.parameters())
    finite = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
    flag = (~finite).to(device=platform.current_device(), dtype=torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        problems.append("the updated weights hold NaN or inf")
    return problems


def schedule_record(config, fields: tuple[str, ...]) -> dict:
    """{"optim.lr": 1e-05, ...}: the values of the dotted ``fields`` of ``config`` (saved in every checkpoint;
    compared on resume by :func:`plan_start`)."""
    record = {}
    for dotted in fields:
        node = config
        for part in dotted.split("."):
            node = getattr(node, part)
        record[dotted] = node
    return record


def _saved_schedule(state: dict) -> dict:
    """The schedule record of a checkpoint's trainer state; checkpoints written before the record existed give
    what their scheduler state holds."""
    if isinstance(state.get("schedule"), dict):
        return state["schedule"]
    scheduler = state.get("scheduler", {})
    names = {"optim.lr": "max_lr", "optim.min_lr": "min_lr", "optim.warmup_steps": "lr_warmup_steps",
             "optim.weight_decay": "start_wd"}
    return {field: scheduler[key] for field, key in names.items() if key in scheduler}


@dataclass(frozen=True)
class RunStart:
    """Where a run starts (:func:`plan_start`). resume_from: the checkpoint to resume (None: step 0);
    start_step: the first step to run; finished: every step already ran (a rerun does nothing);
    replace_earlier: the directory holds an earlier run the user consented to replace (checkpoint.overwrite)."""

    resume_from: Path | None
    start_step: int
    finished: bool = False
    replace_earlier: bool = False


def _check_layout(out: Path, latest: Path, layout) -> None:
    """Refuse a resume at another tensor/pipeline layout (module docstring of training.checkpointing)."""
    from megatron_avar.training import checkpointing

    saved = checkpointing.saved_layout(latest)
    if saved is None or (saved["tp"], saved["pp"], saved["vpp"]) == (layout.tp, layout.pp, layout.vpp):
        return
    chunks = lambda vpp: f" VPP={vpp}" if vpp > 1 else ""  # noqa: E731
    raise ValueError(f"{out} resumes from {latest.name}, written at TP={saved['tp']} PP={saved['pp']}"
                     f"{chunks(saved['vpp'])} (DP={saved['dp']}), but this run is TP={layout.tp} PP={layout.pp}"
                     f"{chunks(layout.vpp)} (DP={layout.dp}). A run resumes at the tensor/pipeline layout it was "
                     "written with (its optimizer states and RNG streams are per shard); the data- and "
                     "context-parallel sizes may change. Resume with parallel.tensor_model_parallel_size={saved['tp']} "
                     f"parallel.pipeline_model_parallel_size={saved['pp']} "
                     f"parallel.virtual_pipeline_model_parallel_size={saved['vpp']} (a world size that is a "
                     f"multiple of {saved['tp'] * saved['pp']}), or start a new run at the new layout from an "
                     f"export of the checkpoint (avar convert mcore-to-hf --mcore-path {latest} --out DIR, then "
                     "model.hf_path=DIR)")


def plan_start(out: str | Path, checkpoint, *, schedule: dict, steps: int, layout) -> RunStart:
    """Decide where the run in ``out`` starts; reads only, on every rank, before anything is written.

    checkpoint.resume (default): resume from the latest checkpoint when there is one. The restored scheduler,
    optimizer and RNG states carry the values of the config fields in ``schedule`` (the trainer's
    ``RESUME_FIXED``: learning-rate schedule, train.steps, Adam's betas/eps, seed, precision and optimizer
    sharding) and would silently override
    new ones, so a resume with any of them changed is refused, naming each with its old and new value: the
    rule is that a run keeps the schedule it started with. A checkpoint of the last step means the run is
    finished: ``finished`` is set and the trainer does nothing (metrics and summary stay as they are).
    Complete step folders without the ``latest`` pointer (removed, or step folders copied alone) are refused,
    naming the newest: starting over would replace them as it reached their steps.
    checkpoint.resume=false: a directory that holds checkpoints is refused (the new run's checkpoints would
    mix with the old ones, and pruning by step number could delete the new ones) unless checkpoint.overwrite
    gives consent; then ``replace_earlier`` is set and :func:`prepare_run_dir` removes the earlier run's
    outputs before the new run writes anything. A resume at another tensor/pipeline layout than the
    checkpoint's (``layout``: this run's RankLayout) is refused naming both; another data-parallel size resumes.
    """
    from megatron_avar.training import checkpointing

    out = Path(out)
    requeued = _requeued_job_checkpoint(out) if not checkpoint.resume else None
    if requeued is not None and layout.is_logging_rank:
        print(f"{out}: attempt {os.environ.get('SLURM_RESTART_COUNT')} of Slurm job {os.environ.get('SLURM_JOB_ID')}, "
              f"requeued; its first attempt started this run over and wrote {requeued.name}: resuming it "
              "(checkpoint.resume=false applies to a job's first attempt, not to its requeues)", flush=True)
    if not checkpoint.resume and requeued is None:
        if checkpointing.has_checkpoints(out) and not checkpoint.overwrite:
            raise ValueError(f"{out} holds checkpoints of an earlier run ({out / 'checkpoints'}) and "
                             "checkpoint.resume=false would start a new run over them: resume it (drop "
                             "checkpoint.resume=false), or replace it (checkpoint.resume=false "
                             "checkpoint.overwrite=true), or choose another out")
        return RunStart(resume_from=None, start_step=0, replace_earlier=checkpoint.overwrite)
    latest = checkpointing.latest_checkpoint(out)
    if latest is None:
        complete = checkpointing.complete_checkpoints(out)
        if complete:  # (the pointer removed, or a copy of step folders alone): starting over would replace them
            newest, pointer = complete[-1], complete[-1].parent / checkpointing.LATEST
            raise ValueError(f"{newest.parent} holds complete checkpoints (newest {newest.name}) but no "
                             f"'{pointer.name}' pointer naming the one to resume, and starting over would replace "
                             f"them: resume from it (echo {newest.name} > {pointer}), or start over "
                             "(checkpoint.resume=false checkpoint.overwrite=true)")
        return RunStart(resume_from=None, start_step=0)
    state = checkpointing.read_trainer_state(latest)
    _check_layout(out, latest, layout)
    saved = _saved_schedule(state)
    changed = [(name, saved[name], value) for name, value in schedule.items() if name in saved and saved[name] != value]
    start_step = state["step"] + 1
    listed = lambda pairs: "; ".join(f"{name}: {old!r} in the checkpoint, {new!r} now"  # noqa: E731
                                     for name, old, new in pairs)
    if checkpoint.reschedule:
        rescheduled = [change for change in changed if change[0] in RESCHEDULABLE]
        changed = [change for change in changed if change[0] not in RESCHEDULABLE]
        if rescheduled and not changed and layout.is_logging_rank:
            print(f"{out}: resuming {latest.name} with a new learning-rate schedule from step {start_step + 1} on "
                  f"(checkpoint.reschedule=true): {listed(rescheduled)}", flush=True)
    if changed:
        fix = ("checkpoint.reschedule=true changes only the learning-rate schedule and train.steps"
               if checkpoint.reschedule else
               "to change only the learning-rate schedule or train.steps (e.g. to train for more steps) pass "
               "checkpoint.reschedule=true")
        raise ValueError(f"{out} resumes from {latest.name}, whose schedule differs from this config "
                         f"({listed(changed)}). A resumed run keeps the schedule it started with (the restored "
                         "scheduler and optimizer would silently keep the old values, or could not be read with the "
                         "new precision or optimizer sharding): set the old values to resume, or start a new run "
                         "— another out (from an export of this checkpoint: avar convert mcore-to-hf), or "
                         f"checkpoint.resume=false checkpoint.overwrite=true to replace this one; {fix}")
    return RunStart(resume_from=latest, start_step=start_step, finished=start_step >= steps)


def _requeued_job_checkpoint(out: Path) -> Path | None:
    """The latest checkpoint in ``out`` when this process is a requeued attempt of the Slurm job that wrote it
    (``SLURM_RESTART_COUNT`` >= 1, same ``SLURM_JOB_ID``), else None. Slurm runs a requeued job with its first
    command line: a job started with checkpoint.resume=false checkpoint.overwrite=true would otherwise delete what
    its earlier attempt trained and start again at step 0 at every requeue, never finishing a run longer than one
    time limit. (Found in review, on a real Slurm: step folders deleted at each requeue.)"""
    from megatron_avar.training import checkpointing

    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or not restarts.isdigit() or int(restarts) < 1:
        return None
    latest = checkpointing.latest_checkpoint(out)
    if latest is None or checkpointing.read_trainer_state(latest).get("slurm_job") != job:
        return None
    return latest


def check_run_inputs(config) -> None:
    """Both trainers, before any process group or run directory exists (a run starting over would clear its
    folder, and the model would be built, before the logger or the loader found out): the logging backends the
    config asks for are installed, and model.hf_path holds a config.json. (Not in the config classes: `avar plan`
    and `avar sweep` load the same configs on machines that need neither.)"""
    import importlib.util

    if config.log.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError("log.wandb_project is set but wandb is not installed: pip install wandb, or drop "
                         "log.wandb_project")
    from megatron_avar.convert.checkpoint import export_hint, is_megatron_checkpoint, not_a_checkpoint_hint

    hf_path = config.model.hf_path
    hint = not_a_checkpoint_hint(hf_path, hf_only=True)
    if hint is None and is_megatron_checkpoint(hf_path):
        hint = export_hint(hf_path)
    if hint is not None:
        raise ValueError(f"model.hf_path={hint}")
    if not (Path(hf_path) / "config.json").is_file():
        raise ValueError(f"model.hf_path={hf_path}: no config.json there; give a Hugging Face Qwen2.5-VL "
                         "checkpoint folder")
    _check_out_is_a_run_of(config)


def _check_out_is_a_run_of(config) -> None:
    """Refuse an ``out`` that is not this command's run directory: an empty path (the working directory), the
    model folder or any folder whose config.json is not a run config (the run would replace it), or a run of the
    other trainer (``avar grpo`` in an SFT run's folder took it for a finished GRPO run). A run directory holds
    its run config in config.json from before its first checkpoint, so that file tells what the folder is."""
    out = str(config.out)
    if not out.strip():
        raise ValueError("out is empty: give the run directory (out=runs/NAME)")
    if Path(out).resolve() == Path(config.model.hf_path).resolve():
        raise ValueError(f"out={out} is model.hf_path: the run would write its config.json over the model's; "
                         "choose another out")
    found = Path(out) / "config.json"
    if not found.is_file():
        return
    try:
        saved = json.loads(found.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"out={out} holds a config.json that is not readable as a run config ({error}); a run "
                         "would replace it: choose another out, or remove that file if it is a run's") from None
    own = [field.name for field in dataclasses.fields(config)]
    if not isinstance(saved, dict) or not {"out", "train", "checkpoint"} <= saved.keys():
        what = (f"a Hugging Face model's (model_type {saved['model_type']!r})"
                if isinstance(saved, dict) and "model_type" in saved else "not a run config")
        raise ValueError(f"out={out} holds a config.json that is {what}; a run would write over it: choose "
                         "another out")
    others = sorted(saved.keys() - set(own))
    if others:
        raise ValueError(f"out={out} holds a run of another command (its config.json has sections "
                         f"{', '.join(others)}, which this command's has not): choose another out (a run of one "
                         "command never replaces the other's, checkpoint.overwrite=true included)")


def begin_run(config, fixed_fields: tuple[str, ...], *, layout) -> tuple[RunStart, dict]:
    """Both trainers' start (collective): the run directory's lock (``training.run_lock``: one run per out,
    released by :func:`holding_run`), the schedule record of ``fixed_fields`` and :func:`plan_start`. Nothing in the
    run directory changes yet: the trainer calls :func:`enter_run_dir` once the model is built and the resume
    loaded, so a resume refused on the way (gradient buckets, changed data, an unreadable checkpoint) leaves the
    directory as it was. A damaged W&B run record (``training.metrics.recorded_wandb_run``) is refused here, on
    every rank, not by the logging rank's logger alone. Returns (start, schedule); a refusal releases the lock as
    a failed run's (``run_lock.release_run_lock``)."""
    acquire_run_lock(config.out, is_logging_rank=layout.is_logging_rank)
    try:
        schedule = schedule_record(config, fixed_fields)
        start = plan_start(config.out, config.checkpoint, schedule=schedule, steps=config.train.steps,
                           layout=layout)
        if start.resume_from is not None and not start.finished:
            _check_same_model(start.resume_from, config.model.hf_path)
        if config.log.wandb_project and start.resume_from is not None and not start.finished:
            recorded_wandb_run(config.out, config.log.wandb_project)  # (a run that resumes nothing starts a new one)
    except BaseException:
        release_run_lock(config.out, failed=True)
        raise
    return start, schedule


@contextlib.contextmanager
def holding_run(config, fixed_fields: tuple[str, ...], *, layout) -> Iterator[tuple[RunStart, dict]]:
    """Both trainers' run: :func:`begin_run`'s (start, schedule) for the ``with`` block, then the run directory's
    lock released. A block that raises releases it as a failed run's: an ``out`` the lock created that holds
    nothing else is removed with it (``run_lock``), so a first run that fails before writing anything (a model
    that does not load) leaves no folder behind."""
    start, schedule = begin_run(config, fixed_fields, layout=layout)
    failed = True
    try:
        yield start, schedule
        failed = False
    finally:
        release_run_lock(config.out, failed=failed)


def _check_same_model(checkpoint: Path, hf_path: str | Path) -> None:
    """Refuse a resume with another model than the checkpoint's (its copy of the HF config it was trained from):
    megatron would fail deep in its load with a shape mismatch, and another parameter count reads as other
    gradient buckets. Every field of the model config counts, not only the shapes (max_position_embeddings, the
    special token ids): a run trains one model. Checkpoints without the copy pass (their load still checks every
    shape)."""
    from megatron_avar.convert.checkpoint import HF_SIDE_DIR
    from megatron_avar.models.qwen2_5_vl import Qwen25VLConfig

    saved_config = checkpoint / HF_SIDE_DIR / "config.json"
    if not saved_config.is_file():
        return
    try:
        theirs = Qwen25VLConfig.from_hf(saved_config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{saved_config} (the model the checkpoint was trained from) is unreadable: {error}; "
                         "resume from a checkpoint of this run, or start over (checkpoint.resume=false "
                         "checkpoint.overwrite=true)") from None
    from megatron_avar.config import config_to_dict, flat_config

    ours = Qwen25VLConfig.from_hf(hf_path)
    if theirs == ours:
        return
    saved_fields, our_fields = flat_config(config_to_dict(theirs)), flat_config(config_to_dict(ours))
    differ = "; ".join(f"{name}: {saved_fields[name]} in the checkpoint, {value} in model.hf_path"
                       for name, value in our_fields.items() if saved_fields.get(name) != value)
    raise ValueError(f"{checkpoint} was trained from another model than model.hf_path={hf_path} ({differ}). A run "
                     "resumes with the model it started from: set model.hf_path to it, or start a new run "
                     "(another out, or checkpoint.resume=false checkpoint.overwrite=true)")


def resume_checkpoint(config, start: RunStart, model, data, *, layout) -> None:
    """Both trainers, when ``start`` resumes (collective): load its checkpoint into ``model`` (weights, optimizer,
    scheduler, this rank's RNG) and the data position into ``data`` (its ``load_state_dict``), then say on the
    logging rank where the run goes on (steps numbered from 1, as the console numbers them: found in review,
    "(step 4)" was then "step 5/8")."""
    from megatron_avar.training import checkpointing

    assert start.resume_from is not None, "resume_checkpoint on a run that starts at step 0"
    state = checkpointing.load_checkpoint(start.resume_from, model)
    data.load_state_dict(state["data"], accept_data_change=config.checkpoint.accept_data_change)
    if layout.is_logging_rank:
        print(f"resumed from {start.resume_from}: continuing with step {start.start_step + 1}/{config.train.steps}",
              flush=True)


def enter_run_dir(config, start: RunStart, *, layout) -> None:
    """Both trainers, after the resume loaded (every refusal passed) and before the logger opens:
    :func:`prepare_run_dir` with the resolved ``config`` on the logging rank."""
    from megatron_avar.config import config_to_dict

    if layout.is_logging_rank:
        prepare_run_dir(config.out, start, config_to_dict(config))


def finished_run_summary(out: str | Path, start: RunStart, *, steps: int, announce: bool) -> dict:
    """What a rerun of a finished run returns: the run's summary.json as it is. It writes nothing, except to
    repair a summary.json that is missing or records a stop or a failure (``announce``: the logging rank
    writes)."""
    out = Path(out)
    if announce:
        checkpoint = "none" if start.resume_from is None else start.resume_from.name
        print(f"{out} holds a finished run: all {steps} steps ran (checkpoint {checkpoint}); nothing to "
              "do, nothing written. To train it again pass checkpoint.resume=false checkpoint.overwrite=true, or "
              "choose another out", flush=True)
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        summary = None
    if (summary is None or summary.get("stopped_by") is not None or summary.get("failed")
            or summary.get("last_step") != steps - 1):
        # The run was killed between its last checkpoint and its summary (the summary, if any, is an earlier
        # segment's, stopped at an earlier step), or (before this version) a stop signal during the last step was
        # recorded as a stop: say it finished at its last step, or Slurm requeues and sweeps resubmit it.
        summary = summary or {"steps_run": 0, "start_step": start.start_step, "checkpoints": [], "history": []}
        final = [] if start.resume_from is None else [str(start.resume_from)]
        summary = {**summary, "stopped_by": None, "failed": None, "last_step": steps - 1,
                   "checkpoints": [c for c in summary.get("checkpoints", []) if c not in final] + final}
        if announce:
            atomic_files.write_json(out / SUMMARY_FILE, summary)
    summary["already_finished"] = True
    return summary


# Settings of how a run is started, not of what it trains: a resume changing them says nothing.
_RUN_CONTROL = ("checkpoint.resume", "checkpoint.overwrite", "checkpoint.accept_data_change", "checkpoint.reschedule")


def prepare_run_dir(out: str | Path, start: RunStart, run_config: dict) -> None:
    """Logging rank, after :func:`plan_start` and the resume's load, before the logger opens: create ``out``;
    with consent to replace an earlier run, remove its checkpoints, metrics, summary and TensorBoard events (before
    this run writes anything, so nothing of this run is ever removed); keep in metrics.jsonl only the steps before
    ``start.start_step`` (a run resumed after a crash runs the steps after its checkpoint again); remove the W&B run
    record unless a checkpoint is resumed, so a run that starts at step 0 (an earlier attempt died before its first
    checkpoint, or resume=false) logs to a new W&B run, never into the values of one it does not continue; write
    the resolved config."""
    from megatron_avar.training import checkpointing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if start.replace_earlier:
        checkpointing.remove_checkpoints(out)
        for name in (METRICS_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
        events = out / "tensorboard"  # the event files this run's logger writes there, nothing else
        for event_file in events.glob("events.out.tfevents.*") if events.is_dir() else ():
            event_file.unlink()
        with contextlib.suppress(OSError):
            events.rmdir()
    if start.resume_from is None:
        (out / WANDB_RUN_FILE).unlink(missing_ok=True)
    else:
        _say_changed_settings(out / "config.json", run_config, start.start_step)
    _trim_metrics(out / METRICS_FILE, start.start_step)
    atomic_files.write_json(out / "config.json", run_config)


def _say_changed_settings(previous: Path, run_config: dict, start_step: int) -> None:
    """Say which settings a resumed run changed since its last segment (``previous``: that segment's config.json):
    those that are not refused (the schedule is, by :func:`plan_start`) apply from ``start_step`` on, so a loss
    curve that bends there, with other loss weights or layers, is explained where the run is started."""
    from megatron_avar.config import flat_config

    try:
        before = flat_config(json.loads(previous.read_text()))
    except (OSError, ValueError, AttributeError):  # no record of the last segment's settings: nothing to compare
        return
    now = flat_config(run_config)
    changed = [f"{key}: {before[key]!r} -> {now[key]!r}" for key in now
               if key in before and before[key] != now[key] and key not in _RUN_CONTROL]
    if changed:
        print(f"resumed with settings changed since the last segment, applying from step {start_step + 1} on (as the "
              f"console counts; step {start_step} in metrics.jsonl): {'; '.join(changed)}", flush=True)


def _trim_metrics(path: Path, start_step: int) -> None:
    """Keep the records of steps < start_step (a torn last line of a crashed run goes too); atomic. The steps
    dropped, run by an attempt after its last checkpoint, are named (found in review: a run killed before its
    first checkpoint started again at step 1 without a word about the steps it had logged)."""
    if not path.is_file():
        return
    kept, dropped = [], set()
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if step < start_step:
            kept.append(line)
        else:
            dropped.add(step)
    if dropped:
        print(f"{path}: the records of steps {min(dropped) + 1}-{max(dropped) + 1} (as the console counts) came from "
              "an attempt that ended before checkpointing them; they are dropped and those steps run again",
              flush=True)
    atomic_files.write_text(path, "".join(line + "\n" for line in kept))


@dataclass
class LoopOutcome:
    """history: one record per step run ({"step": s, **metrics}, filtered by ``history_filter``);
    checkpoints: the checkpoints this segment wrote that are still there (checkpoint.keep prunes), in order;
    stopped_by: the signal that stopped the run early, or None."""

    history: list[dict]
    checkpoints: list[str]
    stopped_by: str | None


def hf_export_describer(hf_path: str | Path, *, tokenizer, layout, dtype: torch.dtype,
                        source: str) -> Callable[[Path], None]:
    """``describe`` for ``checkpointing.save_checkpoint``: writes into the checkpoint what `avar convert
    mcore-to-hf` reads to export it (the HF config, tokenizer and processor files of ``hf_path``, with the tokens
    ``tokenizer``, the run's, added to them, and the layout / dtype / source record)."""

    def describe(path: Path) -> None:
        from megatron_avar.convert.checkpoint import HF_SIDE_DIR, write_checkpoint_info
        from megatron_avar.convert.hf_files import copy_side_files
        from megatron_avar.processor import write_added_tokens

        copy_side_files(Path(hf_path), path / HF_SIDE_DIR)
        write_added_tokens(tokenizer, path / HF_SIDE_DIR)
        write_checkpoint_info(path, tp=layout.tp, pp=layout.pp, dtype=dtype, source=source)

    return describe


def run_steps(step_fn: Callable[[int], dict[str, float]], *, start_step: int, steps: int, run_dir: str | Path,
              model, data, layout, logger, preemption, log_interval: int, checkpoint, describe,
              history_filter: Callable[[str], bool] = lambda name: True, schedule: dict | None = None,
              summary_fields: Callable[[], dict] = dict) -> dict:
    """Steps ``start_step .. steps - 1`` (collective over all ranks; module docstring), then the run summary,
    written to <run_dir>/summary.json by the logging rank and returned. ``checkpoint``: the trainer's
    CheckpointConfig (interval, keep); ``history_filter(name)``: which metrics the history keeps (all are
    logged); ``schedule``: the :func:`schedule_record` saved in every checkpoint; ``summary_fields()``: the
    trainer's own summary entries. A NonFiniteUpdateError of ``step_fn`` stops the loop before that step is
    logged or saved; its message then names the checkpoint that stays ``latest``.

    A run that fails (an exception, on this rank or agreed from another) writes its summary too, with
    ``failed`` naming the error, before the error goes on: the summary.json of an earlier segment never stands
    for a run that failed after it."""
    outcome = LoopOutcome(history=[], checkpoints=[], stopped_by=None)
    try:
        _run_steps(outcome, step_fn, start_step=start_step, steps=steps, run_dir=run_dir, model=model, data=data,
                   layout=layout, logger=logger, preemption=preemption, log_interval=log_interval,
                   checkpoint=checkpoint, describe=describe, history_filter=history_filter, schedule=schedule)
    except BaseException as error:
        if layout.is_logging_rank:
            # best effort: the error itself is what the user must see, not a second one from writing this
            fields = {}
            with contextlib.suppress(Exception):
                fields = summary_fields()
            with contextlib.suppress(Exception):
                failed = f"{type(error).__name__}: {error}".rstrip(": ")
                _write_summary(run_dir, outcome, start_step=start_step, layout=layout, failed=failed, fields=fields)
        raise
    return _write_summary(run_dir, outcome, start_step=start_step, layout=layout, failed=None,
                          fields=summary_fields())


def _write_summary(run_dir: str | Path, outcome: LoopOutcome, *, start_step: int, layout, failed: str | None,
                   fields: dict) -> dict:
    """The run summary (what README's run-directory section lists); written by the logging rank."""
    history = outcome.history
    summary = {"steps_run": len(history), "start_step": start_step,
               "last_step": history[-1]["step"] if history else None, "stopped_by": outcome.stopped_by,
               "failed": failed, "checkpoints": outcome.checkpoints, "history": history,
               "layout": dataclasses.asdict(layout), **fields}
    if layout.is_logging_rank:
        atomic_files.write_json(Path(run_dir) / SUMMARY_FILE, summary)
    return summary


def _run_steps(outcome: LoopOutcome, step_fn: Callable[[int], dict[str, float]], *, start_step: int, steps: int,
               run_dir: str | Path, model, data, layout, logger, preemption, log_interval: int, checkpoint,
               describe, history_filter: Callable[[str], bool], schedule: dict | None) -> None:
    """:func:`run_steps`' loop; fills ``outcome`` as the steps run."""
    from megatron_avar import platform
    from megatron_avar.training import checkpointing
    from megatron_avar.training.metrics import peak_memory_gb

    for step in range(start_step, steps):
        platform.reset_peak_memory()  # perf/peak_memory_gb is the step's (GPU), not the build's or the load's
        try:
            metrics = step_fn(step)
        except NonFiniteUpdateError as error:
            latest = checkpointing.latest_checkpoint(run_dir)
            # A rerun resumes there; what it may change is plan_start's rule (not the schedule).
            kept = (f"{latest} stays the latest checkpoint: a rerun resumes there (with the same learning-rate "
                    "schedule; a lower optim.lr needs a new run, e.g. from an export of that checkpoint)"
                    if latest is not None else "no checkpoint had been written yet")
            raise NonFiniteUpdateError(f"{error}. Nothing of step {step} was logged or saved; {kept}") from None
        metrics["perf/peak_memory_gb"] = peak_memory_gb()
        outcome.history.append({"step": step, **{k: v for k, v in metrics.items() if history_filter(k)}})
        last = step == steps - 1
        if step % log_interval == 0 or last:
            logger.log(step, metrics)
        interrupted = preemption.any_rank()
        if interrupted or last or (checkpoint.interval and (step + 1) % checkpoint.interval == 0):
            trainer_state = {"data": data.state_dict(), "metrics": outcome.history[-1], "schedule": schedule,
                             "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vpp": layout.vpp,
                                        "cp": layout.cp}}
            written = str(checkpointing.save_checkpoint(run_dir, step, model, trainer_state, keep=checkpoint.keep,
                                                        describe=describe))
            # the earlier ones checkpoint.keep pruned are gone (found in review: summary.json listed them)
            outcome.checkpoints[:] = [path for path in outcome.checkpoints if Path(path).is_dir()] + [written]
        if interrupted and not last:  # a signal during the last step: every step ran, the run is finished
            outcome.stopped_by = preemption.received or "signal on another rank"
            if layout.is_logging_rank:
                print(f"stopping after step {step + 1}: {outcome.stopped_by}; checkpoint {outcome.checkpoints[-1]}",
                      flush=True)
            break
