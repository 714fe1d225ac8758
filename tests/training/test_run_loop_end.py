"""The end of a run: a stop signal that arrives during the last step does not make a finished run look
stopped (Slurm requeued it, and a sweep resubmitted it on every invocation, since a rerun of a finished run
changed nothing); a rerun repairs a summary.json that records such a stop, or that a kill left unwritten; a run
that fails says so in its summary."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_avar.testing import run_on_ranks

pytestmark = pytest.mark.multiprocess


def _three_steps(run_dir: str, signalled_step: int | None = None, failing_step: int | None = None,
                 failing_save: int | None = None) -> tuple[dict, list[int], list[int]]:
    """run_steps over 3 steps in ``run_dir``: a stop signal seen after ``signalled_step``, ``step_fn`` raising at
    ``failing_step``, or the checkpoint write of ``failing_save`` raising. Returns (summary or the error's text,
    steps saved, steps logged)."""
    import torch.distributed as dist

    from megatron_avar.training import checkpointing
    from megatron_avar.training.megatron_setup import RankLayout
    from megatron_avar.training.run_loop import run_steps

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    saved, logged = [], []

    def save_checkpoint(run_dir, step, *args, **kwargs):
        if step == failing_save:
            raise OSError(28, "No space left on device")
        saved.append(step)
        return Path(f"step_{step}")

    checkpointing.save_checkpoint = save_checkpoint
    current = {}

    def step_fn(step):
        current["step"] = step
        if step == failing_step:
            raise ValueError(f"step {step}: an image of sample 7 is unreadable")
        return {"loss/lm": 1.0}

    preemption = SimpleNamespace(received="SIGUSR1", any_rank=lambda: current["step"] == signalled_step)
    layout = RankLayout(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
    try:
        summary = run_steps(step_fn, start_step=0, steps=3, run_dir=run_dir, model=None,
                            data=SimpleNamespace(state_dict=dict), layout=layout,
                            logger=SimpleNamespace(log=lambda step, metrics: logged.append(step)),
                            preemption=preemption, log_interval=1, checkpoint=SimpleNamespace(interval=0, keep=2),
                            describe=None, summary_fields=lambda: {"packing_efficiency": 0.5})
    except (ValueError, OSError) as error:
        return {"raised": str(error)}, saved, logged
    return summary, saved, logged


def test_a_signal_during_the_last_step_finishes_the_run(tmp_path):
    summary, saved, logged = run_on_ranks(_three_steps, 1, str(tmp_path / "last"), 2, timeout_s=120)[0]
    assert (summary["stopped_by"], saved, logged) == (None, [2], [0, 1, 2])
    assert json.loads((tmp_path / "last" / "summary.json").read_text()) == summary
    assert summary["packing_efficiency"] == 0.5 and summary["layout"]["world_size"] == 1
    # earlier: the run stops after that step, with its checkpoint
    summary, saved, logged = run_on_ranks(_three_steps, 1, str(tmp_path / "early"), 1, timeout_s=120)[0]
    assert (summary["stopped_by"], saved, logged) == ("SIGUSR1", [1], [0, 1])


def test_a_failed_run_says_so_in_its_summary(tmp_path):
    """Found in review: a run that failed wrote no summary, so the summary.json of an earlier segment (stopped by
    a signal at an earlier step) stood for it."""
    from megatron_avar.sweep.submit import run_finished

    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
    (tmp_path / "summary.json").write_text(json.dumps({"steps_run": 1, "last_step": 0, "stopped_by": "SIGTERM"}))
    result, saved, logged = run_on_ranks(_three_steps, 1, str(tmp_path), None, 1, timeout_s=120)[0]
    assert result == {"raised": "step 1: an image of sample 7 is unreadable"}  # the error goes on, as it was
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == "ValueError: step 1: an image of sample 7 is unreadable"
    assert (summary["stopped_by"], summary["last_step"], summary["steps_run"]) == (None, 0, 1)
    assert summary["packing_efficiency"] == 0.5 and not run_finished(tmp_path)
    # every step ran and was logged, then the last checkpoint's write failed: not a finished run either
    result, saved, logged = run_on_ranks(_three_steps, 1, str(tmp_path), None, None, 2, timeout_s=120)[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (logged, summary["last_step"]) == ([0, 1, 2], 2)
    assert summary["failed"] == "OSError: [Errno 28] No space left on device"
    assert not run_finished(tmp_path)


def test_a_rerun_repairs_a_summary_that_records_a_stop_or_is_missing(tmp_path):
    from megatron_avar.training.run_loop import RunStart, finished_run_summary

    start = RunStart(resume_from=tmp_path / "checkpoints" / "step_00000002", start_step=3, finished=True)
    final = str(start.resume_from)
    (tmp_path / "summary.json").write_text(json.dumps({"steps_run": 3, "last_step": 2, "stopped_by": "SIGUSR1",
                                                       "checkpoints": [final]}))
    assert finished_run_summary(tmp_path, start, steps=3, announce=True)["stopped_by"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps_run": 3, "last_step": 2, "stopped_by": None,
                                                                   "failed": None, "checkpoints": [final]}
    (tmp_path / "summary.json").unlink()
    assert finished_run_summary(tmp_path, start, steps=3, announce=True)["last_step"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["stopped_by"] is None
    # Found in review: an earlier segment's summary (preempted at step 0), the finishing segment killed before its
    # own: the repair kept last_step 0, so `avar sweep` resubmitted the point on every invocation
    early = tmp_path / "checkpoints" / "step_00000000"
    (tmp_path / "summary.json").write_text(json.dumps({"steps_run": 1, "last_step": 0, "stopped_by": "SIGTERM",
                                                       "checkpoints": [str(early)]}))
    (tmp_path / "config.json").write_text(json.dumps({"train": {"steps": 3}}))
    finished_run_summary(tmp_path, start, steps=3, announce=True)
    repaired = json.loads((tmp_path / "summary.json").read_text())
    assert repaired["last_step"] == 2 and repaired["checkpoints"] == [str(early), final]
    from megatron_avar.sweep.submit import run_finished

    assert run_finished(tmp_path)
