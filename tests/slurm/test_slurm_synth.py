"""slurm/synth.sh on the real one-node Slurm cluster (see test_slurm_sft.py): the GPU script with its #SBATCH
defaults overridden for the 2-core CPU node, VLLM_MODELS= (no vLLM server: the teachers are served elsewhere, here
by the synthesis tests' fake OpenAI-compatible teacher in this process), the script's own Ray cluster (its head on
the one node, free ports, a temp dir of its own, 8 logical CPUs) and `avar synth` driven from the head node on NeMo
Curator's Ray Data executor. The source is the synthesis tests' 8 procedural tasks; the teacher answers 2 of them
wrongly, so verify drops 2 records. A Ray token file is there, as on any machine where Ray ran before: `ray start`
turns token authentication on, and the script's driver must still get in.

1. A job cancelled (scancel) while the teacher holds every request after its first 8 answers (or, racing, a few
   more): no process of the job or of its Ray cluster is left, and the answers are in the request cache.
2. The same command submitted again: the job's pipeline joins the job's Ray cluster (RAY_ADDRESS; the stages run as
   actors of that cluster), resumes without asking the teacher anything twice, and writes the dataset and counts of
   the same config run without Slurm (in this process, local executor); the job ends COMPLETED, its cleanup stops
   the Ray cluster and no process is left behind.
3. A job whose teacher server fails to start (a fake `vllm` on PATH) fails at once, naming the servers' logs.
"""

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth"))
from synth_fake_teacher import FakeTeacher, Fault  # noqa: E402
from synth_helpers import dataset_rows, ray_processes, synth_config, write_procedural_source  # noqa: E402

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).parents[2]
JOB_TIMEOUT_S = 400
HELD_AFTER = 8  # teacher answers before the first job is cancelled
# The GPU script's #SBATCH defaults, overridden for the 2-core CPU node (--exclusive stays: the node is this test's).
CPU_SBATCH = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--mem=4G", "--time=15"]
# Two of the 8 tasks: the reasoner answers them wrongly, every time.
WRONG = Fault("reason", ["wrong"], match="vertical leg", always=True)
STAGE_ACTORS = {"DescribeStageActor", "ReasonStageActor", "AnchorStageActor", "VerifyStageActor"}


def _until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


def _nothing_left(cluster, ray_tmp: Path) -> bool:
    return not cluster.leftover_pids() and not ray_processes(ray_tmp)


