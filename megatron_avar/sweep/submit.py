"""Submitting sweep points as Slurm jobs and asking Slurm what became of them.

max_concurrent is enforced with dependency chains: the points are dealt round-robin into ``max_concurrent``
chains and each job is submitted with ``--dependency=afterany:<the previous job of its chain>``, so Slurm
itself never runs more than max_concurrent of them at once, a failed point does not block its chain, and
nothing has to stay alive on the login node (``--no-wait`` submits everything and returns). Not a job array:
an array shares one set of sbatch options, and the points differ in --nodes (and the sweep resubmits single
failed points). Not a polling submitter: that needs a process babysitting the queue for the whole sweep.

State kept in ``<out>/state.json``: every job id submitted per point (newest last), so a re-run knows which
points still have a job in the queue and `avar sweep collect` can name each point's job and log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from megatron_avar import atomic_files
from megatron_avar.sweep.config import SweepConfig
from megatron_avar.sweep.grid import Point

__all__ = ["submit_points", "wait_for_jobs", "job_states", "run_finished", "load_state", "read_sweep_file",
           "ACTIVE_STATES", "SlurmUnavailable"]

# squeue states of a job that may still run.
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING")


SLURM_TIMEOUT_S = 60


class SlurmUnavailable(ValueError):
    """A Slurm command did not answer (a slow or unreachable controller) or could not be started."""


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=SLURM_TIMEOUT_S, **kwargs)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"`{' '.join(command[:2])} ...` did not answer within {SLURM_TIMEOUT_S} s: the Slurm "
                               "controller is slow or unreachable; try again later") from None
    except OSError as error:
        raise SlurmUnavailable(f"`{command[0]}` could not be run ({error})") from None


def load_state(out: Path) -> dict[str, list[str]]:
    """The job ids submitted per point (``<out>/state.json``; empty before the first submission)."""
    path = out / "state.json"
    if not path.is_file():
        return {}
    jobs = read_sweep_file(path, "jobs")["jobs"]
    if not isinstance(jobs, dict) or not all(isinstance(ids, list) for ids in jobs.values()):
        raise ValueError(f"{path} is not a sweep's job record ({{\"jobs\": {{point: [job ids]}}}}): it was altered; "
                         "restore it, or use another out= for a new sweep")
    return jobs


def read_sweep_file(path: Path, *keys: str) -> dict:
    """A JSON object the sweep wrote (``sweep.json``, ``state.json``) with ``keys``; ValueError naming the file
    when it is unreadable or another file of that name."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error}): not written by `avar sweep`, or damaged; restore it, "
                         "or use another out= for a new sweep") from None
    missing = [key for key in keys if not isinstance(content, dict) or key not in content]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not written by `avar sweep`, or altered; restore it, "
                         "or use another out= for a new sweep")
    return content


def _save_state(out: Path, jobs: dict[str, list[str]]) -> None:
    atomic_files.write_json(out / "state.json", {"jobs": jobs})


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job: squeue for queued/running ones, then sacct (needs accounting), then scontrol
    (remembers finished jobs for MinJobAge, 300 s by default); "UNKNOWN" when none of them knows the job."""
    states: dict[str, str] = {}
    if not job_ids:
        return states
    if shutil.which("squeue") is None:  # collecting on a machine without Slurm: the run directories still tell
        return dict.fromkeys(job_ids, "UNKNOWN")
    queue = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"])
    for line in queue.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        if job in job_ids:
            states[job] = state
    rest = [j for j in job_ids if j not in states]
    if rest:
        sacct = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(rest), "-o", "JobID,State"])
        if sacct.returncode == 0:
            for line in sacct.stdout.splitlines():
                job, _, state = line.partition("|")
                if job in rest and state:
                    states[job] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    for job in [j for j in job_ids if j not in states]:
        shown = _run(["scontrol", "show", "job", "-o", job])
        fields = dict(token.partition("=")[::2] for token in shown.stdout.split()) if shown.returncode == 0 else {}
        states[job] = fields.get("JobState", "UNKNOWN")
    return states


def run_finished(run_dir: Path) -> bool:
    """True when the run's summary.json says it trained through its last configured step without a stop signal
    or a failure."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        steps = json.loads((run_dir / "config.json").read_text())["train"]["steps"]
    except (OSError, ValueError, KeyError):
        return False
    return (summary.get("stopped_by") is None and not summary.get("failed")
            and summary.get("last_step") == steps - 1)


