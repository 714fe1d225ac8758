"""`avar sweep` on a real one-node Slurm cluster (megatron_avar.testing.slurm; Debian's Slurm, apt-installed when
missing): examples/sweeps/tiny_cpu.yaml (slurm/avar_sft_7b.sh with examples/sft/slurm_tiny.yaml on 2 CPU
ranks, TP=2, AGTO on and off, 3 steps) plus one point that fails on purpose (TP=1 with avar.layers=[7] on a
2-layer model: the config loads, the job fails when the model is built), max_concurrent=1.

1. Submitting with --no-wait queues all three jobs, each after the previous one (dependency chain): Slurm never
   runs two at once (start/end times from scontrol).
2. `avar sweep collect`: results.csv has the two finished points with their numbers (checked against
   metrics.jsonl and Slurm's own run time) and the failed point with state FAILED, its log and the error;
   agto_overhead.csv pairs the two TP=2 runs; the plots are PNG files.
3. Running the sweep again skips the finished points (their run directories untouched), resubmits only the
   failed one, waits for it and collects again. No process is left behind.
"""

import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
STEPS, WARMUP = 3, 1  # examples/sweeps/tiny_cpu.yaml
JOB_TIMEOUT_S = 240


def _slurm_time(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def _rows(out: Path) -> dict[str, dict]:
    with (out / "results.csv").open() as f:
        return {row["name"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, slurm_installed, sft_inputs):
    from megatron_avar.testing.slurm import LocalSlurm

    root = tmp_path_factory.mktemp("sweep")
    model, data = sft_inputs["hf_path"], sft_inputs["data_path"]
    out = root / "sweep"
    command = [sys.executable, "-m", "megatron_avar", "sweep", "--config", "examples/sweeps/tiny_cpu.yaml",
               "--poll-seconds", "1", f"out={out}",
               f"sft_overrides=[model.hf_path={model},data.path={data},checkpoint.interval=0,train.steps={STEPS}]",
               'points=[{tp: 1, overrides: ["avar.layers=[7]"]}]', f"slurm.env={{PYTHON: {sys.executable}}}"]
    result = {"out": out}
    with LocalSlurm.start() as cluster:
        def avar(*extra):
            done = subprocess.run([*command, *extra], env=cluster.env, cwd=REPO, capture_output=True, text=True,
                                  timeout=3 * JOB_TIMEOUT_S)
            return done.returncode, done.stdout + done.stderr

        started = time.monotonic()
        result["submit"] = avar("--no-wait")
        assert result["submit"][0] == 0, result["submit"][1]
        state = json.loads((out / "state.json").read_text())["jobs"]
        result["first_jobs"] = {name: ids[-1] for name, ids in state.items()}
        result["queued"] = {j: cluster.job(j) for j in result["first_jobs"].values()}  # right after submission
        for job in sorted(result["first_jobs"].values(), key=int):
            cluster.wait(job, timeout_s=JOB_TIMEOUT_S)
        result["finished"] = {j: cluster.job(j) for j in result["first_jobs"].values()}
        collect = subprocess.run([sys.executable, "-m", "megatron_avar", "sweep", "collect", "--out", str(out)],
                                 env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
        result["collect"] = (collect.returncode, collect.stdout + collect.stderr)
        result["first_rows"] = _rows(out)
        result["state_after_collect"] = json.loads((out / "state.json").read_text())["jobs"]
        result["first_seconds"] = time.monotonic() - started
        result["metrics_mtimes"] = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")}
        result["rerun"] = avar()
        result["second_jobs"] = json.loads((out / "state.json").read_text())["jobs"]
        # the same sweep with another learning rate: its finished points trained otherwise
        result["changed"] = avar(f"sft_overrides=[model.hf_path={model},data.path={data},checkpoint.interval=0,"
                                 f"train.steps={STEPS},optim.lr=0.5]")
        result["jobs_after_changed"] = json.loads((out / "state.json").read_text())["jobs"]
        result["scratch"] = cluster.scratch
    result["leftover_pids"] = cluster.leftover_pids()
    print(f"\n[sweep] 3 points submitted, run and collected in {result['first_seconds']:.0f} s")
    return result


FAILING = "base_n1_tp1_pp1_dp2_seqbase_agto-on_stepsbase"  # + _x<hash of its overrides>
TP2_ON = "base_n1_tp2_pp1_dp1_seqbase_agto-on_stepsbase"
TP2_OFF = "base_n1_tp2_pp1_dp1_seqbase_agto-off_stepsbase"


def _failing_name(names) -> str:
    (name,) = [n for n in names if n.startswith(FAILING + "_x")]
    return name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_submission_respects_max_concurrent(sweep):
    code, output = sweep["submit"]
    assert code == 0, output
    jobs = sweep["first_jobs"]
    assert set(jobs) == {TP2_ON, TP2_OFF, _failing_name(jobs)}, output
    order = [jobs[TP2_ON], jobs[TP2_OFF], jobs[_failing_name(jobs)]]  # grid points, then explicit points
    assert order == sorted(order, key=int)
    # One chain (max_concurrent=1): each job waits for the previous one, as submitted.
    for previous, job in zip(order, order[1:]):
        assert f"afterany:{previous}" in sweep["queued"][job]["Dependency"], sweep["queued"][job]
    # And Slurm ran them one after the other.
    finished = sweep["finished"]
    for previous, job in zip(order, order[1:]):
        assert _slurm_time(finished[job]["StartTime"]) >= _slurm_time(finished[previous]["EndTime"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_collect_reports_finished_and_failed_points(sweep):
    code, output = sweep["collect"]
    assert code == 0, output
    rows, out, jobs = sweep["first_rows"], sweep["out"], sweep["first_jobs"]
    failing = _failing_name(rows)
    assert set(rows) == {TP2_ON, TP2_OFF, failing}
    for name in (TP2_ON, TP2_OFF):
        row = rows[name]
        assert row["state"] == "ok" and row["job_id"] == jobs[name], row
        assert (row["tp"], row["dp"], row["num_gpus"], row["agto"]) == ("2", "1", "2", str(name == TP2_ON))
        # The medians leave the warmup step out and come from the run's own metrics.jsonl ...
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        measured = [r for r in records if r["step"] >= WARMUP]
        assert int(row["steps_measured"]) == STEPS - WARMUP == len(measured)
        step_seconds = float(row["median_step_seconds"])
        assert step_seconds == pytest.approx(statistics.median(r["perf/step_seconds"] for r in measured))
        assert float(row["tokens_per_second_per_gpu"]) == pytest.approx(
            statistics.median(r["perf/tokens_per_second"] for r in measured) / 2)
        assert float(row["mfu"]) == pytest.approx(float(row["tflops_per_gpu"]) / 989.0)
        # ... and are consistent with what Slurm measured: the steps fit in the job's run time.
        info = sweep["finished"][jobs[name]]
        run_seconds = _slurm_time(info["EndTime"]) - _slurm_time(info["StartTime"])
        assert 0 < step_seconds * STEPS <= run_seconds + 1, (step_seconds, info["RunTime"])
        # Peak memory: the CPU ranks' peak RSS (torch + megatron + the toy model: well above 100 MB, below RAM).
        assert 0.1 < float(row["peak_memory_gb"]) < 24
        assert float(row["final_lm_loss"]) > 0
    bad = rows[failing]
    assert bad["state"] == "FAILED" and bad["job_id"] == jobs[failing], bad
    assert bad["median_step_seconds"] == "" and bad["tokens_per_second_per_gpu"] == ""
    assert Path(bad["log"]) == out / "runs" / failing / f"slurm-{jobs[failing]}.out" and Path(bad["log"]).is_file()
    assert "avar.layers [7]" in bad["error"], bad
    assert f"{failing}: FAILED (job {jobs[failing]}" in output
    assert sweep["state_after_collect"] == {n: [j] for n, j in jobs.items()}  # collect submitted nothing

    as_json = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    assert as_json[failing]["state"] == "FAILED" and as_json[TP2_ON]["median_step_seconds"] > 0
    with (out / "agto_overhead.csv").open() as f:
        (overhead,) = list(csv.DictReader(f))
    assert overhead["layout"] == "base_n1_tp2_pp1_dp1_seqbase_stepsbase"
    assert float(overhead["step_time_overhead"]) == pytest.approx(
        float(rows[TP2_ON]["median_step_seconds"]) / float(rows[TP2_OFF]["median_step_seconds"]) - 1)
    for plot in ("throughput_vs_gpus.png", "agto_overhead.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rerun_skips_finished_points_and_resubmits_the_failed_one(sweep):
    code, output = sweep["rerun"]
    first, second, out = sweep["first_jobs"], sweep["second_jobs"], sweep["out"]
    failing = _failing_name(first)
    assert code == 1, output  # a point failed (again): the sweep says so with its exit code
    assert f"{TP2_ON}: finished, skipped" in output and f"{TP2_OFF}: finished, skipped" in output
    assert second[TP2_ON] == [first[TP2_ON]] and second[TP2_OFF] == [first[TP2_OFF]]
    assert len(second[failing]) == 2 and second[failing][0] == first[failing]
    assert int(second[failing][1]) > max(int(j) for j in first.values())
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.jsonl")} == sweep["metrics_mtimes"]
    rows = _rows(out)
    assert [rows[n]["state"] for n in (TP2_ON, TP2_OFF, failing)] == ["ok", "ok", "FAILED"]
    assert rows[failing]["job_id"] == second[failing][1]
    assert rows[TP2_ON]["median_step_seconds"] == sweep["first_rows"][TP2_ON]["median_step_seconds"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_finished_point_with_other_settings_is_refused_before_anything_is_submitted(sweep):
    code, output = sweep["changed"]
    assert code == 2 and "finished in" in output and "with other settings (optim.lr: ran" in output, output
    assert "now 0.5" in output and sweep["jobs_after_changed"] == sweep["second_jobs"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_no_leftover_processes(sweep):
    assert sweep["leftover_pids"] == []
    assert not Path(sweep["scratch"]).exists()


# -- without a cluster: the sweep config and its points --------------------------------------------------------

def test_example_grid_resolves_to_named_layouts(monkeypatch):
    from megatron_avar.config import load_config
    from megatron_avar.sweep.cli import _checked_points
    from megatron_avar.sweep.config import SweepConfig

    monkeypatch.chdir(REPO)
    config = load_config(SweepConfig, "examples/sweeps/h100_7b_scaling.yaml", ["slurm.account=acct"])
    points = _checked_points(config)  # every point's SFT config (examples/sft/avar_7b.yaml + overrides) loads
    assert len(points) == 3 * 2 * 2 * 2 and len({p.name for p in points}) == len(points)
    for point in points:
        spec = point.spec
        assert point.dp * spec.tp * spec.pp == point.num_gpus == 8 * spec.nodes
        assert f"train.global_batch_size={16 * point.dp}" in point.overrides
        assert ("avar.alpha=0" in point.overrides) == (not spec.agto)
        assert point.run_dir == Path(config.out) / "runs" / point.name
    named = {p.name: p for p in points}
    assert named["base_n2_tp4_pp1_dp4_seq8192_agto-off_steps200"].overrides[-4:] == (
        "train.steps=200", "avar.alpha=0", "avar.beta=0", "train.global_batch_size=64")
    # The same config gives the same names (re-runs find their run directories).
    from megatron_avar.sweep.grid import resolve_points

    assert [p.name for p in resolve_points(config)] == [p.name for p in points]


def test_a_context_parallel_point_divides_its_ranks_by_cp_too(monkeypatch):
    """grid.cp: DP = ranks / (TP x PP x CP), the point's name says cp (names of CP=1 points are unchanged), and its
    run gets parallel.context_parallel_size."""
    from megatron_avar.config import load_config
    from megatron_avar.sweep.config import SweepConfig
    from megatron_avar.sweep.grid import resolve_points

    monkeypatch.chdir(REPO)
    config = load_config(SweepConfig, "examples/sweeps/h100_7b_scaling.yaml",
                         ["slurm.account=acct", "grid.cp=[1,2]", "grid.nodes=[2]", "grid.tp=[2]", "grid.seq_length=[]",
                          "grid.agto=[true]"])
    points = {p.spec.cp: p for p in resolve_points(config)}
    assert (points[1].dp, points[2].dp) == (8, 4)
    assert "_cp" not in points[1].name and "_tp2_pp1_cp2_dp4_" in points[2].name
    assert "parallel.context_parallel_size=2" in points[2].overrides
    assert points[2].as_dict()["cp"] == 2


@pytest.mark.parametrize("overrides, message", [
    (["grid.tp=[3]"], "not divisible by tp x pp"),
    (["sft_overrides=[optim.lr= 1.0e-5]"], "without spaces"),
    (["gpus_per_node=0"], "ranks_per_node must be set"),
    (["points=[{tp: 0}]"], "nodes/tp/pp/cp must be >= 1"),
    (["grid.cp=[3]"], "not divisible by tp x pp x cp"),
    (["points=[{layout: 2}]"], "unknown config key(s) points[0].layout"),
    (["slurm.env={RUN_DIR: x}"], "slurm.env.RUN_DIR is set by the sweep"),
    (["grid.enabled=false"], "the sweep has no points"),
    (["points=[{overrides: [train.precision=fp64]}]", "grid.enabled=false"], "train.precision='fp64'"),
    (["points=[{model: /models/my model}]"], "point model '/models/my model' contains whitespace"),
    (["grid.model=[/models/my model]"], "point model '/models/my model' contains whitespace"),
])
def test_bad_sweep_configs_fail_before_submitting(tmp_path, capsys, overrides, message):
    from megatron_avar.cli import main

    code = main(["sweep", "--config", str(REPO / "examples/sweeps/h100_7b_scaling.yaml"), f"out={tmp_path}/s",
                 f"sft_config={REPO / 'examples/sft/avar_7b.yaml'}", f"script={REPO / 'slurm/avar_sft_7b.sh'}",
                 *overrides])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s" / "state.json").exists()  # nothing was submitted


def test_a_failing_sbatch_is_one_line_naming_the_point(tmp_path, monkeypatch, capsys):
    from megatron_avar.cli import main

    monkeypatch.chdir(REPO)
    for tool, script in (("sbatch", "echo 'sbatch: error: Unable to contact slurm controller' >&2; exit 1"),
                         ("squeue", "exit 0"), ("sacct", "exit 0"), ("scontrol", "exit 1")):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{script}\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert main(["sweep", "--config", "examples/sweeps/tiny_cpu.yaml", f"out={tmp_path / 's'}", "--no-wait"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("avar sweep: error: sbatch for point ") and "Unable to contact slurm controller" in error
    assert "Traceback" not in error


def test_a_refused_or_concurrent_submission_leaves_the_earlier_sweep_as_it_was(tmp_path, monkeypatch, capsys):
    """Before: sweep.json was rewritten before the checks (a re-run refused for other settings left the finished
    results described by settings they were not run with), and two submissions at once chained their jobs apart,
    each saving only its own job ids."""
    import fcntl

    from megatron_avar.cli import main
    from megatron_avar.config import load_config
    from megatron_avar.sweep.config import SweepConfig
    from megatron_avar.sweep.grid import resolve_points
    from megatron_avar.training.run_lock import LOCK_FILE

    monkeypatch.chdir(REPO)
    out = tmp_path / "s"
    command = ["sweep", "--config", "examples/sweeps/tiny_cpu.yaml", f"out={out}", "--no-wait"]
    finished = resolve_points(load_config(SweepConfig, "examples/sweeps/tiny_cpu.yaml", [f"out={out}"]))[0].run_dir
    finished.mkdir(parents=True)  # a point that finished with another learning rate
    (finished / "config.json").write_text(json.dumps({"train": {"steps": 1}, "optim": {"lr": 99.0}}))
    (finished / "summary.json").write_text(json.dumps({"stopped_by": None, "last_step": 0}))
    (out / "sweep.json").write_text("earlier")
    (tmp_path / "bin").mkdir()
    assert main(command) == 2 and "with other settings (optim.lr: ran 99.0" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == "earlier"
    shutil.rmtree(finished)
    for tool in ("sbatch", "squeue", "sacct"):
        (tmp_path / "bin" / tool).write_text("#!/bin/sh\necho 7\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with (out / LOCK_FILE).open("a+") as held:  # another submission, in progress
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(command) == 2
    assert f"{out} is in use by" in (error := capsys.readouterr().err) and "two `avar sweep` submissions" in error
    assert (out / "sweep.json").read_text() == "earlier" and not (out / "state.json").exists()


def test_collect_outside_a_sweep_directory(tmp_path, capsys):
    from megatron_avar.cli import main

    assert main(["sweep", "collect", "--out", str(tmp_path / "nothing")]) == 2
    assert "has no sweep.json" in capsys.readouterr().err


def test_points_that_do_not_fit_the_gpu_are_reported_not_submitted(tmp_path, monkeypatch, capsys):
    """examples/sweeps/h100_7b_scaling.yaml plans every point on an H100 (`avar plan`, the 7B dimensions), here
    given as 80 GB (gpu_memory_gb). Its base config (sequence parallelism, full recompute) fits everywhere; without
    sequence parallelism and with selective recompute, the 8k-token TP=2 point of 1 node (needs 83.8 GB) does not fit
    and is never submitted (on 2 nodes the optimizer shards over twice the ranks: 77.3 GB, it fits); the others go to
    sbatch (absent here, so the command stops there); collecting reports DOES_NOT_FIT with the plan's numbers."""
    from megatron_avar.cli import main
    from megatron_avar.sweep.collect import collect

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / squeue: nothing can be submitted by accident
    out = tmp_path / "sweep"
    code = main(["sweep", "--config", "examples/sweeps/h100_7b_scaling.yaml", f"out={out}", "gpu_memory_gb=80",
                 "sft_overrides=[checkpoint.interval=0, parallel.sequence_parallel=false, train.recompute=selective]"])
    captured = capsys.readouterr()
    assert code == 2 and "sbatch not found" in captured.err
    misfits = {"base_n1_tp2_pp1_dp4_seq8192"}
    skipped = {line.split(":")[0].removeprefix("[sweep] ") for line in captured.out.splitlines()
               if "does not fit H100 80GB" in line and line.endswith("not submitted")}
    assert {name.rsplit("_agto", 1)[0] for name in skipped} == misfits and len(skipped) == 2
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert all(p["plan"]["gpu"] == "H100 80GB (80 GB)" and p["plan"]["planned_peak_gb"] > 0 for p in points)
    rows = {row["name"]: row for row in collect(out, log=lambda *_: None)}
    for name, row in rows.items():
        fits = name.rsplit("_agto", 1)[0] not in misfits
        assert row["state"] == ("NOT_SUBMITTED" if fits else "DOES_NOT_FIT"), row
        assert row["planned_peak_gb"] > 0
        if not fits:
            assert "does not fit H100 80GB (80 GB): planned peak" in row["error"] and "of 80.0 GB" in row["error"]


def test_the_plan_of_a_point_takes_the_sweeps_row_shares(monkeypatch):
    """plan_image_fraction / plan_response_fraction reach the plan (before: the plan's defaults, whatever the data):
    more labelled tokens per row, more logits at the peak; shares over a whole row are refused, naming the point."""
    from megatron_avar.config import load_config
    from megatron_avar.sweep.config import SweepConfig
    from megatron_avar.sweep.fit import plan_points
    from megatron_avar.sweep.grid import resolve_points

    monkeypatch.chdir(REPO)
    one_point = ["grid.nodes=[1]", "grid.tp=[2]", "grid.seq_length=[8192]", "grid.agto=[true]"]

    def peak(*overrides):
        config = load_config(SweepConfig, "examples/sweeps/h100_7b_scaling.yaml", [*one_point, *overrides])
        (plan,) = plan_points(config, resolve_points(config)).values()
        return plan["planned_peak_gb"]

    assert peak("plan_response_fraction=0.5", "plan_image_fraction=0.3") > peak() > peak("plan_response_fraction=0.1")
    with pytest.raises(ValueError, match=r"point base_n1_tp2_pp1_dp4_seq8192_agto-on_steps200: image fraction 0.7 \+ "
                                         r"response fraction 0.35 exceed 1"):
        peak("plan_image_fraction=0.7")


@pytest.mark.parametrize("overrides, message", [
    (["gpu=a100"], "gpu='a100': allowed h100, h200"),
    (["gpu=null", "gpu_memory_gb=94"], "gpu_memory_gb=94.0 needs gpu set"),
    (["plan_model=13b"], "plan_model='13b': allowed 3b, 7b, 72b"),
])
def test_bad_gpu_settings_are_refused(overrides, message):
    from megatron_avar.config import load_config
    from megatron_avar.sweep.config import SweepConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(SweepConfig, REPO / "examples/sweeps/h100_7b_scaling.yaml", overrides)


def test_a_slow_slurm_controller_is_waited_out_and_named(tmp_path, monkeypatch, capsys):
    """Before: squeue past its 60 s limit ended a wait of hours (and `avar sweep collect`) with a traceback."""
    from megatron_avar.sweep import submit

    calls = tmp_path / "calls"
    (tmp_path / "squeue").write_text(f'#!/bin/sh\necho x >> "{calls}"\n[ "$(wc -l < "{calls}")" -le 1 ] && sleep 5\n'
                                     "exit 0\n")  # the first call hangs, later ones find the job gone
    (tmp_path / "sacct").write_text("#!/bin/sh\necho '7|COMPLETED'\n")
    for tool in ("squeue", "sacct"):
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(submit, "SLURM_TIMEOUT_S", 0.5)
    logged = []
    submit.wait_for_jobs(["7"], poll_s=0.01, log=logged.append)
    assert logged == ["[sweep] `squeue -h ...` did not answer within 0.5 s: the Slurm controller is slow or "
                      "unreachable; try again later; asking again in 0.01 s"]
    calls.write_text("")  # hangs again: a submission or a collect is told why, in one line
    with pytest.raises(submit.SlurmUnavailable, match="did not answer within 0.5 s"):
        submit.job_states(["7"])
    # sbatch that does not answer may still have queued the job: the point is named, and how to check
    (tmp_path / "sbatch").write_text("#!/bin/sh\nsleep 5\n")
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.chdir(REPO)
    from megatron_avar.cli import main

    assert main(["sweep", "--config", "examples/sweeps/tiny_cpu.yaml", f"out={tmp_path / 's'}", "--no-wait"]) == 2
    error = capsys.readouterr().err
    assert "avar sweep: error: point base_n1_" in error and "check `squeue --me`" in error, error


def test_a_run_with_only_warmup_steps_has_no_timing_rather_than_the_warmups(tmp_path, monkeypatch):
    """Before: with no step past warmup_steps, the medians silently took the warmup steps (a first step of
    compilation and allocation made a run look slow). Now its row has no timing and says why."""
    import dataclasses

    from megatron_avar.config import load_config
    from megatron_avar.sweep.collect import _metrics_row, collect
    from megatron_avar.sweep.config import SweepConfig
    from megatron_avar.sweep.grid import resolve_points

    monkeypatch.chdir(REPO)
    config = load_config(SweepConfig, "examples/sweeps/tiny_cpu.yaml", [f"out={tmp_path}", "warmup_steps=2"])
    points = resolve_points(config)
    (tmp_path / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(config), "points": [
        {**p.as_dict(), "plan": None} for p in points]}))
    run = points[0].run_dir
    run.mkdir(parents=True)
    records = [{"step": 0, "perf/step_seconds": 60.0, "perf/peak_memory_gb": 3.0, "loss/lm": 2.0},
               {"step": 1, "perf/step_seconds": 1.0, "perf/peak_memory_gb": 4.0, "loss/lm": 1.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"train": {"steps": 2}}))
    (run / "summary.json").write_text(json.dumps({"stopped_by": None, "last_step": 1}))
    logged = []
    row = next(r for r in collect(tmp_path, log=logged.append) if r["name"] == points[0].name)
    assert row["state"] == "ok" and row["steps_measured"] == 0 and row["median_step_seconds"] is None
    assert (row["peak_memory_gb"], row["final_lm_loss"]) == (4.0, 1.5)
    assert row["error"].startswith("all 2 logged steps are warmup (warmup_steps=2): no timing")
    assert any(row["error"] in line for line in logged)
    timed = _metrics_row(run, num_gpus=1, warmup_steps=1, peak_tflops=989.0)
    assert (timed["steps_measured"], timed["median_step_seconds"]) == (1, 1.0)


def _stub_slurm(bin_dir: Path, *, squeue_state: str | None) -> None:
    """sbatch answering job 41, 42, ... and squeue reporting every asked job in ``squeue_state`` (None: none)."""
    bin_dir.mkdir(exist_ok=True)
    counter = bin_dir / "next_job"
    counter.write_text("41")
    queue = "exit 0" if squeue_state is None else (
        f'for job in $(echo "$3" | tr , " "); do echo "$job {squeue_state}"; done')
    for tool, script in (("sbatch", f'echo "$@" >> {bin_dir / "sbatch.log"}; n=$(cat {counter}); '
                                    f'echo $((n + 1)) > {counter}; echo "$n"'),
                         ("squeue", queue), ("sacct", "exit 0"), ("scontrol", "exit 1")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / tool).chmod(0o755)


def test_a_rerun_keeps_the_earlier_grids_points_and_refuses_new_settings_for_queued_ones(tmp_path, monkeypatch,
                                                                                         capsys):
    """Found in review: a re-run rewrote sweep.json before anything else, so another grid dropped the earlier
    points (finished ones included) from the results, and changed settings were recorded for jobs still queued
    with the old ones."""
    from megatron_avar.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "s"
    base = ["sweep", "--config", "examples/sweeps/tiny_cpu.yaml", "--no-wait", f"out={out}"]
    _stub_slurm(tmp_path / "bin", squeue_state="PENDING")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert main(base) == 0
    first = json.loads((out / "sweep.json").read_text())["points"]
    assert len(first) == 2 and json.loads((out / "state.json").read_text())["jobs"] == {
        first[0]["name"]: ["41"], first[1]["name"]: ["42"]}
    capsys.readouterr()
    # the same points with another learning rate while their jobs are queued: refused, nothing changes
    record = (out / "sweep.json").read_bytes()
    assert main([*base, "sft_overrides=[checkpoint.interval=0,train.steps=3,optim.lr=0.5]"]) == 2
    error = capsys.readouterr().err
    assert f"point {first[0]['name']} has job 41 still PENDING, submitted with other settings (optim.lr=0.5" in error
    assert "scancel 41" in error and (out / "sweep.json").read_bytes() == record
    # another grid (AGTO on only): the earlier off point stays in the record, and collect still reports it
    assert main([*base, "grid.agto=[true]"]) == 0
    assert "1 point(s) of the earlier grid are not in this one" in capsys.readouterr().out
    assert sorted(p["name"] for p in json.loads((out / "sweep.json").read_text())["points"]) == sorted(
        p["name"] for p in first)
    # a new point queues behind every queued job, the dropped point's (42) too: max_concurrent holds across grids
    assert main([*base, "grid.agto=[true]", "points=[{tp: 1}]"]) == 0
    assert (tmp_path / "bin" / "sbatch.log").read_text().splitlines()[-1].count("--dependency=afterany:42") == 1


@pytest.mark.parametrize("name, content, message", [
    ("sweep.json", '{"mine": 2}', "sweep.json lacks config, points: not written by `avar sweep`"),
    ("sweep.json", "{not json", "sweep.json is unreadable (Expecting property name"),
    ("state.json", '{"mine": 1}', "state.json lacks jobs: not written by `avar sweep`"),
])
def test_a_damaged_or_foreign_sweep_file_is_named_not_replaced(tmp_path, monkeypatch, capsys, name, content, message):
    """Found in review: a KeyError traceback, or a JSON error naming no file; a sweep.json of something else was
    replaced."""
    from megatron_avar.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "s"
    out.mkdir()
    (out / name).write_text(content)
    _stub_slurm(tmp_path / "bin", squeue_state=None)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert main(["sweep", "--config", "examples/sweeps/tiny_cpu.yaml", f"out={out}", "--no-wait"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("avar sweep: error: ") and message in error and "Traceback" not in error
    assert (out / name).read_text() == content
    if name == "sweep.json":
        assert main(["sweep", "collect", "--out", str(out)]) == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--poll-seconds", "0"), ("--poll-seconds", "-1"),
                                         ("--timeout-seconds", "0")])
def test_wait_settings_are_checked_before_submitting(tmp_path, capsys, flag, value):
    from megatron_avar.cli import main

    assert main(["sweep", "--config", str(REPO / "examples/sweeps/tiny_cpu.yaml"), flag, value,
                 f"out={tmp_path / 's'}"]) == 2
    assert f"avar sweep: error: {flag} {value}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, message", [
    (["collect", "--no-wait", "--poll-seconds", "5"], "`avar sweep collect` does not wait for jobs: --no-wait, "
                                                      "--poll-seconds apply only to a sweep that submits"),
    (["out=x", "collect"], "`collect` comes first, before any KEY=VALUE override"),
])
def test_collect_refuses_what_it_would_ignore(tmp_path, capsys, args, message):
    """Found in review: `avar sweep collect --no-wait --poll-seconds 5` ignored both flags, and `collect` after an
    override was read as a malformed override."""
    from megatron_avar.cli import main

    assert main(["sweep", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def _submit_finished_sweep(tmp_path: Path, monkeypatch, out: str) -> Path:
    """examples/sweeps/tiny_cpu.yaml submitted from ``tmp_path / "submit"`` with ``out`` (as given) to stub Slurm
    (sacct says COMPLETED), and both points given a finished run; returns the sweep folder."""
    from megatron_avar.cli import main

    submit_dir = tmp_path / "submit"
    submit_dir.mkdir()
    monkeypatch.chdir(submit_dir)
    _stub_slurm(tmp_path / "bin", squeue_state=None)
    (tmp_path / "bin" / "sacct").write_text('#!/bin/sh\nfor job in $(echo "$5" | tr , " "); do echo "$job|COMPLETED"; '
                                            "done\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert main(["sweep", "--config", str(REPO / "examples/sweeps/tiny_cpu.yaml"), "--no-wait", f"out={out}",
                 f"sft_config={REPO / 'examples/sft/slurm_tiny.yaml'}", f"script={REPO / 'slurm/avar_sft_7b.sh'}"]) == 0
    sweep_dir = submit_dir / out
    for point in json.loads((sweep_dir / "sweep.json").read_text())["points"]:
        run = sweep_dir / "runs" / point["name"]
        records = [{"step": s, "perf/step_seconds": 2.0 + s, "perf/tokens_per_second": 1000.0, "loss/lm": 5.0 - s}
                   for s in range(3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
        (run / "summary.json").write_text(json.dumps({"stopped_by": None, "last_step": 2}))
    return sweep_dir


def test_collect_finds_the_runs_from_any_directory_and_in_a_moved_sweep(tmp_path, monkeypatch, capsys):
    """Found in review: sweep.json recorded each run_dir as out= was given (relative to the submitting directory)
    and collect read it against its own: from another directory it found no run and rewrote results.csv with
    every finished point INCOMPLETE. Records written that way are still collected."""
    from megatron_avar.cli import main

    sweep_dir = _submit_finished_sweep(tmp_path, monkeypatch, "runs/sweeps/tiny")
    assert all(f"--output={sweep_dir}/runs/" in line  # the jobs still get absolute paths
               for line in (tmp_path / "bin" / "sbatch.log").read_text().splitlines())
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "collect", "--out", str(sweep_dir)]) == 0
    assert [row["state"] for row in _rows(sweep_dir).values()] == ["ok", "ok"]
    moved = tmp_path / "moved"
    shutil.move(sweep_dir, moved)
    assert main(["sweep", "collect", "--out", "moved"]) == 0
    rows = _rows(moved)
    assert [row["state"] for row in rows.values()] == ["ok", "ok"]
    assert all(row["run_dir"] == f"moved/runs/{name}" and row["median_step_seconds"] == "3.5"
               for name, row in rows.items())
    record = json.loads((moved / "sweep.json").read_text())
    assert [p["run_dir"] for p in record["points"]] == [f"runs/{name}" for name in rows]
    for point in record["points"]:  # as sweeps before recorded it: relative to the submitting directory
        point["run_dir"] = f"runs/sweeps/tiny/runs/{point['name']}"
    (moved / "sweep.json").write_text(json.dumps(record))
    (moved / "results.json").unlink()
    assert main(["sweep", "collect", "--out", "moved"]) == 0
    assert [row["state"] for row in _rows(moved).values()] == ["ok", "ok"]
    assert "warning" not in capsys.readouterr().err


def test_a_point_that_was_ok_is_not_made_worse_silently(tmp_path, monkeypatch, capsys):
    """Found in review: collect replaced a finished point's numbers with an empty row without a word. A run
    directory gone with no job since keeps its earlier row; a point trained again by a new job gets its new row;
    both are said on stderr."""
    from megatron_avar.cli import main

    sweep_dir = _submit_finished_sweep(tmp_path, monkeypatch, str(tmp_path / "sweep"))
    assert main(["sweep", "collect", "--out", str(sweep_dir)]) == 0
    first = _rows(sweep_dir)
    name = next(iter(first))
    shutil.rmtree(sweep_dir / "runs" / name)
    capsys.readouterr()
    assert main(["sweep", "collect", "--out", str(sweep_dir)]) == 0
    assert _rows(sweep_dir) == first
    error = capsys.readouterr().err
    assert f"[sweep] warning: {name}: {sweep_dir / 'runs' / name} has no finished run (INCOMPLETE), but it was ok " \
           "in the earlier" in error and "its earlier row is kept" in error
    state = json.loads((sweep_dir / "state.json").read_text())
    state["jobs"][name].append("43")  # trained again
    (sweep_dir / "state.json").write_text(json.dumps(state))
    assert main(["sweep", "collect", "--out", str(sweep_dir)]) == 0
    assert (_rows(sweep_dir)[name]["state"], _rows(sweep_dir)[name]["job_id"]) == ("INCOMPLETE", "43")
    assert f"{name}: was ok in the earlier" in (error := capsys.readouterr().err)
    assert "now INCOMPLETE with job 43: its earlier numbers are replaced" in error
    assert main(["sweep", "collect", "--out", str(sweep_dir)]) == 0
    assert "warning" not in capsys.readouterr().err
