"""The metrics logger of a resumed run: TensorBoard shows each step once (the interrupted run's events of the
steps that run again are purged), as metrics.jsonl does (run_loop trims it); W&B shows one run over every
segment of a training run (its id recorded in <out>/wandb_run.json), with each step once."""

import contextlib
import json
import sys
import types

import pytest

from megatron_avar.training.metrics import WANDB_RUN_FILE, MetricsLogger


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


class _FakeWandb(types.ModuleType):
    """A stand-in for the wandb package (not needed to run the tests): ``runs`` is its server, run id -> the
    steps logged to that run, in order; ``inits`` the keyword arguments of every ``wandb.init``. ``resume``
    follows W&B's documented rule: "allow" continues a run the server has (its ``starting_step`` is the step
    after its last one, as W&B's SDK sets it), else creates it under the id; W&B drops a log at a lower step."""

    def __init__(self):
        super().__init__("wandb")
        self.runs: dict[str, list[int]] = {}
        self.inits: list[dict] = []
        self.finished: list[int] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        assert kwargs["resume"] == "allow" and kwargs["id"]
        history = self.runs.setdefault(kwargs["id"], [])
        fake = self

        class Run:
            id = kwargs["id"]
            starting_step = history[-1] + 1 if history else 0

            def log(self, metrics, step):
                assert step >= (history[-1] if history else 0), "W&B drops a log at a lower step than its last"
                history.append(step)

            def finish(self, exit_code):
                fake.finished.append(exit_code)

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def _segment(out, steps, first_step, *, project="avar", fails=False):
    """One segment of a run: its logger from ``first_step`` (what the trainer passes: the resumed checkpoint's
    step + 1), logging ``steps``, ending on an error when ``fails``."""
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
        with MetricsLogger(out, total_steps=8, enabled=True, tensorboard=False, wandb_project=project,
                           run_config={"out": str(out)}, first_step=first_step) as logger:
            for step in steps:
                logger.log(step, {"loss/lm": 1.0})
            if fails:
                raise RuntimeError("preempted")


def test_a_resumed_run_continues_the_wandb_run_of_its_first_segment_with_each_step_once(tmp_path, fake_wandb,
                                                                                          capsys):
    """Before: every segment called wandb.init(project, dir, config) without an id, so a run preempted and
    requeued by Slurm showed in W&B as one run per segment. Now the first segment records a new id in
    <out>/wandb_run.json (atomically) and creates the W&B run under it; the next segment continues that run
    (same id, resume="allow"), and sends only the steps the W&B run does not hold yet (steps 2-3, run again after
    the checkpoint of step 1, would be dropped by W&B), saying so in one line."""
    _segment(tmp_path, [0, 1, 2, 3], first_step=0, fails=True)  # preempted after step 3; last checkpoint: step 1
    record = json.loads((tmp_path / WANDB_RUN_FILE).read_text())
    assert record == {"id": record["id"], "project": "avar"} and len(record["id"]) == 8
    assert list(tmp_path.glob(f".{WANDB_RUN_FILE}.*.tmp")) == []  # written through atomic_files
    _segment(tmp_path, [2, 3, 4, 5], first_step=2)
    _segment(tmp_path, [6, 7], first_step=6)
    assert [(init["id"], init["resume"], init["project"]) for init in fake_wandb.inits] == [
        (record["id"], "allow", "avar")] * 3
    assert fake_wandb.runs == {record["id"]: [0, 1, 2, 3, 4, 5, 6, 7]}  # one W&B run, each step once
    assert fake_wandb.finished == [1, 0, 0]  # the preempted segment is marked failed, the others finished
    assert json.loads((tmp_path / WANDB_RUN_FILE).read_text()) == record  # recorded once, never rewritten
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("W&B")]
    assert notes == [f"W&B run {record['id']} already holds steps 2-3, which this segment runs again: W&B keeps the "
                     "values logged before (a W&B run only appends); metrics.jsonl and TensorBoard hold this "
                     "segment's"]


def test_a_run_with_no_wandb_record_yet_creates_a_new_wandb_run_under_a_new_id(tmp_path, fake_wandb):
    """Two runs (two outs) get two W&B runs: the id is drawn per run, not derived from anything they share."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()  # (the trainer's enter_run_dir made it)
    _segment(tmp_path / "a", [0], first_step=0, project="p")
    _segment(tmp_path / "b", [0], first_step=0, project="p")
    ids = [json.loads((tmp_path / name / WANDB_RUN_FILE).read_text())["id"] for name in ("a", "b")]
    assert ids[0] != ids[1] and sorted(fake_wandb.runs) == sorted(ids)


@pytest.mark.parametrize("content, problem", [
    ("{\"id\": \"3kd9f", "is damaged"),  # torn
    ('{"id": "ab/cd", "project": "avar"}', "is damaged"),  # not a W&B run id
    ('{"id": "3kd9fj2m"}', "is damaged"),
    ('["3kd9fj2m", "avar"]', "is damaged"),
    ('{"id": "3kd9fj2m", "project": "another"}', "records W&B run 3kd9fj2m of project 'another', but "
                                                 "log.wandb_project='avar'"),
])
def test_a_damaged_or_foreign_wandb_record_is_refused_in_one_line_naming_the_file_and_the_fix(
        tmp_path, fake_wandb, content, problem):
    """A record that is damaged, or names a run of another W&B project than log.wandb_project (a copied run
    folder, a changed setting), is refused before anything is opened or sent: continuing it would guess, and a
    new W&B run would split the run silently. The one-line error names the file, what is wrong and both ways out
    (restore or fix the setting; delete the file for a new W&B run)."""
    (tmp_path / WANDB_RUN_FILE).write_text(content)
    with pytest.raises(ValueError) as refused:
        _segment(tmp_path, [0], first_step=0)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(tmp_path / WANDB_RUN_FILE)) and problem in message
    assert "delete" in message and "new W&B run" in message
    assert fake_wandb.inits == [] and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / WANDB_RUN_FILE).read_text() == content  # left for the user to repair


def test_only_the_logging_rank_records_and_starts_the_wandb_run(tmp_path, fake_wandb):
    """Every rank builds a MetricsLogger (enabled on the logging rank only): the others neither write the record
    nor start a W&B run, so a run on N ranks makes one W&B run and one writer of wandb_run.json."""
    logger = MetricsLogger(tmp_path, total_steps=2, enabled=False, tensorboard=False, wandb_project="avar",
                           run_config={})
    logger.log(0, {"loss/lm": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == [] and fake_wandb.inits == []
    _segment(tmp_path, [0], first_step=0)  # the logging rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", WANDB_RUN_FILE]
    assert len(fake_wandb.inits) == 1


def test_a_run_ending_on_an_error_is_marked_failed_in_wandb(tmp_path, fake_wandb):
    """Found in review: the logger's close() called wandb.finish() without an exit code, so a crashed run showed
    as finished in W&B."""
    for fails in (False, True):
        _segment(tmp_path, [0], first_step=0, project="p", fails=fails)
    assert fake_wandb.finished == [0, 1]