def _check_finished_settings(config: SweepConfig, point: Point) -> None:
    """ValueError when a finished run of ``point`` trained with other settings than the point has now (another
    global_batch_per_dp, sft_overrides or sft_config than the sweep that ran it): skipping it would report its
    numbers under the new settings. Compares every key both configs have, except ``out``."""
    from megatron_avar.config import config_to_dict, flat_config, load_config
    from megatron_avar.sft.config import SFTConfig

    ran = flat_config(json.loads((point.run_dir / "config.json").read_text()))
    wanted = flat_config(config_to_dict(load_config(SFTConfig, config.sft_config,
                                              [*point.overrides, f"out={point.run_dir}"])))
    differ = sorted(k for k in ran.keys() & wanted.keys() if k != "out" and ran[k] != wanted[k])
    if differ:
        shown = ", ".join(f"{k}: ran {ran[k]!r}, now {wanted[k]!r}" for k in differ[:5])
        raise ValueError(f"point {point.name} finished in {point.run_dir} with other settings ({shown}); its "
                         f"results would be reported under these. Use another out= for this sweep, or delete "
                         f"{point.run_dir} to train the point again")


def _check_queued_settings(earlier: dict, points: list[Point], last_jobs: dict[str, str],
                           states: dict[str, str]) -> None:
    """ValueError when a point whose job is still queued or running was submitted with other overrides than the
    point has now: it is skipped, and the record would report its numbers under the new settings."""
    submitted: dict[str, list] = {p["name"]: p["overrides"] for p in earlier["points"]
                                  if isinstance(p, dict) and "name" in p and isinstance(p.get("overrides"), list)}
    for point in points:
        job = last_jobs.get(point.name)
        if job is None or states.get(job) not in ACTIVE_STATES or point.name not in submitted:
            continue
        theirs, ours = submitted[point.name], list(point.overrides)
        if theirs != ours:
            differ = [o for o in ours if o not in theirs] + [f"(was) {o}" for o in theirs if o not in ours]
            raise ValueError(f"point {point.name} has job {job} still {states[job]}, submitted with other settings "
                             f"({', '.join(differ[:5])}); its results would be reported under these. Wait for it "
                             f"to end (or scancel {job}) and run this again, or use another out= for this sweep")


def _with_earlier_points(record: dict, earlier: dict | None, log) -> dict:
    """``record`` with the points of the earlier record that the new grid lacks (their jobs and run directories
    are still this sweep's: collect keeps reporting them)."""
    if earlier is None:
        return record
    names = {p["name"] for p in record["points"]}
    kept = [p for p in earlier["points"] if isinstance(p, dict) and p.get("name") not in names]
    if kept:
        log(f"[sweep] {len(kept)} point(s) of the earlier grid are not in this one and stay in the sweep's record: "
            + ", ".join(p["name"] for p in kept))
    return {**record, "points": record["points"] + kept}


def _sbatch_command(config: SweepConfig, point: Point, dependency: list[str]) -> list[str]:
    slurm = config.slurm
    command = ["sbatch", "--parsable", f"--job-name=avar-sweep-{point.name}", f"--nodes={point.spec.nodes}",
               f"--ntasks-per-node={config.ranks}", f"--gpus-per-node={config.gpus_per_node}",
               f"--output={point.run_dir.resolve()}/sbatch-%j.out"]
    for option in ("account", "partition", "qos", "time"):
        if getattr(slurm, option) is not None:
            command.append(f"--{option}={getattr(slurm, option)}")
    command += slurm.extra_args
    if dependency:
        command.append("--dependency=afterany:" + ":".join(dependency))
    return [*command, config.script]


def submit_points(config: SweepConfig, points: list[Point], *, repo: Path, record: dict | None = None,
                  log=print) -> dict[str, list[str]]:
    """Submit every point that has neither finished nor a job still in the queue; returns the state (point ->
    job ids). Jobs of an earlier invocation that are still queued head the chains, so the limit holds across
    re-runs too. ``record``: written to ``<out>/sweep.json`` once the finished and the still queued points are
    known to match the settings (a re-run refused for other settings leaves the record its results are collected
    against), with the earlier record's points that the new grid lacks, before the first submission (without
    sbatch, the plans are recorded and the command stops there). One submission at a
    time per ``out`` (``training.run_lock``): two would chain their jobs apart and lose each other's ids."""
    from megatron_avar.training.run_lock import holding_run_lock

    out = Path(config.out)
    with holding_run_lock(out, conflict=(
            "two `avar sweep` submissions at once would chain their jobs apart and lose each other's job ids. Let "
            "that one finish, then run this again (finished and queued points are skipped)")):
        return _submit_unlocked(config, points, out=out, repo=repo, record=record, log=log)


