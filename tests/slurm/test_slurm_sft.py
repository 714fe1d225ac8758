"""slurm/avar_sft_7b.sh on a real Slurm cluster: Debian's Slurm, one node on localhost (installed with apt when
missing, started by megatron_avar.testing.slurm), the SAME batch script as on the GPU cluster with its GPU
defaults overridden on the sbatch command line, examples/sft/slurm_tiny.yaml (TP=2 on 2 CPU ranks started by
srun), a toy Qwen2.5-VL and a procedural dataset.

1. A plain job trains all its steps, checkpoints, and leaves its log, Slurm environment and config in the
   run directory.
2. Preemption for real: the batch script gets USR1 (what `#SBATCH --signal=B:USR1@S` sends before the time
   limit) after the first logged step; the ranks checkpoint and stop, the job requeues itself, the requeued
   job resumes from the checkpoint and finishes, and its loss curve equals the uninterrupted job's.
3. SIGTERM (`scancel --batch --signal=TERM`, preemption): to the batch shell, passed on to the ranks as USR1 (srun
   kills the step on a TERM); to every process of the step, DataLoader workers included (they ignore it, or torch
   killed them and the rank failed mid-step). Either way the ranks checkpoint and stop, and the job is not requeued.
4. The cluster stops with no process left behind.
"""

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).parents[2]
STEPS = 4  # examples/sft/slurm_tiny.yaml
JOB_TIMEOUT_S = 300
# The GPU script's #SBATCH defaults, overridden for 2 CPU ranks on the 2-core local node.
CPU_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=4G",
              "--time=15", "--signal=B:USR1@60"]