@pytest.fixture(scope="module")
def synth_jobs(tmp_path_factory, slurm_installed):
    from megatron_avar.synth.client import RequestCache
    from megatron_avar.synth.pipeline import run_synthesis
    from megatron_avar.testing.slurm import LocalSlurm, free_port

    root = tmp_path_factory.mktemp("slurm_synth")
    started = time.monotonic()
    data, facts, _ = write_procedural_source(root)
    with FakeTeacher(facts) as reference_teacher:  # the same config without Slurm: this process, local executor
        reference_teacher.faults.append(WRONG)
        reference = run_synthesis(synth_config(root / "reference", data, reference_teacher))
    # Short (Ray's unix sockets live under it) and this test's own: two test sessions never share a Ray folder.
    reference_seconds = time.monotonic() - started
    ray_tmp = Path(tempfile.mkdtemp(prefix="avar-ray-"))
    # A Ray token file, as any earlier local `ray.init()` leaves in ~/.ray/auth_token (here at RAY_AUTH_TOKEN_PATH,
    # whatever the machine's home holds): `ray start` then turns token authentication on.
    token_file = root / "ray_auth_token"
    token_file.write_text(secrets.token_hex(32))
    results = dict(root=root, ray_tmp=ray_tmp, reference=reference,
                   reference_bodies=set(reference_teacher.ok_by_body))

    def submit(cluster, config: Path, name: str) -> dict:
        ray_port = free_port()
        # Every port Ray would otherwise take at a fixed default: another Ray on this machine may hold it.
        ray_args = (f"--num-cpus=8 --disable-usage-stats --dashboard-port={free_port()} "
                    f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()}")
        env = {"VLLM_MODELS": "", "VENV": str(Path(sys.executable).parents[1]), "RAY_PORT": str(ray_port),
               "RAY_ARGS": ray_args, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_TOKEN_PATH": str(token_file),
               "SERVER_WAIT_S": "30"}  # (a job that waits for teacher servers anyway fails soon)
        job = cluster.sbatch([*CPU_SBATCH, f"--job-name=avar-{name}", f"--chdir={root}",
                              f"--output={root}/slurm-%j.out", str(REPO / "slurm/synth.sh"), str(config),
                              "run.batch_records=3"], env=env, cwd=REPO)
        return dict(job=job, ray_port=ray_port, log=root / f"slurm-{job}.out", started=time.monotonic())

    try:
        with FakeTeacher(facts) as teacher:
            teacher.faults.append(WRONG)
            config = root / "synth.yaml"
            config.write_text(yaml.safe_dump({
                "sources": [{"name": "proc", "path": str(data)}],
                "output": {"dir": str(root / "out")},
                "run": {"work_dir": str(root / "work"), "executor": "ray_data", "batch_records": 4,
                        "progress_interval_s": 10},
                "client": {"timeout_s": 60, "concurrency": 4},
                **{stage: {"teacher": {"base_url": teacher.base_url}} for stage in ("describe", "reason", "anchor")}}))
            cache = RequestCache(root / "work" / "cache")
            with LocalSlurm.start() as cluster:
                # 1. Cancelled once the teacher's first answers are cached and the next requests hang.
                teacher.hold_after = HELD_AFTER
                first = submit(cluster, config, "synth-cancelled")

                seen: list[tuple[int, int]] = []

                def held() -> bool:
                    """The teacher holds every request now (it answered HELD_AFTER or, racing, a few more), each
                    answer is cached, and nothing changed since the last look (an answer still in flight would)."""
                    state = cluster.job(first["job"]).get("JobState")
                    log = first["log"].read_text()[-4000:] if first["log"].exists() else ""
                    assert state in ("PENDING", "RUNNING"), f"job {first['job']} is {state} before the scancel:\n{log}"
                    seen.append((teacher.num_ok, len(cache)))
                    answered, cached = seen[-1]
                    return (answered >= HELD_AFTER and cached == answered and teacher.in_flight > 0
                            and seen[-2:] == [seen[-1]] * 2)

                _until(held, JOB_TIMEOUT_S, f"{HELD_AFTER} cached answers and a held request")
                first["processes_while_running"] = ray_processes(ray_tmp)
                first["held_after_s"] = time.monotonic() - first["started"]
                cluster.run(["scancel", first["job"]])
                first["info"] = cluster.wait(first["job"], timeout_s=JOB_TIMEOUT_S)
                teacher.hold_after = None
                teacher.release.set()  # the held requests of the dead run end as 503: nothing was paid for them
                _until(lambda: _nothing_left(cluster, ray_tmp), 60, "the cancelled job's processes to end")
                first["stopped_after_s"] = time.monotonic() - first["started"] - first["held_after_s"]
                first["ok_by_body"] = Counter(teacher.ok_by_body)

                # 2. The same command again: it resumes and finishes.
                second = submit(cluster, config, "synth-resumed")
                second["info"] = cluster.wait(second["job"], timeout_s=JOB_TIMEOUT_S)
                second["seconds"] = time.monotonic() - second["started"]
                _until(lambda: _nothing_left(cluster, ray_tmp), 60, "the finished job's processes to end")
                results["daemon_pids"] = [process.pid for process in cluster.processes.values()]
                results["scratch"] = cluster.scratch
            results["leftover_pids"] = cluster.leftover_pids()  # after stop: job processes that outlived the cluster
            results["ok_by_body"] = Counter(teacher.ok_by_body)
        results["job_processes"] = ray_processes(ray_tmp)
        results.update(cancelled=first, resumed=second)
        print(f"\n[slurm] synth: reference run {reference_seconds:.0f} s; first job held after "
              f"{first['held_after_s']:.0f} s, gone {first['stopped_after_s']:.0f} s after scancel; resumed job "
              f"{second['seconds']:.0f} s; all {time.monotonic() - started:.0f} s")
        yield results
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _session_logs(log: str, ray_tmp: Path) -> Path:
    """The logs folder of the Ray session that the job's head started (the job log names it)."""
    session = re.search(r"/(session_[\w.-]+)/logs/ray_process_exit\.log", log)
    assert session, "the job log names no Ray session: did `ray start --head --block` run?"
    return ray_tmp / "ray" / session.group(1) / "logs"


