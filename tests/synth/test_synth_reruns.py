"""Reruns and refusals of `avar synth` (synth.output_dir): an unfinished run is resumed only by its own settings,
a run whose teacher answers are unusable or that keeps no record does not count as finished, and a refused run
leaves no trace."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.data.conversations import load_conversations
from megatron_avar.synth.output_dir import RUN_RECORD
from megatron_avar.synth.pipeline import MANIFEST
from megatron_avar.training.run_lock import LOCK_FILE
from synth_fake_teacher import Fault
from synth_helpers import shard_rows, synth_overrides


def files(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` with its bytes (the lock file aside: it records its last holder)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("avar synth: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_an_unfinished_run_is_resumed_only_by_its_own_settings(tmp_path, procedural_source, teacher, capsys):
    """Found in review: rerunning an unfinished run's output.dir with other settings (other sources) silently
    deleted its shards and wrote the other run's there. Now the run records its settings when it starts, and a
    rerun with other identifying settings is refused naming them; settings of how the run goes (client.*,
    run.batch_records) may change on a resume."""
    data, out = procedural_source[0], tmp_path / "run"
    teacher.faults.append(Fault("describe", ["500"], match="pink", always=True))  # 1 of 8: above the default share
    assert main(["synth", *synth_overrides(tmp_path, data, teacher)]) == 1
    capsys.readouterr()
    unfinished = files(out)
    assert shard_rows(out / "data") == 7  # (the loader refuses them: tests/synth/test_synth_unfinished.py)
    asked = len(teacher.requests())

    other = synth_overrides(tmp_path, data, teacher, f"sources=[{{name: other, path: '{data}', limit: 6}}]",
                            "reason.num_candidates=2")
    assert main(["synth", *other]) == 2
    error = error_line(capsys)
    assert f"output.dir {out} holds an unfinished run (3 shard(s) in data/) with other settings: " in error
    assert "reason.num_candidates: 1 (that run) vs 2 (this one)" in error
    assert "sources.0.limit: None (that run) vs 6 (this one)" in error
    assert "sources.0.name: 'proc' (that run) vs 'other' (this one)" in error
    assert ("Rerun with that run's settings to resume it, pass output.overwrite=true to replace it (teacher answers "
            f"stay in the request cache, {tmp_path / 'work' / 'cache'}), or choose another output.dir") in error
    assert files(out) == unfinished and len(teacher.requests()) == asked  # nothing deleted, nothing asked

    # Its own settings resume it, also with other client and batching settings: only the failed record is asked.
    resumed = synth_overrides(tmp_path, data, teacher, "client.max_failed_share=0.2", "client.concurrency=2",
                              "run.batch_records=4")
    assert main(["synth", *resumed]) == 0
    assert {(r["stage"], "pink" in r["question"]) for r in teacher.requests()[asked:]} == {("describe", True)}
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "data", MANIFEST]  # the record goes once finished


def test_overwrite_replaces_an_unfinished_run_and_a_run_without_a_record_is_refused(tmp_path, procedural_source,
                                                                                    teacher, capsys):
    """output.overwrite=true means "replace what output.dir holds", an unfinished run of other settings too.
    Shards without a record of their settings (an earlier avar synth's) cannot be told apart: refused."""
    data, out = procedural_source[0], tmp_path / "run"
    teacher.faults.append(Fault("describe", ["500"], match="pink", always=True))
    assert main(["synth", *synth_overrides(tmp_path, data, teacher)]) == 1
    capsys.readouterr()
    teacher.faults.clear()
    replacing = synth_overrides(tmp_path, data, teacher, "sources.0.limit=5", "output.overwrite=true")
    assert main(["synth", *replacing]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["read"] == manifest["kept"] == 5 and len(load_conversations(out / "data")) == 5

    (out / MANIFEST).unlink()  # an unfinished run with shards, as an avar synth without RUN_RECORD left it
    assert main(["synth", *synth_overrides(tmp_path, data, teacher, "sources.0.limit=5")]) == 2
    error = error_line(capsys)
    assert f"output.dir {out} holds an unfinished run (2 shard(s) in data/) without a readable {RUN_RECORD}" in error
    assert "pass output.overwrite=true to replace it" in error and len(load_conversations(out / "data")) == 5


def test_malformed_teacher_answers_fail_the_run_before_its_manifest(tmp_path, procedural_source, teacher, capsys):
    """Found in review: when every reasoning reply was malformed the run printed "kept 0 of 8 records", exited 0
    and wrote a finished manifest over no data/ folder: the next step failed with "data path not found" and a
    rerun was refused as finished. Only failed requests were weighed. Now malformed answers count against
    client.max_failed_share like failed requests: the run fails before its manifest, naming the stage and an
    example reply, and resumes."""
    data, out = procedural_source[0], tmp_path / "run"
    teacher.faults.append(Fault("reason", ["malformed"], always=True))
    args = synth_overrides(tmp_path, data, teacher)
    assert main(["synth", *args]) == 1
    error = error_line(capsys)
    assert (f"avar synth: error: reason teacher 'Qwen/Qwen3-235B-A22B' at {teacher.base_url}/chat/completions: 8 of 8 "
            "requests got only malformed answers (client.format_retries=1) (100%; every answer was malformed); most "
            "common malformation (8 of 8): no 'Final answer:' line, e.g. the reply 'The question asks: ") in error
    assert "Kept 0 of 8 records, but wrote no manifest.json: the run is unfinished" in error
    assert "raise client.format_retries" in error
    assert not (out / MANIFEST).exists() and not (out / "data").exists()

    # Resumable: the cached malformed answers stay, another format retry asks only the reasoning teacher again.
    teacher.faults.clear()
    asked = len(teacher.requests())
    assert main(["synth", *args, "client.format_retries=2"]) == 0
    assert {(r["stage"], r["seed"]) for r in teacher.requests()[asked:] if r["stage"] != "anchor"} == {("reason", 2000)}
    assert json.loads((out / MANIFEST).read_text())["kept"] == 8 and len(load_conversations(out / "data")) == 8


def test_a_share_of_malformed_answers_above_the_limit_fails_below_it_succeeds(tmp_path, procedural_source, teacher,
                                                                               capsys):
    data, out = procedural_source[0], tmp_path / "run"
    teacher.faults.append(Fault("describe", ["malformed"], match="pink", always=True))  # 1 of 8 records: 12.5%
    assert main(["synth", *synth_overrides(tmp_path, data, teacher)]) == 1
    error = error_line(capsys)
    assert ("describe teacher 'Qwen/Qwen2.5-VL-72B-Instruct' at " in error and ": 1 of 8 requests got only malformed "
            "answers (client.format_retries=1) (12%; more than client.max_failed_share=0.05); most common "
            "malformation (1 of 1): no '## Relations' section, e.g. the reply '## Global scan" in error)
    assert "Kept 7 of 8 records (shards in" in error and not (out / MANIFEST).exists()
    assert main(["synth", *synth_overrides(tmp_path, data, teacher, "client.max_failed_share=0.2")]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kept"] == 7 and manifest["teachers"]["describe"]["malformed"] == 1


def test_a_run_that_keeps_no_record_is_not_finished(tmp_path, procedural_source, teacher, capsys):
    """Found in review (with the malformed answers above): a run whose every record is filtered out wrote a
    finished manifest pointing to a data/ folder that does not exist. Such a run now fails (exit 1) before its
    manifest, naming the drop reasons; it wrote nothing, so a rerun with other settings starts it over."""
    data, out = procedural_source[0], tmp_path / "run"
    teacher.faults.append(Fault("reason", ["wrong"], always=True))
    assert main(["synth", *synth_overrides(tmp_path, data, teacher)]) == 1
    assert error_line(capsys).startswith("avar synth: error: kept 0 of 8 records (verify.wrong_answer: 8): there is "
                                         "no dataset to write, so it wrote no manifest.json: the run is unfinished.")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, RUN_RECORD]
    teacher.faults.clear()
    assert main(["synth", *synth_overrides(tmp_path, data, teacher, "reason.teacher.seed=7")]) == 0
    assert json.loads((out / MANIFEST).read_text())["kept"] == 8


@pytest.mark.parametrize("case", ["foreign output.dir", "foreign progress folder", "work_dir in use"])
def test_a_refused_run_leaves_no_trace(tmp_path, procedural_source, teacher, case, capsys):
    """Found in review: a run refused for a foreign output.dir left its lock file (.avar.lock) in that folder
    and made a sibling <output.dir>.work/: the refusal came after the locks, which make their folders. Now
    every refusal is made first by a look that changes nothing, and the existing folders are locked first."""
    out = tmp_path / "mine"
    args = synth_overrides(tmp_path, procedural_source[0], teacher, f"output.dir={out}", "run.work_dir=null")
    if case == "foreign output.dir":
        out.mkdir()
        (out / "notes.txt").write_text("the user's")
    elif case == "foreign progress folder":
        (tmp_path / "mine.work" / "progress").mkdir(parents=True)
        (tmp_path / "mine.work" / "progress" / "notes.txt").write_text("the user's")
    before = tree(tmp_path)
    if case == "work_dir in use":
        (tmp_path / "mine.work").mkdir()
        with open(tmp_path / "mine.work" / LOCK_FILE, "a+") as other:  # a run on another output.dir, going on
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            before = tree(tmp_path)
            assert main(["synth", *args]) == 2
    else:
        assert main(["synth", *args]) == 2
    error = error_line(capsys)
    assert {"foreign output.dir": "holds ['notes.txt'], which avar synth did not write",
            "foreign progress folder": "holds ['notes.txt'], which avar synth did not write",
            "work_dir in use": "is in use by"}[case] in error
    assert tree(tmp_path) == before and teacher.requests() == []
