"""tools/gpu_check.py, the one command a session lent a GPU runs, works before a GPU is lent: its dry run
(the same steps at toy sizes on the CPU, tests collected, Triton interpreted) passes and writes its report and
its archive."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_the_report(tmp_path):
    earlier = tmp_path / "role_attention_gpu_earlier-run.json"  # an older result in the same folder
    earlier.write_text("{}")
    os.utime(earlier, (1e9, 1e9))
    archive = tmp_path / "gpu_check.tgz"  # beside the results, as in the folder a lent machine sends back
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry-run", "--out-dir",
                           str(tmp_path), "--archive", str(archive)], capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(next(tmp_path.glob("gpu_check_cpu-dry-run_*.json")).read_text())
    steps = {step["name"]: step for step in report["steps"]}
    # the kernel benchmark before bench_sft, which takes what is left of its limit; the sweep only when asked
    assert list(steps) == ["environment", "triton_kernels", "gpu_tests", "bench_role_attention", "bench_sft",
                           "bench_grpo"]
    assert "--deadline-s" in steps["bench_sft"]["command"]
    assert "--continue-on-collection-errors" in steps["gpu_tests"]["command"]
    assert all(step["status"] == "passed" for step in steps.values())
    assert all(step["host_peak_rss_gib"] > 0 for step in steps.values())
    assert report["meta"]["environment"]["host_memory_gib"] > 0
    assert report["meta"]["environment"]["imports"]["megatron.core"] == "0.16.1"
    assert "test_triton_error_budget_at_long_sequences_on_gpu" in steps["triton_kernels"]["log_tail"]
    assert "test_cuda_fp32_step_equals_the_cpu_step" in steps["gpu_tests"]["log_tail"]
    for bench in ("role_attention_cpu_*", "bench_sft_cpu-smoke_*", "bench_grpo_cpu-smoke-tiny_*"):
        assert len(list(tmp_path.glob(bench + ".json"))) == 1, bench
    assert (tmp_path / next(tmp_path.glob("gpu_check_*.md")).name).read_text().count("| passed |") == 6
    # --profile found the probe's autograd functions in the profiled step; --paired timed both modes on each batch
    sft_rows = json.loads(next(tmp_path.glob("bench_sft_cpu-smoke_*.json")).read_text())["rows"]
    probe = next(row for row in sft_rows if row["mode"] == "probe")
    assert 0 < probe["probe_share"] < 1
    assert probe["paired_ratio"] > 0 and probe["rounds"] == 1
    # The archive holds this run's report, results and step logs, not what the folder held before.
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for stem in ("gpu_check_cpu-dry-run_*", "role_attention_cpu_*", "bench_sft_cpu-smoke_*",
                 "bench_grpo_cpu-smoke-tiny_*"):
        for suffix in (".json", ".md"):
            wanted = {f"results/{p.name}" for p in tmp_path.glob(stem + suffix)}
            assert wanted and wanted <= names, (stem, suffix, sorted(names))
    assert "results/" + earlier.name not in names
    assert not any(name.endswith((".tgz", ".partial")) for name in names)  # not itself, nor a half-written file
    assert {f"logs/{step}.log" for step in steps} <= names
    assert not archive.with_name(archive.name + ".partial").exists()
    sweep = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry-run", "--only",
                            "triton_sweep", "--out-dir", str(tmp_path / "sweep")], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]


def test_unknown_step_is_refused_by_name(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry-run", "--only", "bench_xyz",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode != 0
    assert "unknown step(s) bench_xyz" in done.stderr and "bench_sft" in done.stderr


def test_offline_wheels_refuses_a_python_version_it_cannot_tag_and_unknown_options():
    done = subprocess.run(["bash", str(REPO / "tools" / "offline_wheels.sh"), "unused-dir", "312"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert "PYTHON_VERSION must look like 3.12" in done.stderr and "'312'" in done.stderr
    done = subprocess.run(["bash", str(REPO / "tools" / "offline_wheels.sh"), "--dir", "x"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "unknown option '--dir'" in done.stderr
    assert not (REPO / "--dir").exists()


def test_a_step_past_its_limit_is_killed_with_its_process_tree(tmp_path):
    """Its whole process group (here a shell and two children) is killed at the limit and waited for; the
    report names the timeout, and the next step is not held up."""
    step = gpu_check.Step("sleepy", ["bash", "-c", "sleep 120 & sleep 120 & wait"], timeout_s=2)
    started = time.monotonic()
    result = gpu_check.run_step(step, tmp_path, dict(os.environ), seconds_left=600)
    assert result["status"] == "timed out after 2 s"
    assert time.monotonic() - started < 20
    done = gpu_check.run_step(gpu_check.Step("quick", [sys.executable, "-c", "print('ok')"], timeout_s=30), tmp_path,
                              dict(os.environ), seconds_left=600)
    assert done["status"] == "passed" and "ok" in done["log_tail"] and done["host_peak_rss_gib"] >= 0