def _submit_unlocked(config: SweepConfig, points: list[Point], *, out: Path, repo: Path, record: dict | None,
                     log) -> dict[str, list[str]]:
    finished = [point for point in points if run_finished(point.run_dir)]
    for point in finished:  # before anything is recorded or submitted
        _check_finished_settings(config, point)
    jobs = load_state(out)
    # every point's last job, those of an earlier grid's points too: still queued, they head the chains as well
    last_jobs = {name: ids[-1] for name, ids in jobs.items() if ids}
    states = job_states(sorted(set(last_jobs.values())))
    earlier = read_sweep_file(out / "sweep.json", "config", "points") if (out / "sweep.json").exists() else None
    if earlier is not None:
        _check_queued_settings(earlier, points, last_jobs, states)
    if record is not None:
        atomic_files.write_json(out / "sweep.json", _with_earlier_points(record, earlier, log))
    if shutil.which("sbatch") is None:
        raise ValueError("sbatch not found: run `avar sweep` on a Slurm login node (or `avar sweep collect`)")
    chains: list[list[str]] = [[] for _ in range(config.max_concurrent)]
    active = sorted((j for j in last_jobs.values() if states.get(j) in ACTIVE_STATES), key=int)
    for index, job in enumerate(active):
        chains[index % len(chains)].append(job)
    next_chain = len(active)
    for point in points:
        if point in finished:
            log(f"[sweep] {point.name}: finished, skipped")
            continue
        if point.name in last_jobs and states.get(last_jobs[point.name]) in ACTIVE_STATES:
            log(f"[sweep] {point.name}: job {last_jobs[point.name]} still {states[last_jobs[point.name]]}, skipped")
            continue
        point.run_dir.mkdir(parents=True, exist_ok=True)  # sbatch's --output directory must exist
        chain = chains[next_chain % len(chains)]
        next_chain += 1
        env = {**os.environ, **config.slurm.env, "CONFIG": str(Path(config.sft_config).resolve()),
               "RUN_DIR": str(point.run_dir.resolve()), "OVERRIDES": " ".join(point.overrides), "REPO": str(repo)}
        command = _sbatch_command(config, point, chain[-1:])
        try:
            result = _run(command, env=env, cwd=repo)
        except SlurmUnavailable as error:  # the controller may still have queued it
            raise SlurmUnavailable(f"point {point.name}: {error}. The job may have been queued all the same: check "
                                   "`squeue --me` (and scancel a duplicate) before running the sweep again; points "
                                   f"submitted before it are in {out / 'state.json'}") from None
        if result.returncode != 0:
            submitted = f"; points submitted before it are in {out / 'state.json'}" if jobs else ""
            raise ValueError(f"sbatch for point {point.name} failed ({result.returncode}): "
                             f"{result.stderr.strip()}{submitted}\ncommand: {' '.join(command)}")
        job = result.stdout.strip().split(";")[0]
        chain.append(job)
        jobs.setdefault(point.name, []).append(job)
        _save_state(out, jobs)
        previous = f" after {chain[-2]}" if len(chain) > 1 else ""
        log(f"[sweep] {point.name}: submitted job {job}{previous} -> {point.run_dir}")
    _save_state(out, jobs)
    return jobs


def wait_for_jobs(job_ids: list[str], *, poll_s: float = 10.0, timeout_s: float | None = None, log=print) -> None:
    """Block until none of ``job_ids`` is queued or running (ValueError after ``timeout_s``; the jobs go on)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    previous = None
    while True:
        try:
            states = job_states(job_ids)
        except SlurmUnavailable as error:  # a slow controller for a while does not end a wait of hours
            if deadline is not None and time.monotonic() > deadline:
                raise
            log(f"[sweep] {error}; asking again in {poll_s:g} s")
            time.sleep(poll_s)
            continue
        active = {j: s for j, s in states.items() if s in ACTIVE_STATES}
        summary = ", ".join(f"{j} {s}" for j, s in sorted(active.items(), key=lambda kv: int(kv[0])))
        if summary != previous and active:
            log(f"[sweep] waiting for {len(active)} job(s): {summary}")
            previous = summary
        if not active:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise ValueError(f"sweep jobs still active after --timeout-seconds {timeout_s}: {summary}; they keep "
                             "running: `avar sweep collect --out OUT` reads them when they end")
        time.sleep(poll_s)
