"""Fault injection (issue 16) on resuming and checkpointing, through the real command line where the fault is
the run's: what a user sees and what stays on disk.

- a truncated ``*.distcp`` in the latest checkpoint is refused before megatron reads it, naming the file and
  the missing bytes (before: a bare EOFError from inside megatron's load);
- a full disk while a checkpoint is written: the run stops saying "No space left on device", the partial
  folder is gone, the last complete checkpoint stays ``latest``, and the same command then resumes (before: a
  torch writer error that never named the cause);
- two runs on one out: the second is refused, naming the holder (before: FileNotFoundError mid-run);
- a resume at another TP/PP is refused naming both layouts (before: megatron's "Global shape mismatch"); a
  resume at another DP, or at context-parallel size 2, runs and continues the loss curve of the uninterrupted
  run (before: refused for want of the RNG states of the new ranks, while the README said DP may change);
- the data fingerprint ignores where the data are and file modification times, and a real change is refused
  with the override named; the override resumes.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fault_runs import (
    REPO,
    copy_run,
    exports_and_verifies,
    logged_steps,
    losses,
    on_two_ranks,
    output,
    run_sft,
    sft_command,
)

CHECKPOINTS = "checkpoints"


def _latest(run: Path) -> str:
    return (run / CHECKPOINTS / "latest").read_text().strip()


# -- a truncated data file ------------------------------------------------------------------------------------
def test_a_truncated_distcp_is_refused_naming_the_file_before_megatron_reads_it(base_run, sft_inputs, tmp_path):
    from megatron_avar.checkpoint_vetting import vet_dist_checkpoint

    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    step = run / CHECKPOINTS / "step_00000000"
    victim = max(step.glob("*.distcp"), key=lambda f: f.stat().st_size)
    data = victim.read_bytes()
    victim.unlink()  # a hard link to the base run's file: replace it, never write through it
    victim.write_bytes(data[:len(data) - 4096])
    with pytest.raises(ValueError, match=rf"{victim.name} holds {len(data) - 4096} bytes, 4096 fewer than "
                                         r"\.metadata places in it: the checkpoint is incomplete"):
        vet_dist_checkpoint(step)
    done = run_sft(run, sft_inputs)
    assert done.returncode == 2, output(done)[-3000:]
    assert f"{victim.name} holds {len(data) - 4096} bytes" in done.stderr and "Traceback" not in output(done)
    assert _latest(run) == "step_00000000" and sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == [
        "latest", "step_00000000"]


# -- a full disk while saving -----------------------------------------------------------------------------------
_FULL_DISK = '''
import builtins, errno, os
_open = builtins.open
def _full_disk_open(file, mode="r", *args, **kwargs):
    name = os.fspath(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
    if ".step_00000001.partial" in str(name) and str(name).endswith(".distcp") and "w" in mode:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    return _open(file, mode, *args, **kwargs)
builtins.open = _full_disk_open
'''


def test_a_full_disk_while_saving_names_the_cause_and_keeps_the_last_checkpoint(sft_inputs, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_FULL_DISK)  # the disk is "full" for step 1's tensor files
    run = tmp_path / "run"
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    done = run_sft(run, sft_inputs, env={"PYTHONPATH": path})
    assert done.returncode == 2, output(done)[-3000:]
    assert "writing checkpoint step_00000001 failed (No space left on device)" in done.stderr
    assert f"{run / CHECKPOINTS / 'step_00000000'} stays the latest checkpoint" in done.stderr
    assert "free space on the file system" in done.stderr and "Traceback" not in output(done)
    assert _latest(run) == "step_00000000"
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["latest", "step_00000000"]
    resumed = run_sft(run, sft_inputs)  # space freed: the same command resumes and finishes
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert logged_steps(run) == [0, 1] and _latest(run) == "step_00000001"


# -- two runs on one out ------------------------------------------------------------------------------------------
def test_a_second_run_on_an_out_in_use_is_refused_naming_the_holder(base_run, sft_inputs, tmp_path):
    import fcntl

    run = copy_run(base_run, tmp_path / "run")
    with (run / ".avar.lock").open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()  # the record of the base run, which held it last
        held.write(json.dumps({"host": "node-a17", "pid": 4242, "slurm_job": "991", "started": "then"}))
        held.flush()
        before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
        done = run_sft(run, sft_inputs)
        assert done.returncode == 2, output(done)[-3000:]
        assert (f"{run} is in use by a run on node-a17 (pid 4242, Slurm job 991, started then): two runs writing "
                "one out would mix their checkpoints") in done.stderr
        assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    done = run_sft(run, sft_inputs)  # released (the holder ended): the finished run is recognised
    assert done.returncode == 0 and "holds a finished run" in done.stdout, output(done)[-3000:]
    holder = json.loads((run / ".avar.lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] != 4242


def test_the_lock_is_taken_released_and_refused_in_process(tmp_path):
    from megatron_avar.training.run_lock import acquire_run_lock, release_run_lock

    acquire_run_lock(tmp_path / "out", is_logging_rank=True)
    other = subprocess.run([sys.executable, "-c", "import sys; from megatron_avar.training.run_lock import "
                            "acquire_run_lock as a; a(sys.argv[1], is_logging_rank=True)", str(tmp_path / "out")],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and f"is in use by a run on {socket.gethostname()} (pid {os.getpid()}" in other.stderr
    release_run_lock(tmp_path / "out")
    again = subprocess.run(other.args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr


# -- resuming at another layout ---------------------------------------------------------------------------------
class _Layout:
    is_logging_rank = True

    def __init__(self, tp, pp, dp, vpp=1):
        self.tp, self.pp, self.dp, self.vpp = tp, pp, dp, vpp


@pytest.mark.parametrize("recorded", [True, False], ids=["layout-recorded", "older-checkpoint"])
def test_a_resume_at_another_tensor_or_pipeline_layout_is_refused_naming_both(base_run, tmp_path, recorded):
    from megatron_avar.training.config import CheckpointConfig
    from megatron_avar.training.run_loop import plan_start

    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    state_file = run / CHECKPOINTS / "step_00000000" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["layout"] == {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "cp": 1}
    if not recorded:  # written before the layout was recorded: read from the export record and the rank files
        del state["layout"]
        state_file.write_text(json.dumps(state))
    schedule = state["schedule"]
    with pytest.raises(ValueError, match=r"written at TP=1 PP=1 \(DP=1\), but this run is TP=2 PP=1 \(DP=2\)"):
        plan_start(run, CheckpointConfig(), schedule=schedule, steps=2, layout=_Layout(2, 1, 2))
    with pytest.raises(ValueError, match=r"parallel\.pipeline_model_parallel_size=1 "
                                         r"parallel\.virtual_pipeline_model_parallel_size=1 \(a world size that is a "):
        plan_start(run, CheckpointConfig(), schedule=schedule, steps=2, layout=_Layout(1, 2, 1))
    start = plan_start(run, CheckpointConfig(), schedule=schedule, steps=2, layout=_Layout(1, 1, 2))
    assert start.start_step == 1  # another data-parallel size resumes
    if recorded:  # model chunks per pipeline rank are part of the layout
        state["layout"] = {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}
        state_file.write_text(json.dumps(state))
        with pytest.raises(ValueError, match=r"written at TP=1 PP=2 VPP=2 \(DP=1\), but this run is TP=1 PP=2 "
                                             r"\(DP=1\)"):
            plan_start(run, CheckpointConfig(), schedule=schedule, steps=2, layout=_Layout(1, 2, 1))


def test_step_folders_without_the_latest_pointer_are_not_started_over(base_run, tmp_path):
    """Found in review: a run whose `latest` pointer was gone (removed, as an older message advised to start
    over, or step folders copied alone) started at step 0 without a word and replaced the old checkpoints."""
    from megatron_avar.training.config import CheckpointConfig
    from megatron_avar.training.run_loop import plan_start

    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    state = json.loads((run / CHECKPOINTS / "step_00000000" / "trainer_state.json").read_text())
    (run / CHECKPOINTS / "latest").unlink()
    with pytest.raises(ValueError, match=r"holds complete checkpoints \(newest step_00000000\) but no 'latest' "
                                         r"pointer .*echo step_00000000 > .*latest\), or start over"):
        plan_start(run, CheckpointConfig(), schedule=state["schedule"], steps=2, layout=_Layout(1, 1, 1))
    (run / CHECKPOINTS / "step_00000000" / "trainer_state.json").unlink()  # a save that died: nothing to keep
    assert plan_start(run, CheckpointConfig(), schedule=state["schedule"], steps=2,
                      layout=_Layout(1, 1, 1)).start_step == 0


def test_a_requeued_slurm_job_that_started_over_resumes_its_own_checkpoints(base_run, tmp_path, monkeypatch, capsys):
    """Found in review on a real Slurm: a job submitted with checkpoint.resume=false checkpoint.overwrite=true ran
    its first command line again at every requeue, deleted what its earlier attempt trained and started at step 0:
    a run longer than one time limit never finished. A requeued attempt (SLURM_RESTART_COUNT >= 1) resumes the
    checkpoints its own job wrote; another job's, or a first attempt, still starts over."""
    from megatron_avar.training.config import CheckpointConfig
    from megatron_avar.training.run_loop import plan_start

    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    state_file = run / CHECKPOINTS / "step_00000000" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert "slurm_job" in state  # what wrote it (None outside Slurm)
    state_file.write_text(json.dumps(dict(state, slurm_job="4711")))
    start_over = CheckpointConfig(resume=False, overwrite=True)

    def start(job, restarts):
        for name, value in (("SLURM_JOB_ID", job), ("SLURM_RESTART_COUNT", restarts)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        return plan_start(run, start_over, schedule=state["schedule"], steps=2, layout=_Layout(1, 1, 1))

    requeued = start("4711", "2")
    assert (requeued.resume_from, requeued.start_step, requeued.replace_earlier) == \
        (run / CHECKPOINTS / "step_00000000", 1, False)
    assert "attempt 2 of Slurm job 4711, requeued; its first attempt started this run over" in capsys.readouterr().out
    for job, restarts in (("4711", "0"), ("4711", None), ("4712", "1"), (None, None)):
        over = start(job, restarts)
        assert (over.resume_from, over.start_step, over.replace_earlier) == (None, 0, True), (job, restarts)


def test_a_run_given_more_steps_resumes_with_the_new_schedule_when_asked(base_run, sft_inputs, tmp_path):
    """Found in review: a finished run could not be given more steps (train.steps sets the schedule's horizon,
    which a resume keeps), and the only way on, a new run from an export, lost the optimizer state.
    checkpoint.reschedule=true resumes with this config's learning-rate schedule, at the restored step count;
    what the schedule does not cover (Adam's betas) stays refused."""
    run = copy_run(base_run, tmp_path / "run")  # 2 steps, finished
    refused = run_sft(run, sft_inputs, **{"train.steps": 4})
    assert refused.returncode == 2 and "pass checkpoint.reschedule=true" in output(refused), output(refused)[-2000:]
    beta = run_sft(run, sft_inputs, **{"train.steps": 4, "checkpoint.reschedule": True, "optim.adam_beta1": 0.8})
    assert beta.returncode == 2 and "optim.adam_beta1: 0.9 in the checkpoint, 0.8 now" in output(beta)
    assert "checkpoint.reschedule=true changes only the learning-rate schedule and train.steps" in output(beta)
    assert logged_steps(run) == [0, 1]
    done = run_sft(run, sft_inputs, **{"train.steps": 4, "checkpoint.reschedule": True})
    assert done.returncode == 0, output(done)[-3000:]
    assert ("resuming step_00000001 with a new learning-rate schedule from step 3 on (checkpoint.reschedule=true): "
            "train.steps: 2 in the checkpoint, 4 now") in output(done)
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == [0, 1, 2, 3]
    # megatron's cosine schedule over 4 steps after 2 warm-up steps: the peak 1e-3 at step 2, half of it at step 3
    # (the old 2-step schedule had decayed to its floor, 0, by then)
    assert [records[step]["optim/lr"] for step in (2, 3)] == pytest.approx([1e-3, 5e-4], rel=1e-9)


def test_a_resume_in_another_precision_or_optimizer_sharding_is_refused_by_name(base_run, tmp_path):
    """Found in review: megatron refused these with "lacks parts this model has (...dtype_(torch.bfloat16...)" and
    "Different dict keys encountered in apply_factory_merges", naming neither setting."""
    from megatron_avar.training.config import CheckpointConfig
    from megatron_avar.training.run_loop import plan_start

    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    schedule = json.loads((run / CHECKPOINTS / "step_00000000" / "trainer_state.json").read_text())["schedule"]
    assert {"train.precision", "parallel.distributed_optimizer"} <= set(schedule)
    for name, value in (("train.precision", "bf16" if schedule["train.precision"] == "fp32" else "fp32"),
                        ("parallel.distributed_optimizer", not schedule["parallel.distributed_optimizer"])):
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: .* in the checkpoint, {value!r} now"):
            plan_start(run, CheckpointConfig(), schedule={**schedule, name: value}, steps=2, layout=_Layout(1, 1, 1))


def _resumed_on_two_ranks(base_run, sft_inputs, run: Path, **extra) -> dict:
    """Resume ``run`` (a copy of the single-rank base run at step 0) on 2 ranks with ``extra`` overrides: it
    continues the uninterrupted loss curve. Returns the layout its final checkpoint records."""
    outputs = on_two_ranks(sft_command(run, sft_inputs, **extra))
    assert "resumed from" in outputs[0]
    straight, resumed = losses(base_run), losses(run)
    assert sorted(resumed) == [0, 1] and resumed[0] == straight[0]
    assert resumed[1] == pytest.approx(straight[1], rel=1e-5, abs=1e-6)
    return json.loads((run / CHECKPOINTS / "step_00000001" / "trainer_state.json").read_text())["layout"]


@pytest.mark.multiprocess
def test_a_resume_at_another_data_parallel_size_continues_the_loss_curve(base_run, sft_inputs, tmp_path):
    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    assert _resumed_on_two_ranks(base_run, sft_inputs, run) == {"tp": 1, "pp": 1, "dp": 2, "vpp": 1, "cp": 1}


@pytest.mark.multiprocess
def test_a_resume_at_context_parallel_size_2_continues_the_loss_curve(base_run, sft_inputs, tmp_path):
    """A single-rank checkpoint resumed with every row split over 2 context-parallel ranks: the next step's loss
    is the uninterrupted run's (CP changes only summation orders), and the checkpoint it writes records CP=2 and
    exports to HF."""
    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    layout = _resumed_on_two_ranks(base_run, sft_inputs, run, **{"parallel.context_parallel_size": 2})
    assert layout == {"tp": 1, "pp": 1, "dp": 1, "vpp": 1, "cp": 2}
    exports_and_verifies(run / CHECKPOINTS / "step_00000001", tmp_path / "hf")


def test_a_resume_with_other_gradient_buckets_is_refused_naming_the_settings(base_run, sft_inputs, tmp_path):
    """The distributed optimizer's states are saved per gradient bucket: a resume whose buckets differ (here
    parallel.ddp_bucket_size splits the toy model's one bucket into many) would map them onto the wrong
    parameters, so it is refused, naming the settings the checkpoint was written with, with the run directory
    left as it was."""
    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    record = json.loads((run / CHECKPOINTS / "step_00000000" / "trainer_state.json").read_text())["grad_buckets"]
    assert record["overlap_grad_reduce"] and len(record["params_per_bucket"]["tp0.pp0"][0]) == 1
    written = lambda: {path.name: path.read_bytes() for path in run.iterdir()  # noqa: E731
                       if path.is_file() and path.name != ".avar.lock"}   # the lock records its last holder
    before = written()
    done = run_sft(run, sft_inputs, **{"parallel.ddp_bucket_size": 40000})
    assert done.returncode == 2, output(done)[-3000:]
    assert "Traceback" not in output(done)
    assert (f"Resume with the settings the checkpoint was written with (parallel.overlap_grad_reduce=true "
            f"parallel.ddp_bucket_size={record['bucket_size']})") in output(done)
    # refused once the model is built, before the run directory is touched: the checkpoint stays, and metrics
    # (the steps after the checkpoint too), config.json and summary are as they were
    assert (run / CHECKPOINTS / "latest").read_text().strip() == "step_00000000" and logged_steps(run) == [0, 1]
    assert written() == before


@pytest.mark.multiprocess
def test_an_interleaved_pipeline_run_resumes_and_exports(sft_inputs, tmp_path):
    """PP=2 x VPP=2 (two model chunks per rank): the checkpoint holds every chunk, a resume from it continues the
    loss curve, and it exports to HF with logits equal to the checkpoint's (`avar convert verify`)."""
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    toy = write_toy_checkpoint(tmp_path / "toy4", ToyModelConfig(num_layers=4))
    layout = {"model.hf_path": toy, "parallel.pipeline_model_parallel_size": 2,
              "parallel.virtual_pipeline_model_parallel_size": 2}
    straight = tmp_path / "straight"
    on_two_ranks(sft_command(straight, sft_inputs, **layout))
    state = json.loads((straight / CHECKPOINTS / "step_00000001" / "trainer_state.json").read_text())
    assert state["layout"] == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2, "cp": 1}
    resumed = copy_run(straight, tmp_path / "resumed", latest_step=0)
    assert "resumed from" in on_two_ranks(sft_command(resumed, sft_inputs, **layout))[0]
    assert losses(resumed)[1] == pytest.approx(losses(straight)[1], rel=1e-6)
    exports_and_verifies(resumed / CHECKPOINTS / "step_00000001", tmp_path / "hf")


