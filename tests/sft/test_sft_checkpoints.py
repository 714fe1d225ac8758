"""Preemption and resume, through the real command line: a run stopped by SIGUSR1 (what Slurm sends before a
time limit) saves a checkpoint at the step it was on and exits; the same command started again resumes and
reproduces the loss curve of an uninterrupted run step for step (model, optimizer, schedule, RNG and data
position all restored). A half-written checkpoint left by a crash is never picked up, and the final
checkpoint exports to HF with logits equal to the megatron model's."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_cases import sft_overrides

STEPS = 5


def _sft(out: Path, sft_inputs, **extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "megatron_avar", "sft", "--config", "examples/sft/quickstart.yaml",
               *sft_overrides(sft_inputs, out, **{"train.steps": STEPS, "train.global_batch_size": 2,
                                                  "parallel.tensor_model_parallel_size": 1, **extra})]
    return subprocess.Popen(command, cwd=Path(__file__).parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(process: subprocess.Popen, timeout: float = 400) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/lm"] for r in records}


@pytest.fixture(scope="module")
def runs(sft_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    straight, interrupted = root / "straight", root / "interrupted"
    reference = _sft(straight, sft_inputs, **{"checkpoint.keep": 1})  # writes 2 checkpoints (interval 4), keeps 1
    victim = _sft(interrupted, sft_inputs)
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and victim.poll() is None:
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.2)
    victim.send_signal(signal.SIGUSR1)
    first_output = _finish(victim)
    first_summary = json.loads((interrupted / "summary.json").read_text())
    resumed_output = _finish(_sft(interrupted, sft_inputs))
    _finish(reference)
    return dict(straight=straight, interrupted=interrupted, first_summary=first_summary,
                first_output=first_output, resumed_output=resumed_output)


def test_each_step_logs_the_learning_rate_its_update_used(runs):
    """optim.lr 1e-3, 2 warm-up steps from 0, then cosine to 0 at step 5 (megatron's schedule): the rate a step
    trained with, not the next step's (which logged 0 for the last step, a step that still trained)."""
    import math

    records = [json.loads(line) for line in (runs["straight"] / "metrics.jsonl").read_text().splitlines()]
    cosine = [0.5 * (math.cos(math.pi * k / 3) + 1) * 1e-3 for k in (1, 2)]
    assert [r["optim/lr"] for r in records] == pytest.approx([0.0, 5e-4, 1e-3, *cosine])


def test_signal_stops_at_a_step_with_a_checkpoint(runs):
    summary = runs["first_summary"]
    assert summary["stopped_by"] == "SIGUSR1"
    assert summary["last_step"] < STEPS - 1, "the signal came after the last step: the test proves nothing"
    assert Path(summary["checkpoints"][-1]).name == f"step_{summary['last_step']:08d}"


def test_resumed_run_reproduces_the_uninterrupted_loss_curve(runs):
    resumed_from = runs["first_summary"]["last_step"] + 1  # (a step index; the console counts from 1)
    assert f"checkpoints/step_{resumed_from - 1:08d}: continuing with step {resumed_from + 1}/{STEPS}" in \
        runs["resumed_output"]
    straight, interrupted = _losses(runs["straight"]), _losses(runs["interrupted"])
    assert sorted(interrupted) == sorted(straight) == list(range(STEPS))
    for step in range(STEPS):
        assert interrupted[step] == pytest.approx(straight[step], rel=1e-6), step


def test_checkpoints_are_pruned_and_a_half_written_one_is_ignored(runs, tmp_path):
    from megatron_avar.training.checkpointing import latest_checkpoint

    root = runs["interrupted"] / "checkpoints"
    complete = sorted(p.name for p in root.glob("step_*"))
    assert complete[-1] == f"step_{STEPS - 1:08d}" and len(complete) <= 2  # checkpoint.keep = 2
    # summary.json lists the checkpoints that are there, not those pruned (found in review: it listed them all)
    straight = json.loads((runs["straight"] / "summary.json").read_text())["checkpoints"]
    assert [Path(path).name for path in straight] == [f"step_{STEPS - 1:08d}"]
    copy = tmp_path / "run"
    shutil.copytree(runs["interrupted"], copy)
    crashed = copy / "checkpoints" / f".step_{STEPS + 3:08d}.partial"
    crashed.mkdir()
    (crashed / "garbage").write_text("a save that died half way")
    assert latest_checkpoint(copy).name == complete[-1]
    (copy / "checkpoints" / "latest").write_text(crashed.name + "\n")
    with pytest.raises(ValueError, match="latest does not name a step_\\* folder of this run"):
        latest_checkpoint(copy)
    incomplete = copy / "checkpoints" / f"step_{STEPS + 4:08d}"
    incomplete.mkdir()
    (copy / "checkpoints" / "latest").write_text(incomplete.name + "\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        latest_checkpoint(copy)


def test_final_checkpoint_exports_to_hf_with_equal_logits(runs, tmp_path):
    from megatron_avar.cli import main

    checkpoint = runs["interrupted"] / "checkpoints" / f"step_{STEPS - 1:08d}"
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert main(["convert", "verify", "--hf-path", str(tmp_path / "hf"), "--mcore-path", str(checkpoint)]) == 0
