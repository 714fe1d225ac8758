"""Failed teacher requests fail the run (fault injection, issue 16: a dead teacher endpoint used to give
`avar synth` exit 0 with 0 records kept): a stage whose every request failed, or more than
client.max_failed_share of whose requests failed, ends the run with an error naming the counts, the most
common error and the endpoint; the shards already written stay, no manifest is written, and the same
command resumes the run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.data.conversations import load_conversations
from megatron_avar.synth.client import TeacherConfigError
from megatron_avar.synth.pipeline import MANIFEST, TeacherFailuresError, run_synthesis
from synth_fake_teacher import Fault
from synth_helpers import shard_rows, synth_config, synth_overrides


@pytest.fixture
def dead_url():
    """A base_url with nothing listening: the port stays bound (so nothing else takes it) but never listens,
    so every connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.mark.parametrize("dead_stage", ["describe", "anchor"])
def test_a_teacher_url_where_nothing_listens_stops_the_run_at_once(tmp_path, procedural_source, teacher, dead_url,
                                                                   dead_stage, capsys):
    """Found in review: every record waited out its own retries (~47 s each by default) before the end-of-run
    check named the endpoint: minutes to hours for a port typo. Now the first request that gives up on a refused
    connection, before any request of the run was answered, stops the run."""
    data = procedural_source[0]
    args = synth_overrides(tmp_path, data, teacher, f"{dead_stage}.teacher.base_url={dead_url}", "client.concurrency=1")
    assert main(["synth", *args]) == 2
    error = capsys.readouterr().err
    assert f"avar synth: error: {dead_stage} teacher " in error
    assert (f": nothing answers at {dead_url}/chat/completions (URLError([Errno 111] Connection refused), 4 attempts, "
            f"no request of this run answered); start the server, or fix {dead_stage}.teacher.base_url") in error
    assert not (tmp_path / "run" / MANIFEST).exists()
    if dead_stage == "describe":
        assert teacher.requests() == []  # records without a description never reach the other teachers


def test_every_request_failing_fails_even_at_share_one(tmp_path, procedural_source, teacher):
    """A server that answers, but only errors: counted to the end of the run, then named with the counts."""
    teacher.faults.append(Fault("reason", ["500"], always=True))
    config = synth_config(tmp_path, procedural_source[0], teacher, "client.max_failed_share=1")
    with pytest.raises(TeacherFailuresError, match=r"reason teacher .* 8 of 8 requests failed \(100%; every "
                                                   r"request failed\).*most common error \(8 of 8\): gave up after "
                                                   r"4 attempts \(last: HTTP 500\)"):
        run_synthesis(config)


def test_failed_share_above_the_limit_fails_below_it_succeeds(tmp_path, procedural_source, teacher):
    data = procedural_source[0]
    teacher.faults.append(Fault("describe", ["500"], match="pink", always=True))  # 1 of 8 records: 12.5%

    # Above the default limit (5%): an error, the 7 records already written stay, no manifest.
    with pytest.raises(TeacherFailuresError) as error:
        run_synthesis(synth_config(tmp_path, data, teacher))
    message = str(error.value)
    assert f"describe teacher 'Qwen/Qwen2.5-VL-72B-Instruct' at {teacher.base_url}/chat/completions: 1 of 8 " \
           "requests failed (12%; more than client.max_failed_share=0.05)" in message
    assert "most common error (1 of 1): gave up after 4 attempts (last: HTTP 500)" in message
    assert "Kept 7 of 8 records" in message
    assert shard_rows(tmp_path / "run" / "data") == 7 and not (tmp_path / "run" / MANIFEST).exists()
    with pytest.raises(ValueError, match="is part of an unfinished `avar synth` run"):  # not a dataset yet
        load_conversations(tmp_path / "run" / "data")

    # Below a raised limit: the same run succeeds, from the cache, asking only for the failed record again.
    before = len(teacher.requests())
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, "client.max_failed_share=0.2"))
    assert manifest["kept"] == 7 and manifest["filters"] == {"describe.request_failed": 1}
    assert (tmp_path / "run" / MANIFEST).is_file()
    assert {r["stage"] for r in teacher.requests()[before:]} == {"describe"} and \
        all("pink" in r["question"] for r in teacher.requests()[before:])

    # Fixed endpoint: a rerun (overwrite, since that run finished) completes the data set.
    teacher.faults.clear()
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, "output.overwrite=true"))
    assert manifest["kept"] == 8 and manifest["teachers"]["describe"]["failures"] == 0
    assert len(load_conversations(Path(manifest["config"]["output"]["dir"]) / "data")) == 8