def test_cancelled_job_leaves_its_answers_cached_and_no_process(synth_jobs):
    first = synth_jobs["cancelled"]
    log = first["log"].read_text()
    assert first["info"]["JobState"] == "CANCELLED", log[-4000:]
    # While it ran, the job's Ray cluster was there (found by the job's RAY_TMPDIR in the environment) ...
    names = {line.split(" ", 1)[0] for line in first["processes_while_running"]}
    assert {"raylet", "gcs_server"} <= names, first["processes_while_running"]
    # ... and once cancelled nothing of it is left (the fixture waited for that), with the answers kept.
    assert sum(first["ok_by_body"].values()) >= HELD_AFTER and max(first["ok_by_body"].values()) == 1
    assert "teachers per node: none (served elsewhere)" in log


def test_resubmitted_job_joins_the_jobs_ray_cluster_and_resumes(synth_jobs):
    second, root = synth_jobs["resumed"], synth_jobs["root"]
    log = second["log"].read_text()
    assert second["info"]["JobState"] == "COMPLETED" and second["info"]["ExitCode"] == "0:0", log[-4000:]

    # No vLLM server was started or waited for (VLLM_MODELS=): no server log, no wait.
    assert "teachers per node: none (served elsewhere)" in log
    assert not list((root / "logs").glob("*vllm*")) and "serving on all nodes" not in log
    # The script's Ray head started, and the pipeline joined it through RAY_ADDRESS instead of starting a Ray.
    port = second["ray_port"]
    assert "Ray runtime started." in log
    assert re.search(rf"Using address \S+:{port} set in the environment variable RAY_ADDRESS", log), log[-4000:]
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{port}", log)
    assert "Started a local Ray instance" not in log
    # The stages ran as actors of that cluster: their workers logged to the head's session folder.
    logs = _session_logs(log, synth_jobs["ray_tmp"])
    assert list(logs.glob("python-core-driver-*.log")), "no driver joined the job's Ray cluster"
    actors = {name for path in logs.glob("worker-*.out")
              for name in re.findall(r"^:actor_name:MapWorker\(MapBatches\((\w+)\)\)$", path.read_text(), re.MULTILINE)}
    assert STAGE_ACTORS <= actors, actors
    # The cleanup ran: the script stopped its steps (the Ray cluster with them).
    assert log.rstrip().endswith("[synth] ray cluster and teacher servers stopped"), log[-2000:]


def test_resumed_run_repeats_no_request_and_writes_what_a_run_without_slurm_writes(synth_jobs):
    reference = synth_jobs["reference"]
    manifest = json.loads((synth_jobs["root"] / "out" / "manifest.json").read_text())
    # Every request of the config was answered exactly once over both jobs, and none is missing.
    ok_by_body = synth_jobs["ok_by_body"]
    assert max(ok_by_body.values()) == 1 and set(ok_by_body) == synth_jobs["reference_bodies"]
    cache_hits = sum(stats["cache_hits"] for stats in manifest["teachers"].values())
    answered = sum(stats["answered"] for stats in manifest["teachers"].values())
    before = sum(synth_jobs["cancelled"]["ok_by_body"].values())  # the answers the cancelled job got
    assert (cache_hits, answered) == (before, len(synth_jobs["reference_bodies"]) - before)
    # The dataset and counts of the same config run without Slurm: 8 read, 2 wrong answers dropped by verify.
    assert (manifest["read"], manifest["kept"]) == (reference["read"], reference["kept"]) == (8, 6)
    assert manifest["filters"] == reference["filters"] == {"verify.wrong_answer": 2}
    assert dataset_rows(synth_jobs["root"] / "out" / "data") == dataset_rows(
        Path(reference["config"]["output"]["dir"]) / "data")
    # The script's own arguments reached the run (batch_records=3 on the command line over the file's 4).
    assert manifest["config"]["run"]["batch_records"] == 3 and manifest["config"]["run"]["executor"] == "ray_data"


