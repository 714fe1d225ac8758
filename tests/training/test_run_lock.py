"""The run lock of a failed first run leaves no litter: a run that made its ``out`` for the lock and fails before
writing anything else there removes the lock file and the folders it made; a folder that existed, or holds
anything else, keeps everything. Removing a lock file stays safe for a run waiting to take it."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_avar.training.run_lock import LOCK_FILE, acquire_run_lock, release_run_lock

REPO = Path(__file__).parents[2]


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_a_failed_first_run_removes_its_lock_and_the_folders_it_made(tmp_path):
    """Before: a run started on a new out that failed before writing anything (a model that does not load)
    left out holding only .avar.lock. Now the lock file goes, with out and the missing folders above it that
    the lock made (tmp_path, which existed, stays)."""
    out = tmp_path / "runs" / "sweep" / "first"
    acquire_run_lock(out, is_logging_rank=True)
    assert _tree(tmp_path) == ["runs", "runs/sweep", "runs/sweep/first", f"runs/sweep/first/{LOCK_FILE}"]
    release_run_lock(out, failed=True)
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("case", ["out existed", "a folder above existed", "out holds a file", "run succeeded"])
def test_a_run_keeps_what_it_did_not_make_or_what_holds_anything_else(tmp_path, case):
    """Never delete what the run did not create, nor what holds anything but the lock: an out that existed
    (empty or not) keeps its lock file as before; a made out that holds config.json (the run got that far) keeps
    both; a folder above out that existed stays when out goes; a run that ends well removes nothing."""
    out = tmp_path / "runs" / "first"
    if case == "out existed":
        out.mkdir(parents=True)
    elif case == "a folder above existed":
        (tmp_path / "runs").mkdir()
        (tmp_path / "runs" / "notes.txt").write_text("the user's")
    acquire_run_lock(out, is_logging_rank=True)
    if case == "out holds a file":
        (out / "config.json").write_text("{}")
    release_run_lock(out, failed=case != "run succeeded")
    assert _tree(tmp_path) == {
        "out existed": ["runs", "runs/first", f"runs/first/{LOCK_FILE}"],
        "a folder above existed": ["runs", "runs/notes.txt"],
        "out holds a file": ["runs", "runs/first", f"runs/first/{LOCK_FILE}", "runs/first/config.json"],
        "run succeeded": ["runs", "runs/first", f"runs/first/{LOCK_FILE}"],
    }[case]


def test_a_taker_that_locked_a_removed_lock_file_takes_the_lock_afresh(tmp_path, monkeypatch):
    """A run that opened the lock file just before a failed run removed it (with its empty out) gets the flock
    on a file no one else can find: it must notice (the path no longer names the file it locked), make out again
    and lock the file the path names, so a third run is refused, not given a second lock."""
    import fcntl

    from megatron_avar.training import run_lock

    out = tmp_path / "out"
    real_flock, removed = fcntl.flock, []

    def flock_after_the_failed_run_cleaned_up(descriptor, operation):
        if not removed:  # the failed holder removes its lock file and empty out between our open and our flock
            (out / LOCK_FILE).unlink()
            out.rmdir()
            removed.append(True)
        return real_flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_failed_run_cleaned_up)
    acquire_run_lock(out, is_logging_rank=True)
    monkeypatch.undo()
    held = run_lock._held[out.resolve()]
    assert removed and held.handle is not None and held.made == [out.resolve()]
    assert os.path.samestat(os.stat(out / LOCK_FILE), os.fstat(held.handle.fileno()))
    third = subprocess.run([sys.executable, "-c", "import sys; from megatron_avar.training.run_lock import "
                            "acquire_run_lock as a; a(sys.argv[1], is_logging_rank=True)", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert third.returncode == 1 and "is in use by" in third.stderr
    release_run_lock(out, failed=True)  # this taker made out again: a failure removes it too
    assert not out.exists()


def _config(out: Path, *, wandb_project: str | None) -> SimpleNamespace:
    return SimpleNamespace(out=str(out), train=SimpleNamespace(steps=4), model=SimpleNamespace(hf_path="m"),
                           checkpoint=SimpleNamespace(resume=True, overwrite=False),
                           log=SimpleNamespace(wandb_project=wandb_project))


def test_a_resume_refused_at_its_start_releases_its_lock(tmp_path, monkeypatch):
    """begin_run, which every rank runs (not the logging rank's logger alone, which would leave the other ranks
    waiting in the first step), refuses a resume whose W&B run record is damaged and releases the lock it took on
    the way out. The out existed, so it keeps everything, the record included. A start that resumes nothing is
    not refused: it gets a new W&B run (the record is replaced, test below)."""
    from megatron_avar.training import run_lock, run_loop
    from megatron_avar.training.metrics import WANDB_RUN_FILE
    from megatron_avar.training.run_loop import RunStart, begin_run

    layout = SimpleNamespace(is_logging_rank=True, tp=1, pp=1, vpp=1, dp=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / WANDB_RUN_FILE).write_text('{"id": "3kd9')
    begin_run(_config(out, wandb_project="avar"), (), layout=layout)  # nothing to resume: a new run
    run_lock.release_run_lock(out)
    resume = RunStart(resume_from=out / "checkpoints" / "step_1", start_step=2)
    monkeypatch.setattr(run_loop, "plan_start", lambda *args, **kwargs: resume)
    monkeypatch.setattr(run_loop, "_check_same_model", lambda *args: None)
    with pytest.raises(ValueError, match=f"{out / WANDB_RUN_FILE} is damaged"):
        begin_run(_config(out, wandb_project="avar"), (), layout=layout)
    assert _tree(out) == sorted([LOCK_FILE, WANDB_RUN_FILE])
    assert run_lock._held == {}  # released: the user's next attempt from this process is not refused by it


def test_a_run_that_resumes_no_checkpoint_gets_a_new_wandb_run(tmp_path):
    """Only a start that resumes a checkpoint continues the W&B run of the run directory. Starting over
    (checkpoint.resume=false checkpoint.overwrite=true), and a start after an attempt that died before its first
    checkpoint (found in review: it continued the dead attempt's W&B run, whose steps 0..k W&B kept while the new
    run, perhaps with another config, logged from step 0), remove the record, so the new run logs to a new W&B run."""
    from megatron_avar.training.metrics import WANDB_RUN_FILE
    from megatron_avar.training.run_loop import RunStart, prepare_run_dir

    record = json.dumps({"id": "3kd9fj2m", "project": "avar"})
    (tmp_path / WANDB_RUN_FILE).write_text(record)
    checkpoint = tmp_path / "checkpoints" / "step_3"
    prepare_run_dir(tmp_path, RunStart(resume_from=checkpoint, start_step=4), {"out": "o"})  # a resume keeps it
    assert (tmp_path / WANDB_RUN_FILE).read_text() == record
    prepare_run_dir(tmp_path, RunStart(resume_from=None, start_step=0), {"out": "o"})  # nothing to resume
    assert not (tmp_path / WANDB_RUN_FILE).exists()
    (tmp_path / WANDB_RUN_FILE).write_text(record)
    prepare_run_dir(tmp_path, RunStart(resume_from=None, start_step=0, replace_earlier=True), {"out": "o"})
    assert not (tmp_path / WANDB_RUN_FILE).exists()


def test_a_resume_says_which_settings_changed_since_the_last_segment(tmp_path, capsys):
    """Found in review: a resume with another avar.alpha or avar.layers (not refused: only the schedule is) went
    ahead saying only "resumed from ...", so a loss curve bending there had no explanation in the run's output."""
    from megatron_avar.training.run_loop import RunStart, prepare_run_dir

    first = {"out": "o", "avar": {"alpha": 0.1, "layers": "all"}, "checkpoint": {"resume": True}}
    prepare_run_dir(tmp_path, RunStart(resume_from=None, start_step=0), first)
    resume = RunStart(resume_from=tmp_path / "checkpoints" / "step_3", start_step=4)
    prepare_run_dir(tmp_path, resume, first)
    assert "settings changed" not in capsys.readouterr().out
    prepare_run_dir(tmp_path, resume, {**first, "avar": {"alpha": 0.2, "layers": "all"}})
    assert ("changed since the last segment, applying from step 5 on (as the console counts; step 4 in "
            "metrics.jsonl): avar.alpha: 0.1 -> 0.2") in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["avar"]["alpha"] == 0.2


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_a_first_run_whose_model_does_not_load_leaves_no_folder(sft_inputs, tmp_path, command):
    """Through the command line, as a user meets it: `avar sft` / `avar grpo` on a new out (two folders deep)
    with a model whose weights are cut short fails after taking the run lock. Before,
    out was left holding only .avar.lock; now nothing of the run is left. The same run on an out that existed
    keeps the folder."""
    import shutil

    sys.path.insert(0, str(REPO / "tests" / "sft"))
    from sft_cases import sft_overrides

    model = Path(shutil.copytree(sft_inputs["hf_path"], tmp_path / "model"))
    (model / "model.safetensors").write_bytes(b"cut short")
    inputs = {**sft_inputs, "hf_path": str(model)}

    def run(out: Path) -> subprocess.CompletedProcess:
        overrides = sft_overrides(inputs, out, **{"parallel.tensor_model_parallel_size": 1})
        if command == "grpo":  # the GRPO config has its own data and train fields
            overrides = [o for o in overrides if o.split("=", 1)[0] in ("out", "model.hf_path", "data.path")]
            overrides += ["parallel.tensor_model_parallel_size=1", "train.precision=fp32", "log.tensorboard=false"]
        config = {"sft": "examples/sft/quickstart.yaml", "grpo": "examples/grpo/tiny.yaml"}[command]
        return subprocess.run([sys.executable, "-m", "megatron_avar", command, "--config", config, *overrides],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    done = run(tmp_path / "runs" / "first")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "safetensors" in output, output[-3000:]  # the load failed, naming the file
    assert not (tmp_path / "runs").exists()
    (tmp_path / "existing").mkdir()
    assert run(tmp_path / "existing").returncode != 0
    assert _tree(tmp_path / "existing") == [LOCK_FILE]


def test_a_command_failing_inside_its_lock_leaves_no_folder_it_made(tmp_path):
    """The one-process commands (eval, vas, intervene, synth, sweep) hold their lock with holding_run_lock: a
    failure inside it on an out the command made leaves nothing (before: out holding only .avar.lock); a block
    that ends well, or an out that existed, keeps the lock file."""
    from megatron_avar.training.run_lock import holding_run_lock

    made = tmp_path / "evals" / "first"
    with pytest.raises(RuntimeError, match="model did not load"):
        with holding_run_lock(made, conflict="two evals"):
            raise RuntimeError("model did not load")
    assert _tree(tmp_path) == []
    existed = tmp_path / "existed"
    existed.mkdir()
    with pytest.raises(RuntimeError):
        with holding_run_lock(existed, conflict="two evals"):
            raise RuntimeError("model did not load")
    with holding_run_lock(made, conflict="two evals"):
        pass
    assert _tree(tmp_path) == ["evals", "evals/first", f"evals/first/{LOCK_FILE}", "existed", f"existed/{LOCK_FILE}"]


def test_a_folder_removed_while_the_lock_makes_out_is_made_again(tmp_path, monkeypatch):
    """Found in review: two runs under a new common parent (two eval shards' locks in a new out), one failing at
    its start, removes the parent it made between the other's walk up to the first existing folder and its mkdir
    below it. Before, that FileNotFoundError read "cannot create its lock file ... check that out is writable";
    now the taker walks again and makes the folders, counting them as its own."""
    out = tmp_path / "evals" / ".avar-locks" / "shard-0"
    real_mkdir, raced = Path.mkdir, []

    def mkdir(self, *args, **kwargs):
        if self == tmp_path / "evals" / ".avar-locks" and not raced:  # the other run removes evals/ just now
            raced.append(True)
            (tmp_path / "evals").rmdir()
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    acquire_run_lock(out, is_logging_rank=True)
    assert raced and (out / LOCK_FILE).is_file()
    release_run_lock(out, failed=True)
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("where", ["proc", "file"])
def test_an_out_that_cannot_be_made_is_one_line_not_a_hang(tmp_path, where):
    """Found in review: output.dir=/proc/synth_out hung for ever (/proc answers mkdir with ENOENT, which the retry
    for a folder removed meanwhile by another run's cleanup took for that), and a file in the way of out was a raw
    NotADirectoryError."""
    (tmp_path / "notes.txt").write_text("the user's")
    out = Path("/proc/avar_out") if where == "proc" else tmp_path / "notes.txt" / "run"
    with pytest.raises(ValueError, match=rf"cannot make the folder {out} \(.*\): give an output folder on a file "):
        acquire_run_lock(out, is_logging_rank=True)
    assert (tmp_path / "notes.txt").read_text() == "the user's"


def test_steps_logged_after_the_last_checkpoint_are_named_when_dropped(tmp_path, capsys):
    """Found in review: a run killed before its first checkpoint started again at step 1, its logged steps gone
    from metrics.jsonl without a word."""
    from megatron_avar.training.run_loop import METRICS_FILE, RunStart, prepare_run_dir

    metrics = tmp_path / METRICS_FILE
    metrics.write_text("".join(json.dumps({"step": step, "loss/lm": 1.0}) + "\n" for step in range(4)) + '{"st')
    prepare_run_dir(tmp_path, RunStart(resume_from=None, start_step=2), {"out": "o"})
    assert "the records of steps 3-4 (as the console counts) came from an attempt that ended before " \
           "checkpointing them; they are dropped" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 1]
    prepare_run_dir(tmp_path, RunStart(resume_from=None, start_step=2), {"out": "o"})
    assert "dropped" not in capsys.readouterr().out  # nothing to drop: nothing said
