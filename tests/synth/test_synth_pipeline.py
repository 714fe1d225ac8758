"""End to end: a run of `avar synth` killed mid-run (SIGKILL) resumes through NeMo Curator on Ray, loses
nothing and repeats no teacher request (counted at the server), writes the same dataset as an
uninterrupted run, and leaves no Ray process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_avar.synth.client import RequestCache
from megatron_avar.synth.pipeline import MANIFEST, run_synthesis
from synth_fake_teacher import FakeTeacher, Fault
from synth_helpers import dataset_rows, ray_processes, synth_config, synth_overrides

REPO = Path(__file__).resolve().parents[2]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_run_resumes_on_curator_without_repeating_requests(tmp_path, procedural_source, own_ray_tmpdir):
    data, facts, _ = procedural_source
    wrong = Fault("reason", ["wrong"], match="vertical leg", always=True)  # two records filtered out

    # Reference: an uninterrupted run (in-process stages, its own cache).
    with FakeTeacher(facts) as reference_teacher:
        reference_teacher.faults.append(wrong)
        reference = run_synthesis(synth_config(tmp_path / "reference", data, reference_teacher))
    expected_bodies = set(reference_teacher.ok_by_body)
    assert reference["kept"] == 6 and max(reference_teacher.ok_by_body.values()) == 1

    with FakeTeacher(facts) as teacher:
        teacher.faults.append(wrong)
        teacher.hold_after = 8  # the 8 descriptions get answered; then requests hang ...
        config = synth_config(tmp_path, data, teacher)
        config_file = tmp_path / "synth.yaml"
        config_file.write_text(yaml.safe_dump({
            "sources": [{"name": "proc", "path": str(data)}],
            "output": {"dir": config.output.dir}, "run": {"work_dir": config.run.work_dir, "batch_records": 3},
            "client": {"timeout_s": 60, "concurrency": 4},
            **{stage: {"teacher": {"base_url": teacher.base_url}} for stage in ("describe", "reason", "anchor")}}))
        cache = RequestCache(Path(config.run.work_dir) / "cache")
        log = (tmp_path / "killed.log").open("w")
        process = subprocess.Popen([sys.executable, "-m", "megatron_avar", "synth", "--config", str(config_file),
                                    "run.executor=local"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            # ... and the run is killed while they hang, after its 8 answers are in the cache.
            wait_until(lambda: len(cache) == 8 and teacher.in_flight > 0 or process.poll() is not None, 120,
                       "the run to reach 8 cached answers")
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
        assert not (Path(config.output.dir) / MANIFEST).exists()
        teacher.hold_after = None
        teacher.release.set()  # the hung requests of the dead run end as 503: nothing was paid for them

        # Resume, this time on NeMo Curator (Ray Data executor, local Ray started and stopped by the run).
        resumed = run_synthesis(synth_config(tmp_path, data, teacher, "run.executor=ray_data"))

    assert max(teacher.ok_by_body.values()) == 1  # no request answered twice over both runs
    assert set(teacher.ok_by_body) == expected_bodies  # and none missing
    cache_hits = sum(stats["cache_hits"] for stats in resumed["teachers"].values())
    answered = sum(stats["answered"] for stats in resumed["teachers"].values())
    assert (cache_hits, answered) == (8, len(expected_bodies) - 8)
    assert resumed["filters"] == reference["filters"] == {"verify.wrong_answer": 2}
    assert dataset_rows(Path(resumed["config"]["output"]["dir"]) / "data") == dataset_rows(
        Path(reference["config"]["output"]["dir"]) / "data")
    # No process of the run's Ray outlives the run (one that is still exiting gets a few seconds).
    deadline = time.time() + 10
    while ray_processes(own_ray_tmpdir) and time.time() < deadline:
        time.sleep(0.5)
    assert ray_processes(own_ray_tmpdir) == []


def test_a_stage_error_on_ray_reaches_the_cli_as_its_own_message(tmp_path, procedural_source, teacher, capsys):
    """Under the default executor (Ray Data) a stage's bad-input error is the CLI's usage error, its message
    naming the problem and the fix, not Ray's task error around a worker's traceback."""
    from megatron_avar.cli import main

    data, _, _ = procedural_source
    sources = f"sources=[{{name: t, path: '{data}', format: columns, image_column: nope}}]"
    assert main(["synth", *synth_overrides(tmp_path, data, teacher, "run.executor=ray_data", sources)]) == 2
    # (Ray's own logging reports the task's failure above it)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("avar synth: error: "))
    assert line.startswith("avar synth: error: source t: no column 'nope'") and "set sources[].image_column" in line
