"""The metrics logger of a resumed run: TensorBoard shows each step once (the interrupted run's events of the
steps that run again are purged), as metrics.jsonl does (run_loop trims it)."""

from megatron_avar.training.metrics import MetricsLogger


def _log(out, steps, first_step):
    logger = MetricsLogger(out, total_steps=4, enabled=True, tensorboard=True, wandb_project=None, run_config={},
                           first_step=first_step)
    for step in steps:
        logger.log(step, {"loss/lm": float(10 * first_step + step)})
    logger.close()


def test_a_resumed_runs_tensorboard_holds_each_step_once_with_the_new_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, [0, 1, 2], first_step=0)  # interrupted after step 2, whose checkpoint was never written
    _log(tmp_path, [1, 2, 3], first_step=1)  # resumed from step 0's checkpoint
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss/lm")
    assert [e.step for e in scalars] == [0, 1, 2, 3]
    assert [e.value for e in scalars] == [0.0, 11.0, 12.0, 13.0]


def test_a_run_restarted_from_step_0_shows_each_step_once(tmp_path):
    """A run that died before its first checkpoint starts over at step 0: its dead attempt's events go too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(tmp_path, [0, 1], first_step=0)
    _log(tmp_path, [0, 1, 2], first_step=0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/lm")] == [0, 1, 2]


def test_the_eta_is_the_time_per_step_since_the_first_logged_one_times_the_steps_left(tmp_path, capsys, monkeypatch):
    """Before: the clock started after the first step but counted it, so the ETA read 0 after the first step and
    (k - 1)/k of the truth after the k-th."""
    from megatron_avar.training import metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    logger = MetricsLogger(tmp_path, total_steps=1000, enabled=True, tensorboard=False, wandb_project=None,
                           run_config={})
    now[0] += 30.0  # start-up and the first step
    for step in range(3):
        logger.log(step, {"loss/lm": 1.0})
        now[0] += 0.5
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit("eta ", 1)[1] for line in lines] == ["-", "8m19s", "8m18s"]  # 0.5 s x 998, x 997


def test_a_run_ending_on_an_error_is_marked_failed_in_wandb(tmp_path, monkeypatch):
    """Found in review: the logger's close() called wandb.finish() without an exit code, so a crashed run showed
    as finished in W&B."""
    import contextlib
    import sys
    import types

    import pytest

    finished = []
    run = types.SimpleNamespace(log=lambda metrics, step: None, finish=lambda exit_code: finished.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    for fails in (False, True):
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            with MetricsLogger(tmp_path, total_steps=2, enabled=True, tensorboard=False, wandb_project="p",
                               run_config={}) as logger:
                logger.log(0, {"loss/lm": 1.0})
                if fails:
                    raise RuntimeError("step 1 is not finite")
    assert finished == [0, 1]
