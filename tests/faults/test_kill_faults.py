"""Randomized SIGKILL (issue 16): a checkpointing `avar sft` run is killed at random points — during steps and
during checkpoint writes — and restarted each time with the same command. After every kill:

- no process of the killed run outlives it (before: megatron's writer left its results-queue server process,
  a few hundred MB, running for minutes);
- ``latest`` names a complete checkpoint that passes the pre-load checks;
and the run, restarted until it finishes, logs the loss curve of an uninterrupted run step for step.

The kill points come from a seeded generator (printed on failure): each kill waits for the run to log a step
it had not logged before, then a random delay within about one step, so the kill lands anywhere from the
step's checkpoint write to the next step's compute.
"""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fault_runs import REPO, losses, output, run_sft, sft_command

STEPS = 6
KILLS = 10
SEED = 20261204


def _session_processes(session: int) -> list[int]:
    """Pids of live processes whose session is ``session`` (the killed run started its own session, so
    anything it started and that outlived it keeps that session id)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(entry.name))
    return found


def _logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _kill_once(run: Path, sft_inputs, rng: random.Random, step_seconds: float) -> str:
    """Start the run, kill it at a random point after it logs a new step; '' if it finished first."""
    logged_before = _logged(run)
    process = subprocess.Popen(sft_command(run, sft_inputs, **SETTINGS), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while _logged(run) <= logged_before and process.poll() is None:
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.05)
    if process.poll() is not None:
        return ""
    delay = rng.uniform(0.0, 1.5 * step_seconds)
    time.sleep(delay)
    if process.poll() is not None:
        return ""
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 20  # the writer's forked workers finish their file, then exit
    while (left := _session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes of the killed run outlived it: " + "; ".join(
        f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode(errors='replace')[:200]}"
        for pid in left)
    return f"killed {delay:.2f}s after step {_logged(run) - 1} was logged"


SETTINGS = {"train.steps": STEPS, "checkpoint.interval": 1, "checkpoint.keep": 2}


def _seconds_between_logged_steps(run: Path, sft_inputs) -> float:
    """Run to the end uninterrupted; the mean time from one logged step to the next (the step's checkpoint write
    and the next step's compute: the span a kill is placed in)."""
    errors = run.parent / f"{run.name}.stderr"
    with errors.open("w") as stderr:
        process = subprocess.Popen(sft_command(run, sft_inputs, **SETTINGS), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        logged_at, deadline = {}, time.monotonic() + 300
        while process.poll() is None:
            assert time.monotonic() < deadline, "the uninterrupted run did not finish"
            logged_at.setdefault(_logged(run), time.monotonic())
            time.sleep(0.02)
    assert process.returncode == 0, errors.read_text()[-3000:]
    seen = max(logged_at)  # (the last step may be logged just before the exit, unseen here)
    assert seen >= 2 and 1 in logged_at, logged_at
    return (logged_at[seen] - logged_at[1]) / (seen - 1)


@pytest.mark.multiprocess
def test_random_sigkills_never_lose_a_checkpoint_and_the_loss_curve_is_reproduced(sft_inputs, tmp_path):
    from megatron_avar.checkpoint_vetting import vet_dist_checkpoint
    from megatron_avar.training.checkpointing import latest_checkpoint

    straight = tmp_path / "straight"
    step_seconds = min(5.0, _seconds_between_logged_steps(straight, sft_inputs))

    rng, run, kills = random.Random(SEED), tmp_path / "killed", []
    while len(kills) < KILLS:
        what = _kill_once(run, sft_inputs, rng, step_seconds)
        if not what:  # finished before the kill: start over, the kills are what is tested
            assert losses(run) == pytest.approx(losses(straight), rel=1e-6)
            run = tmp_path / f"killed{len(kills)}"
            continue
        kills.append(what)
        latest = latest_checkpoint(run)  # raises if `latest` names an incomplete folder
        if latest is not None:
            vet_dist_checkpoint(latest)
    done = run_sft(run, sft_inputs, **SETTINGS)
    assert done.returncode == 0, f"seed {SEED}, {kills}\n" + output(done)[-3000:]
    straight_losses, killed_losses = losses(straight), losses(run)
    assert sorted(killed_losses) == list(range(STEPS)), kills
    for step in range(STEPS):
        assert killed_losses[step] == pytest.approx(straight_losses[step], rel=1e-6), (step, kills)
    print(f"seed {SEED}: " + "; ".join(kills))
    assert os.path.isdir(run / "checkpoints")