def _metrics(run_dir: Path) -> dict[int, dict]:
    """The last logged record of every step (a resumed run may log a step again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def slurm_runs(tmp_path_factory, slurm_installed, sft_inputs):
    from megatron_avar.testing.slurm import LocalSlurm

    root = tmp_path_factory.mktemp("slurm_sft")
    model, data = sft_inputs["hf_path"], sft_inputs["data_path"]

    def submit(cluster, name: str, *overrides: str) -> tuple[str, Path, float]:
        run_dir = root / name
        env = {"CONFIG": "examples/sft/slurm_tiny.yaml", "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
               "OVERRIDES": " ".join([f"model.hf_path={model}", f"data.path={data}", *overrides])}
        job = cluster.sbatch([*CPU_SBATCH, f"--job-name=avar-{name}", f"--output={root}/sbatch-%j.out",
                              "slurm/avar_sft_7b.sh", f"train.steps={STEPS}"], env=env, cwd=REPO)
        return job, run_dir, time.monotonic()

    def signal_after_first_step(cluster, job: str, run_dir: Path, scancel: list[str]) -> float:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (metrics.is_file() and metrics.read_text().strip()):
            state = cluster.job(job).get("JobState")
            assert state in ("PENDING", "RUNNING"), f"job {job} is {state} before logging a step"
            assert time.monotonic() < deadline, f"job {job} logged no step in {JOB_TIMEOUT_S} s"
            time.sleep(0.2)
        cluster.run(["scancel", *scancel, job])
        return time.monotonic()

    results = {}
    with LocalSlurm.start() as cluster:
        job, run_dir, started = submit(cluster, "straight")
        info = cluster.wait(job, timeout_s=JOB_TIMEOUT_S)
        results["straight"] = dict(job=job, run_dir=run_dir, info=info, seconds=time.monotonic() - started)

        job, run_dir, started = submit(cluster, "preempted")
        signalled = signal_after_first_step(cluster, job, run_dir, ["--batch", "--signal=USR1"])
        info = cluster.wait(job, timeout_s=JOB_TIMEOUT_S)
        results["preempted"] = dict(job=job, run_dir=run_dir, info=info, seconds=time.monotonic() - started,
                                    first_step_seconds=signalled - started)
        # SIGTERM to the batch shell, and to every process of the step (with a DataLoader worker per rank)
        for name, scancel in (("terminated", ["--batch", "--signal=TERM"]), ("terminated-step", ["--signal=TERM"])):
            job, run_dir, _ = submit(cluster, name, "data.num_workers=1")
            signal_after_first_step(cluster, job, run_dir, scancel)
            results[name] = dict(job=job, run_dir=run_dir, info=cluster.wait(job, timeout_s=JOB_TIMEOUT_S))
        results["scratch"] = cluster.scratch
        results["daemon_pids"] = [process.pid for process in cluster.processes.values()]
    results["leftover_pids"] = cluster.leftover_pids()  # after stop: job processes that outlived the cluster
    print(f"\n[slurm] straight job {results['straight']['seconds']:.0f} s; preempted job: first step after "
          f"{results['preempted']['first_step_seconds']:.0f} s, done (incl. requeue) after "
          f"{results['preempted']['seconds']:.0f} s")
    return results


def test_job_trains_checkpoints_and_records_the_run(slurm_runs):
    run = slurm_runs["straight"]
    run_dir, job = run["run_dir"], run["job"]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert run["info"]["JobState"] == "COMPLETED" and run["info"]["ExitCode"] == "0:0", log[-4000:]

    assert sorted(_metrics(run_dir)) == list(range(STEPS))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_run"] == STEPS and summary["start_step"] == 0 and summary["stopped_by"] is None
    assert summary["layout"]["world_size"] == 2 and summary["layout"]["tp"] == 2  # 2 srun ranks, TP=2
    from megatron_avar.training.checkpointing import latest_checkpoint  # checks the checkpoint is complete

    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / f"step_{STEPS - 1:08d}"

    # Both ranks ran under srun (--label prefixes; world_size above): rank 0 logged every step, rank 1 said
    # nothing (a quiet console: no library warnings from the other ranks); no resume in a fresh run.
    assert "\n1: " not in log and all(f"0: step {s}/{STEPS}" in log for s in range(1, STEPS + 1))
    assert "resumed from" not in log
    config = json.loads((run_dir / "config.json").read_text())  # resolved by the trainer
    assert config["out"] == str(run_dir) and config["parallel"]["tensor_model_parallel_size"] == 2
    assert config["train"]["steps"] == STEPS  # the script's own argument reached the trainer
    environment = (run_dir / f"slurm-{job}.env").read_text()
    assert f"SLURM_JOB_ID={job}" in environment and "SLURM_NTASKS=2" in environment
    assert "MASTER_ADDR=localhost" in environment and f"MASTER_PORT={15000 + int(job) % 20000}" in environment
    given = (REPO / "examples/sft/slurm_tiny.yaml").read_text()
    assert (run_dir / f"config-input-{job}.yaml").read_text() == given  # by job: a second job never replaces it


def test_usr1_checkpoints_requeues_and_resumes_the_same_curve(slurm_runs):
    run = slurm_runs["preempted"]
    run_dir, job, info = run["run_dir"], run["job"], run["info"]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]  # requeued exactly once, by the batch script

    # Attempt 0: the signal reached the ranks through the trap and srun; they stopped at a step boundary.
    first, second = log.split("attempt 1 on", 1)
    assert "received SIGUSR1" in first and "stopping after step" in first and "requeueing job" in first
    stopped_at = int(first.split("stopping after step ")[1].split(":")[0])  # steps done before stopping
    assert 1 <= stopped_at < STEPS, "the signal must stop the run before its last step"
    # Attempt 1: the same command resumed from that checkpoint and ran the remaining steps.
    checkpoint = f"{run_dir}/checkpoints/step_{stopped_at - 1:08d}"
    assert f"resumed from {checkpoint}: continuing with step {stopped_at + 1}/{STEPS}" in second
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == stopped_at and summary["last_step"] == STEPS - 1
    assert summary["stopped_by"] is None

    # Model, optimizer, schedule, RNG and data position all came back: the curve equals the straight job's.
    resumed, straight = _metrics(run_dir), _metrics(slurm_runs["straight"]["run_dir"])
    assert sorted(resumed) == list(range(STEPS))
    for step in range(STEPS):
        for key in ("loss/lm", "avar/l_enh", "optim/lr"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-5, abs=1e-8), (step, key)


@pytest.mark.parametrize("name", ["terminated", "terminated-step"])
def test_sigterm_checkpoints_and_stops_without_requeueing(slurm_runs, name):
    """Found in review: a SIGTERM to the batch shell was passed to srun as a TERM, which srun answers by killing the
    step (no checkpoint, no summary); one to the whole step killed the DataLoader workers (torch's handler), and
    the ranks failed mid-step."""
    run = slurm_runs[name]
    run_dir, job, info = run["run_dir"], run["job"], run["info"]
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", log[-4000:]
    assert "stopping after step" in log and "killed by signal" not in log and "requeueing" not in log, log[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] in ("SIGTERM", "SIGUSR1") and summary["failed"] is None
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{summary['last_step']:08d}"
    if name == "terminated":
        assert "received SIGTERM: asking the ranks to checkpoint and stop" in log


def test_cluster_stops_without_leftovers(slurm_runs):
    assert slurm_runs["leftover_pids"] == []
    assert not Path(slurm_runs["scratch"]).exists()
    assert not [pid for pid in slurm_runs["daemon_pids"] if Path(f"/proc/{pid}").exists()]
