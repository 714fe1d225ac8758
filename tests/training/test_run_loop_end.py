"""The end of a run: a stop signal that arrives during the last step does not make a finished run look
stopped (Slurm requeued it, and a sweep resubmitted it on every invocation, since a rerun of a finished run
changed nothing); a rerun repairs a summary.json that records such a stop, or that a kill left unwritten."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_avar.testing import run_on_ranks

pytestmark = pytest.mark.multiprocess


def _three_steps_signalled_during(signalled_step: int) -> tuple[str | None, list[int], list[int]]:
    import torch.distributed as dist

    from megatron_avar.training import checkpointing
    from megatron_avar.training.run_loop import run_steps

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    saved, logged = [], []
    checkpointing.save_checkpoint = lambda run_dir, step, *a, **k: saved.append(step) or Path(f"step_{step}")
    current = {}

    def step_fn(step):
        current["step"] = step
        return {"loss/lm": 1.0}

    preemption = SimpleNamespace(received="SIGUSR1", any_rank=lambda: current["step"] == signalled_step)
    layout = SimpleNamespace(tp=1, pp=1, dp=1, vpp=1, cp=1, is_logging_rank=True)
    outcome = run_steps(step_fn, start_step=0, steps=3, run_dir="unused", model=None,
                        data=SimpleNamespace(state_dict=dict), layout=layout,
                        logger=SimpleNamespace(log=lambda step, metrics: logged.append(step)), preemption=preemption,
                        log_interval=1, checkpoint=SimpleNamespace(interval=0, keep=2), describe=None)
    return outcome.stopped_by, saved, logged


def test_a_signal_during_the_last_step_finishes_the_run():
    assert run_on_ranks(_three_steps_signalled_during, 1, 2, timeout_s=120)[0] == (None, [2], [0, 1, 2])
    # earlier: the run stops after that step, with its checkpoint
    assert run_on_ranks(_three_steps_signalled_during, 1, 1, timeout_s=120)[0] == ("SIGUSR1", [1], [0, 1])


def test_a_rerun_repairs_a_summary_that_records_a_stop_or_is_missing(tmp_path):
    from megatron_avar.training.run_loop import RunStart, finished_run_summary

    start = RunStart(resume_from=tmp_path / "checkpoints" / "step_00000002", start_step=3, finished=True)
    final = str(start.resume_from)
    (tmp_path / "summary.json").write_text(json.dumps({"steps_run": 3, "last_step": 2, "stopped_by": "SIGUSR1",
                                                       "checkpoints": [final]}))
    assert finished_run_summary(tmp_path, start, steps=3, announce=True)["stopped_by"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps_run": 3, "last_step": 2, "stopped_by": None,
                                                                   "checkpoints": [final]}
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
