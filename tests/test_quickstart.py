"""`avar quickstart` end to end (what `make quickstart` runs), shortened: the AVAR run raises VAS on
held-out samples more than the α=β=0 run of the same data and seed, and summary.json holds every number the
README promises. Seeded and deterministic on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_quickstart_avar_raises_vas_more_than_plain_sft(tmp_path, capsys):
    out = tmp_path / "quickstart"
    command = [sys.executable, "-m", "megatron_avar", "quickstart", "--out", str(out), "--num-samples", "16",
               "--vas-samples", "4", "train.steps=5", "data.seq_length=512", "checkpoint.interval=0"]
    result = subprocess.run(command, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=900,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"vas_before", "vas_after", "vas_after_baseline", "final_lm_loss",
                            "final_lm_loss_baseline", "hf_export_dir"}
    assert summary["vas_after"] - summary["vas_before"] > 2 * abs(summary["vas_after_baseline"] - summary["vas_before"])
    assert summary["vas_after"] > summary["vas_after_baseline"]
    assert (Path(summary["hf_export_dir"]) / "config.json").is_file()
    assert (out / "vas-compare" / "compare.md").is_file()
    # GRPO from the AVAR SFT model: every step logged with its reward parts and the rollouts' r_visual, and
    # (the visual term on every rollout) rewards that differ within groups, so the policy is really updated.
    curve = summary["grpo"]
    assert [h["step"] for h in curve] == list(range(6))
    assert all(h["reward/r_visual"] > 0 and 0 <= h["reward/accuracy"] <= 1 for h in curve)
    assert all(h["reward/total"] > 0 and h["optim/grad_norm"] > 0 for h in curve)
    # A second quickstart refuses to clobber the run without --overwrite (the command line's entry point, here).
    from megatron_avar.cli import main

    assert main(command[3:]) == 2 and "--overwrite" in capsys.readouterr().err


def test_a_bad_override_or_out_is_refused_before_anything_is_written(tmp_path, capsys):
    from megatron_avar.cli import main

    out = tmp_path / "quickstart"
    assert main(["quickstart", "--out", str(out), "train.stepz=1"]) == 2
    assert "unknown config key(s) train.stepz" in capsys.readouterr().err and not out.exists()
    (tmp_path / "file").write_text("mine")
    assert main(["quickstart", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    # An earlier quickstart is kept when --overwrite comes with a count or a rank number the stages refuse (before:
    # deleted, then the held-out data failed without naming the flag, or sft failed after four stages had run).
    from megatron_avar.quickstart import MARKER

    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "summary.json").write_text("earlier")
    for flags, message in ((["--vas-samples", "0"], "--vas-samples must be >= 1, got 0"),
                           (["--num-samples", "-1"], "--num-samples must be >= 1, got -1"),
                           (["--nproc", "3"], "train.global_batch_size (2) does not split over the 3 data-parallel "
                                              "ranks of --nproc 3"),
                           (["--nproc", "4", "data.micro_batch_size=2"], "SFT stages' train.global_batch_size (2) does "
                            "not split over the 2 data-parallel ranks x data.micro_batch_size 2 of --nproc 4"),
                           (["--nproc", "6", "train.global_batch_size=6"], "GRPO stages' train.prompts_per_step (2) "
                            "does not split over the 3 data-parallel ranks of --nproc 6")):
        assert main(["quickstart", "--out", str(out), "--overwrite", *flags]) == 2
        assert message in capsys.readouterr().err
        assert (out / "summary.json").read_text() == "earlier", flags


def test_settings_the_quickstart_makes_itself_and_bad_layers_are_refused_before_anything_runs(tmp_path, capsys):
    """Found in review: `out=...` sent the sft stage elsewhere, then the next stage failed on a missing file;
    `model.hf_path` / `data.path` silently replaced the toy model or data; `avar.layers=[9]` ran three stages, then
    failed in sft under 40 lines of torchrun traceback."""
    from megatron_avar.cli import main

    out = tmp_path / "quickstart"
    assert main(["quickstart", "--out", str(out), f"out={tmp_path / 'elsewhere'}", "train.steps=1"]) == 2
    assert "the quickstart sets out, model.hf_path, data.path" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(out), "avar.layers=[9]"]) == 2
    assert "avar.layers" in capsys.readouterr().err and not out.exists()


def _earlier_run(out: Path) -> None:
    from megatron_avar.quickstart import MARKER

    (out / "sft").mkdir(parents=True)
    (out / MARKER).write_text("{}")
    (out / "summary.json").write_text("earlier")
    (out / "sft" / "metrics.jsonl").write_text("earlier")


def _is_the_earlier_run(out: Path) -> bool:
    return ((out / "summary.json").read_text() == "earlier" and (out / "sft" / "metrics.jsonl").read_text() == "earlier"
            and not (out / ".replaced").exists() and not (out / "new-stage").exists())


_STOPPED_QUICKSTART = """\
import sys
from pathlib import Path

import megatron_avar.quickstart as quickstart
from megatron_avar.cli import main