# -- the data fingerprint -----------------------------------------------------------------------------------------
def _records(data: Path) -> list[dict]:
    return [json.loads(line) for line in data.read_text().splitlines()]


def test_the_data_fingerprint_ignores_location_and_mtime_but_not_content(sft_inputs, tmp_path):
    import shutil

    from PIL import Image

    from megatron_avar.data.conversations import load_conversations
    from megatron_avar.training.sample_plan import dataset_fingerprint

    original = dataset_fingerprint(load_conversations(sft_inputs["data_path"]))
    source = Path(sft_inputs["data_path"]).parent
    moved = shutil.copytree(source, tmp_path / "staged" / "data") / "data.jsonl"  # e.g. on node-local disk
    image = sorted((moved.parent / "images").iterdir())[0]
    os.utime(image, (1, 1))
    assert dataset_fingerprint(load_conversations(moved)) == original
    with Image.open(image) as opened:
        opened.resize((opened.width + 28, opened.height)).save(image)
    assert dataset_fingerprint(load_conversations(moved)) != original


def test_resume_on_changed_data_is_refused_and_the_override_continues(base_run, sft_inputs, tmp_path):
    import shutil

    run = copy_run(base_run, tmp_path / "run", latest_step=0)
    data = shutil.copytree(Path(sft_inputs["data_path"]).parent, tmp_path / "data") / "data.jsonl"
    records = _records(data)
    records[0]["messages"][0]["content"][-1]["text"] += " Count carefully."  # one question reworded
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = run_sft(run, sft_inputs, **{"data.path": str(data)})
    assert done.returncode == 2, output(done)[-3000:]
    assert f"the data of {data} differ from the checkpoint's" in done.stderr
    assert "checkpoint.accept_data_change=true" in done.stderr
    done = run_sft(run, sft_inputs, **{"data.path": str(data), "checkpoint.accept_data_change": "true"})
    assert done.returncode == 0, output(done)[-3000:]
    assert logged_steps(run) == [0, 1] and _latest(run) == "step_00000001"