def test_no_process_of_the_jobs_or_their_ray_clusters_is_left(synth_jobs):
    assert synth_jobs["leftover_pids"] == []
    assert synth_jobs["job_processes"] == []  # Ray daemons, workers, steps, drivers of both jobs
    assert not Path(synth_jobs["scratch"]).exists()
    assert not [pid for pid in synth_jobs["daemon_pids"] if Path(f"/proc/{pid}").exists()]


def test_a_teacher_server_that_fails_to_start_fails_the_job_at_once(tmp_path, slurm_installed):
    """Found in review: the server step's `wait` returned 0 even when every `vllm serve` failed, and the job polled
    for SERVER_WAIT_S (1800 s by default) before failing. A fake `vllm` on PATH: one model's server fails to start,
    the other's runs on; the job fails as soon as the server step has ended, naming the servers' logs, and leaves
    no process."""
    from megatron_avar.testing.slurm import LocalSlurm, free_port

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/bin/bash\n# vllm serve MODEL ...\n'
                                  'if [[ $2 == bad/model ]]; then echo "CUDA out of memory" >&2; exit 1; fi\n'
                                  'exec sleep 600\n')
    (bin_dir / "vllm").chmod(0o755)
    ray_tmp = Path(tempfile.mkdtemp(prefix="avar-ray-"))
    server_wait_s = 240  # what the job would wait without the fix: more than this test waits for it
    env = {"VLLM_MODELS": f"good/model@{free_port()}@0 bad/model@{free_port()}@1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(Path(sys.executable).parents[1]),
           "RAY_PORT": str(free_port()), "RAY_TMPDIR": str(ray_tmp),
           "RAY_ARGS": f"--num-cpus=2 --disable-usage-stats --dashboard-port={free_port()} "
                       f"--ray-client-server-port={free_port()} --dashboard-agent-listen-port={free_port()}",
           "SERVER_WAIT_S": str(server_wait_s)}
    try:
        with LocalSlurm.start() as cluster:
            started = time.monotonic()
            job = cluster.sbatch([*CPU_SBATCH, "--job-name=avar-synth-badserver", f"--chdir={tmp_path}",
                                  f"--output={tmp_path}/slurm-%j.out", str(REPO / "slurm/synth.sh"),
                                  str(tmp_path / "unused.yaml")], env=env, cwd=REPO)
            info = cluster.wait(job, timeout_s=server_wait_s - 60)
            seconds = time.monotonic() - started
            _until(lambda: _nothing_left(cluster, ray_tmp), 60, "the failed job's processes to end")
            leftover = cluster.leftover_pids()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", log[-3000:]
    assert re.search(rf"\[synth\] the teacher server step ended \(status [1-9]\d*\) before port \d+ served: see "
                     rf"logs/avar-synth-badserver-{job}-vllm-<node>\.out", log), log[-3000:]
    server_log = next((tmp_path / "logs").glob(f"avar-synth-badserver-{job}-vllm-*.out")).read_text()
    assert "CUDA out of memory" in server_log and "exited (status 1); stopping the others" in server_log
    assert "serving on all nodes" not in log and leftover == []
    print(f"\n[slurm] synth with a failing teacher server: FAILED after {seconds:.0f} s")
