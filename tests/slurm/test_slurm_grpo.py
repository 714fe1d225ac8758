"""slurm/avar_grpo_7b.sh on the real one-node Slurm cluster (see test_slurm_sft.py): the GPU script with its
#SBATCH defaults overridden for 2 CPU ranks, examples/grpo/tiny.yaml (TP=2, the local rollout backend), the toy
Qwen2.5-VL and the procedural dataset. USR1 after the first logged step: the ranks checkpoint, the job
requeues itself, resumes and finishes every step, and the reward curve of every step is in metrics.jsonl."""

import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

REPO = Path(__file__).parents[2]
STEPS = 4
JOB_TIMEOUT_S = 400
CPU_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=8G",
              "--time=15", "--signal=B:USR1@60"]


@pytest.fixture(scope="module")
def preempted_job(tmp_path_factory, slurm_installed, sft_inputs):
    from megatron_avar.testing.slurm import LocalSlurm

    root = tmp_path_factory.mktemp("slurm_grpo")
    run_dir = root / "grpo"
    env = {"CONFIG": "examples/grpo/tiny.yaml", "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
           "OVERRIDES": f"model.hf_path={sft_inputs['hf_path']} data.path={sft_inputs['data_path']} "
                        "rollout.max_new_tokens=12 rollout.n=2 checkpoint.interval=0"}
    with LocalSlurm.start() as cluster:
        job = cluster.sbatch([*CPU_SBATCH, "--job-name=avar-grpo", f"--output={root}/sbatch-%j.out",
                              "slurm/avar_grpo_7b.sh", f"train.steps={STEPS}"], env=env, cwd=REPO)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), f"job {job} ended before a step"
            assert time.monotonic() < deadline, f"job {job} logged no step in {JOB_TIMEOUT_S} s"
            time.sleep(0.2)
        cluster.run(["scancel", "--batch", "--signal=USR1", job])
        info = cluster.wait(job, timeout_s=JOB_TIMEOUT_S)
    return dict(job=job, info=info, run_dir=run_dir)


def test_preempted_grpo_job_requeues_resumes_and_finishes(preempted_job):
    run_dir, info = preempted_job["run_dir"], preempted_job["info"]
    log = (run_dir / f"slurm-{preempted_job['job']}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert int(info.get("Restarts", 0)) >= 1, "the job did not requeue itself after USR1"
    assert "resumed from" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert {r["step"] for r in records} == set(range(STEPS))
    for record in records:
        assert {"reward/total", "reward/accuracy", "reward/format", "reward/r_visual"} <= record.keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["last_step"] == STEPS - 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS - 1:08d}"
