"""Collecting a sweep: one row per point (every point, finished or not) -> results.csv / results.json, the
AGTO overhead per layout -> agto_overhead.csv, and the plots (megatron_avar.sweep.plots).

Per finished point, from <run_dir>/metrics.jsonl (the last record of each step: a resumed run logs a step
again), over the steps after ``warmup_steps``:
  median_step_seconds        median of perf/step_seconds
  tokens_per_second_per_gpu  median of perf/tokens_per_second (global real tokens) / num_gpus
  tflops_per_gpu             median of perf/tflops_per_gpu (the trainer's explicit FLOP formula,
                             megatron_avar.training.metrics.training_flops)
  mfu                        tflops_per_gpu / peak_tflops_per_gpu
  peak_memory_gb             max of perf/peak_memory_gb (max over ranks; CUDA max allocated, CPU peak RSS)
  planned_peak_gb            `avar plan`'s peak for the point (sweeps with a ``gpu``; every point, run or not)
A point the plan says does not fit the sweep's GPU was never submitted: state DOES_NOT_FIT, the plan's numbers
in ``error``. A point that did not finish keeps its row with ``state`` (Slurm's: FAILED, CANCELLED, TIMEOUT,
PREEMPTED, ...; PENDING / RUNNING while queued; NOT_SUBMITTED) and ``log`` (its Slurm log) and ``error`` (the
log's last error line), and empty numbers: never dropped.

A point's run directory is ``<out>/runs/<name>`` (sweep.grid.run_dir_of), not the run_dir in sweep.json (which
older sweeps recorded relative to the directory they were submitted from): collect works from any directory and on
a moved or copied sweep folder. A point that was ``ok`` in the earlier results.json and has no finished run now is
said on stderr; with no job submitted for it since, its earlier row is kept.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from megatron_avar import atomic_files
from megatron_avar.sweep.fit import DOES_NOT_FIT, describe_misfit
from megatron_avar.sweep.grid import run_dir_of
from megatron_avar.sweep.submit import SlurmUnavailable, job_states, load_state, read_sweep_file, run_finished

__all__ = ["collect", "COLUMNS"]

COLUMNS = ("name", "state", "job_id", "model", "nodes", "num_gpus", "tp", "pp", "cp", "dp", "seq_length", "agto",
           "steps", "steps_measured", "median_step_seconds", "tokens_per_second_per_gpu", "tflops_per_gpu", "mfu",
           "peak_memory_gb", "planned_peak_gb", "final_lm_loss", "run_dir", "log", "error")
_EXCEPTION = re.compile(r"\b[A-Z]\w*(Error|Exception|Interrupt): |avar [\w-]+: error: ")
OVERHEAD_COLUMNS = ("layout", "step_seconds_agto_off", "step_seconds_agto_on", "step_time_overhead",
                    "peak_memory_gb_agto_off", "peak_memory_gb_agto_on", "extra_memory_gb")


def _step_records(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def _log_and_error(run_dir: Path, job: str | None) -> tuple[str, str]:
    candidates = [run_dir / f"slurm-{job}.out", run_dir / f"sbatch-{job}.out"] if job else []
    logs = [p for p in candidates if p.is_file()]
    error = ""
    for log in logs:  # the last Python exception line, else the last line that mentions an error
        lines = log.read_text(errors="replace").splitlines()
        found = ([line for line in lines if _EXCEPTION.search(line)]
                 or [line for line in lines if "error" in line.lower()])
        if found:
            error = found[-1].strip()[:300]
            break
    return (str(logs[0]) if logs else (str(candidates[0]) if candidates else "")), error


def _metrics_row(run_dir: Path, num_gpus: int, warmup_steps: int, peak_tflops: float) -> dict:
    records = _step_records(run_dir)
    if not records:
        return {}
    measured = [records[s] for s in sorted(records) if s >= warmup_steps]
    peaks = [r["perf/peak_memory_gb"] for r in records.values() if "perf/peak_memory_gb" in r]
    whole_run = {"steps_measured": len(measured), "peak_memory_gb": max(peaks) if peaks else None,
                 "final_lm_loss": records[max(records)].get("loss/lm")}
    if not measured:  # no timing rather than one that includes the warmup (compilation, first allocations)
        return {**whole_run, "error": f"all {len(records)} logged steps are warmup (warmup_steps={warmup_steps}): "
                                      "no timing; run more steps or lower warmup_steps"}

    def median(key):
        values = [r[key] for r in measured if key in r]
        return statistics.median(values) if values else None

    tflops = median("perf/tflops_per_gpu")
    tokens = median("perf/tokens_per_second")
    return {**whole_run, "median_step_seconds": median("perf/step_seconds"),
            "tokens_per_second_per_gpu": None if tokens is None else tokens / num_gpus,
            "tflops_per_gpu": tflops, "mfu": None if tflops is None else tflops / peak_tflops}


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def collect(out: str | Path, *, log=print, warn=_warn) -> list[dict]:
    """Rows of the sweep in <out> (as submitted: <out>/sweep.json); writes results.csv/.json, agto_overhead.csv
    and the plots next to them. Returns the rows. ``warn``: where a point that was ok and is no longer is said."""
    out = Path(out)
    sweep_file = out / "sweep.json"
    if not sweep_file.is_file():
        raise ValueError(f"{out} has no sweep.json: not a sweep directory (run `avar sweep --config ...` first)")
    sweep = read_sweep_file(sweep_file, "config", "points")
    settings, points = sweep["config"], sweep["points"]
    jobs = load_state(out)
    last = {p["name"]: jobs[p["name"]][-1] for p in points if jobs.get(p["name"])}
    try:
        states = job_states(sorted(set(last.values())))
    except SlurmUnavailable as error:  # the run directories still tell which points finished
        log(f"[sweep] {error}; the states of unfinished points are reported as UNKNOWN")
        states = dict.fromkeys(last.values(), "UNKNOWN")
    rows = []
    for point in points:
        run_dir, job = run_dir_of(out, point["name"]), last.get(point["name"])
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row.update({k: point[k] for k in ("name", "model", "nodes", "num_gpus", "tp", "pp", "dp", "seq_length",
                                          "agto", "steps")})
        row["cp"] = point.get("cp", 1)  # (sweeps written before CP ran every point at 1)
        row.update(job_id=job, run_dir=str(run_dir))
        row["log"], row["error"] = _log_and_error(run_dir, job)
        plan = point.get("plan")
        if plan is not None:
            row["planned_peak_gb"] = plan["planned_peak_gb"]
        if run_finished(run_dir):
            row["state"], row["error"] = "ok", ""  # (an earlier attempt's error in its log is not this run's)
            row.update(_metrics_row(run_dir, point["num_gpus"], settings["warmup_steps"],
                                    settings["peak_tflops_per_gpu"]))
            if row["error"]:
                log(f"[sweep] {point['name']}: {row['error']}")
        elif plan is not None and not plan["fits"] and job is None:
            row["state"], row["error"] = DOES_NOT_FIT, describe_misfit(plan)
        else:
            row["state"] = "NOT_SUBMITTED" if job is None else states.get(job, "UNKNOWN")
            if row["state"] == "COMPLETED":  # Slurm says it ended well but the run did not reach its last step
                row["state"] = "INCOMPLETE"
        rows.append(row)
    rows = _keep_earlier_results(out, rows, warn)
    _write(out, rows)
    overhead = agto_overhead(rows)
    _write_csv(out / "agto_overhead.csv", OVERHEAD_COLUMNS, overhead)
    from megatron_avar.sweep.plots import plot_agto_overhead, plot_scaling

    plot_scaling(rows, out / "throughput_vs_gpus.png")
    plot_agto_overhead(overhead, out / "agto_overhead.png")
    for row in rows:
        if row["state"] != "ok":
            log(f"[sweep] {row['name']}: {row['state']} (job {row['job_id']}, log {row['log'] or '-'})"
                + (f": {row['error']}" if row["error"] else ""))
    done = sum(r["state"] == "ok" for r in rows)
    log(f"[sweep] {done}/{len(rows)} points finished; {out / 'results.csv'}")
    return rows


def _keep_earlier_results(out: Path, rows: list[dict], warn) -> list[dict]:
    """``rows``, where a point that was ok in the earlier results.json and is not now keeps its earlier row when no
    job was submitted for it since (its run directory was moved, deleted or damaged: the numbers are still that
    job's), and is replaced otherwise (a new job trains it again); said on stderr either way."""
    try:
        earlier = json.loads((out / "results.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return rows
    if not isinstance(earlier, list):
        return rows
    was_ok = {r["name"]: r for r in earlier if isinstance(r, dict) and r.get("state") == "ok" and "name" in r}
    result = []
    for row in rows:
        before = was_ok.get(row["name"])
        if before is None or row["state"] == "ok":
            result.append(row)
        elif before.get("job_id") == row["job_id"]:
            warn(f"[sweep] warning: {row['name']}: {row['run_dir']} has no finished run ({row['state']}), but it was "
                 f"ok in the earlier {out / 'results.json'} with the same job: its earlier row is kept. Restore the "
                 "run directory, or re-run the sweep to train the point again")
            result.append({**dict.fromkeys(COLUMNS), **{k: v for k, v in before.items() if k in COLUMNS}})
        else:
            warn(f"[sweep] warning: {row['name']}: was ok in the earlier {out / 'results.json'} (job "
                 f"{before.get('job_id')}), now {row['state']} with job {row['job_id']}: its earlier numbers are "
                 "replaced")
            result.append(row)
    return result


def agto_overhead(rows: list[dict]) -> list[dict]:
    """Per layout (everything but agto equal) with both an AGTO-on and an AGTO-off finished run: the step time
    and peak memory of each and on/off - 1 (step_time_overhead) and on - off (extra_memory_gb)."""
    def layout(row):  # the point's name without its AGTO part (names are deterministic, see sweep.grid)
        return row["name"].replace("_agto-on", "").replace("_agto-off", "")

    pairs: dict[str, dict[bool, dict]] = {}
    for row in rows:
        if row["state"] == "ok" and row["median_step_seconds"]:
            pairs.setdefault(layout(row), {})[bool(row["agto"])] = row
    result = []
    for name, pair in pairs.items():
        if True in pair and False in pair:
            on, off = pair[True], pair[False]
            memory = (None if on["peak_memory_gb"] is None or off["peak_memory_gb"] is None
                      else on["peak_memory_gb"] - off["peak_memory_gb"])
            result.append({"layout": name, "step_seconds_agto_off": off["median_step_seconds"],
                           "step_seconds_agto_on": on["median_step_seconds"],
                           "step_time_overhead": on["median_step_seconds"] / off["median_step_seconds"] - 1,
                           "peak_memory_gb_agto_off": off["peak_memory_gb"],
                           "peak_memory_gb_agto_on": on["peak_memory_gb"], "extra_memory_gb": memory})
    return result


def _write_csv(path: Path, columns, rows: list[dict]) -> None:
    with atomic_files.replacing(path) as temporary, temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _write(out: Path, rows: list[dict]) -> None:
    _write_csv(out / "results.csv", COLUMNS, rows)
    atomic_files.write_json(out / "results.json", rows)