@pytest.mark.parametrize("held", ["run", "work"])
def test_a_second_synthesis_on_a_held_output_or_work_dir_is_refused_and_deletes_nothing(
        tmp_path, procedural_source, teacher, held, capsys):
    import fcntl
    import json

    from megatron_avar.training.run_lock import LOCK_FILE

    args = synth_overrides(tmp_path, procedural_source[0], teacher)
    assert main(["synth", *args]) == 0
    finished = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != LOCK_FILE}
    asked = len(teacher.requests())
    with open(tmp_path / held / LOCK_FILE, "a+") as other:  # a run still going, in another process
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)  # (the finished run's record is still in it)
        other.write(json.dumps({"host": "node7", "pid": 4242, "slurm_job": "99", "started": "t0"}))
        other.flush()
        assert main(["synth", *args, "output.overwrite=true"]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / held} is in use by a run on node7 (pid 4242, Slurm job 99, started t0)" in error
    assert "two syntheses on one output.dir or run.work_dir would delete and overwrite" in error
    # the finished run is untouched (overwrite=true deletes it only once the lock is held), nothing was asked
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*")
            if p.is_file() and p.name != LOCK_FILE} == finished
    assert len(teacher.requests()) == asked
    assert main(["synth", *args, "output.overwrite=true"]) == 0  # once it ends, the run goes ahead


@pytest.mark.parametrize("key, name", [("output.dir", "run"), ("run.work_dir", "work")])
def test_an_output_or_work_dir_that_is_a_file_is_named_as_such(tmp_path, procedural_source, teacher, key, name,
                                                                 capsys):
    (tmp_path / name).write_text("the user's file")
    assert main(["synth", *synth_overrides(tmp_path, procedural_source[0], teacher)]) == 2
    assert f"{key} {tmp_path / name} exists and is not a folder; choose another {key}" in capsys.readouterr().err
    assert (tmp_path / name).read_text() == "the user's file" and teacher.requests() == []


def test_a_work_dir_whose_progress_folder_holds_other_files_is_refused_and_kept(tmp_path, procedural_source,
                                                                                teacher, capsys):
    """Each start clears <run.work_dir>/progress: it used to delete the whole folder, a folder of the user's too
    (run.work_dir=. in a project holding progress/), before the sources were even read."""
    from megatron_avar.synth.progress import clear_progress

    notes = tmp_path / "work" / "progress" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    assert main(["synth", *synth_overrides(tmp_path, procedural_source[0], teacher)]) == 2
    assert f"{notes.parent} holds ['notes.txt'], which avar synth did not write" in capsys.readouterr().err
    assert notes.read_text() == "mine" and teacher.requests() == []
    # what a run leaves there is cleared: a worker's file (a host name with dots) and a killed write's leftover
    notes.unlink()
    ours = ["describe.node-7.cluster.local.4242.0a1b2c3d.json", ".reason.n1.17.deadbeef.json.17.cafe0123.tmp"]
    for name in ours:
        (notes.parent / name).write_text("{}")
    clear_progress(notes.parent)
    assert list(notes.parent.iterdir()) == []


def test_a_replacing_run_that_fails_keeps_the_run_it_replaces_whole(tmp_path, procedural_source, teacher, dead_url):
    from megatron_avar.synth.pipeline import REPLACED
    from megatron_avar.training.run_lock import LOCK_FILE

    data, out = procedural_source[0], tmp_path / "run"
    assert main(["synth", *synth_overrides(tmp_path, data, teacher)]) == 0
    finished = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    assert any(path.parts[0] == "data" for path in finished)
    # the replacement (its own request cache) finds its anchor teacher failing: it fails before its manifest
    replacing = ["output.overwrite=true", f"run.work_dir={tmp_path / 'work2'}"]
    teacher.faults.append(Fault("anchor", ["500"], always=True))
    with pytest.raises(TeacherFailuresError, match=r"the finished run it replaces stays in .*/run/\.replaced until"):
        run_synthesis(synth_config(tmp_path, data, teacher, *replacing))
    teacher.faults.clear()
    # a teacher where nothing listens stops it at once: the message says where the replaced run is too
    with pytest.raises(TeacherConfigError, match=r"nothing answers at .* \(the finished run this one replaces stays "
                                                  r"in .*/run/\.replaced until a run finishes\)"):
        run_synthesis(synth_config(tmp_path, data, teacher, *replacing, f"anchor.teacher.base_url={dead_url}",
                                   "client.concurrency=1"))
    kept = {p.relative_to(out / REPLACED): p.read_bytes() for p in (out / REPLACED).rglob("*") if p.is_file()}
    assert kept == finished and not (out / MANIFEST).exists()
    kept = {p.relative_to(out / REPLACED): p.read_bytes() for p in (out / REPLACED).rglob("*") if p.is_file()}
    assert kept == finished and not (out / MANIFEST).exists()
    # the same command once the endpoint answers: finished, and only then is the replaced run gone
    run_synthesis(synth_config(tmp_path, data, teacher, *replacing))
    assert (out / MANIFEST).is_file() and not (out / REPLACED).exists()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "data", MANIFEST]