def stages(out, **settings):  # a stage that has started a process of its own, then runs until killed
    (out / "new-stage").mkdir()
    child = "import os, signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    child += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
    child += f"open({str(out.parent / 'stage.pid')!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    quickstart._run_stage([sys.executable, "-c", child])

quickstart._run_stages = stages
quickstart.STAGE_STOP_S = 3  # (this stage ignores SIGTERM: it is killed after that)
sys.exit(main(["quickstart", "--out", sys.argv[1], "--overwrite"]))
"""


def test_a_stopped_or_failed_overwrite_puts_the_earlier_run_back_and_stops_its_stage(tmp_path):
    """Found in review: --overwrite deleted the earlier run before the first stage, so a Ctrl-C or a failed stage
    lost it, and two quickstarts on one --out deleted each other's folders; and SIGTERM left the running stage
    (torchrun and its ranks) working on, writing into --out. A second stop while the stage is stopped waits for it
    (before, it would put the earlier run back while the stage still wrote into it)."""
    import signal
    import time

    out = tmp_path / "quickstart"
    _earlier_run(out)
    (tmp_path / "stopped.py").write_text(_STOPPED_QUICKSTART)
    quickstart = subprocess.Popen([sys.executable, str(tmp_path / "stopped.py"), str(out)],
                                  cwd=Path(__file__).parents[1], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "stage.pid").is_file() or not (tmp_path / "stage.pid").read_text():
        assert quickstart.poll() is None and time.monotonic() < deadline, quickstart.stderr.read()  # type: ignore
        time.sleep(0.1)
    stage = int((tmp_path / "stage.pid").read_text())
    assert (out / ".replaced" / "summary.json").read_text() == "earlier"  # aside while the new run works
    quickstart.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    quickstart.send_signal(signal.SIGTERM)  # impatient: a second stop while the stage is being stopped
    _, err = quickstart.communicate(timeout=120)
    assert quickstart.returncode == 130 and "interrupted" in err, err
    assert _is_the_earlier_run(out), sorted(p.name for p in out.iterdir())
    deadline = time.monotonic() + 20
    while (left := _running_in_group(stage)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"the stage's processes {left} outlived it"


def _running_in_group(group: int) -> list[int]:
    """Processes of process group ``group`` that run (zombies, dead and not yet reaped by init, do not)."""
    running = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # (state, ppid, pgrp, ...)
            running.append(int(stat.parent.name))
    return running


def test_a_killed_overwrite_leaves_the_earlier_run_for_the_next_one(tmp_path, monkeypatch):
    """A quickstart killed with SIGKILL while replacing a run leaves the earlier run in .replaced and its own partial
    output beside it: the next --overwrite run drops the partial output, keeps the earlier run aside until it
    completes (here it fails, and the earlier run is back)."""
    import megatron_avar.quickstart as quickstart
    from megatron_avar.cli import main

    out = tmp_path / "quickstart"
    _earlier_run(out)
    quickstart._prepare_out(out, overwrite=True)  # as the killed run left it: the earlier run aside, a partial one
    (out / "new-stage").mkdir()

    def failing_stages(out, **settings):
        assert not (out / "new-stage").exists() and (out / ".replaced" / "summary.json").read_text() == "earlier"
        raise ValueError("a stage failed")

    monkeypatch.setattr(quickstart, "_run_stages", failing_stages)
    monkeypatch.chdir(Path(__file__).parents[1])
    assert main(["quickstart", "--out", str(out), "--overwrite"]) == 2
    assert _is_the_earlier_run(out)


@pytest.mark.parametrize("cut", ["moving-aside", "moving-back"])
def test_a_run_killed_while_moving_the_earlier_run_aside_or_back_loses_none_of_it(tmp_path, monkeypatch, cut):
    """Found in review: the next --overwrite told the runs apart by where summary.json was, so a SIGKILL in the
    middle of moving the earlier run aside (or back) made it delete the part of the earlier run on one side."""
    import megatron_avar.quickstart as quickstart
    from megatron_avar.cli import main

    out = tmp_path / "quickstart"
    _earlier_run(out)
    (out / "vas-base").mkdir()
    aside = out / quickstart.REPLACED
    aside.mkdir()
    if cut == "moving-aside":  # summary.json and sft moved, the rest not yet, no MOVED mark
        for name in ("summary.json", "sft"):
            (out / name).rename(aside / name)
    else:  # the new run's entries gone, the RESTORING mark written, summary.json and sft back, the rest not yet
        for name in (quickstart.MARKER, "vas-base"):
            (out / name).rename(aside / name)
        (aside / quickstart.MOVED).write_text("")
        (aside / quickstart.RESTORING).write_text("")

    def failing_stages(out, **settings):
        moved = sorted(p.name for p in (out / quickstart.REPLACED).iterdir())
        assert moved == sorted([quickstart.MOVED, quickstart.MARKER, "summary.json", "sft", "vas-base"]), moved
        raise ValueError("a stage failed")

    monkeypatch.setattr(quickstart, "_run_stages", failing_stages)
    monkeypatch.chdir(Path(__file__).parents[1])
    assert main(["quickstart", "--out", str(out), "--overwrite"]) == 2
    assert _is_the_earlier_run(out) and (out / "vas-base").is_dir()
