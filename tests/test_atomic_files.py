"""atomic_files: a target holds its old content or its new content, never a mix, and what a failed write leaves
behind is nothing but the old target."""

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from megatron_avar import atomic_files


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "report.json"  # the folder is created
    atomic_files.write_json(target, {"a": 1})
    atomic_files.write_json(target, {"a": 2}, indent=None, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": 2}
    assert target.read_text() == '{"a": 2}\n'
    assert _leftovers(target.parent) == []


def test_a_failed_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_files.replacing(target) as temporary:
            temporary.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # not JSON: nothing is written, the old file stays
        atomic_files.write_json(target, {"x": object()})
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_files_get_the_umask_mode_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_files.write_text(tmp_path / "summary.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644


def test_a_replaced_file_keeps_its_mode_and_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "shared" / "config.json"
    target.parent.mkdir()
    target.write_text("{}\n")
    target.chmod(0o640)
    link = tmp_path / "config.json"
    link.symlink_to(target)
    atomic_files.write_json(link, {"a": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _leftovers(target.parent) == [] and _leftovers(tmp_path) == []


def test_concurrent_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "run_config.json"
    errors = []

    def write(value):
        try:
            for _ in range(50):
                atomic_files.write_json(target, {"shard": value, "padding": "x" * 4096})
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(target.read_text())["shard"] in range(4)
    assert _leftovers(tmp_path) == []


def test_a_file_system_that_refuses_directory_fsync_still_writes(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_files.write_text(tmp_path / "latest", "step_00000002\n")
    assert (tmp_path / "latest").read_text() == "step_00000002\n"

    def failing(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)  # a real I/O error is not hidden
    with pytest.raises(OSError, match="Input/output"):
        atomic_files.write_text(tmp_path / "latest", "step_00000003\n")
    assert (tmp_path / "latest").read_text() == "step_00000002\n"


def test_leftovers_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".manifest.json.123.abcd1234.tmp").write_text("{")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / ".other.json.1.a.tmp").write_text("{")
    atomic_files.remove_leftovers(tmp_path / "manifest.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.1.a.tmp", "manifest.json"]


def test_folders_a_write_makes_are_flushed_into_their_parents(tmp_path, monkeypatch):
    """Found in review: a write into a folder it had to make flushed the folder's content, not the folder's own
    entry in its parent: after a power loss the new folder, and the file in it, could be gone."""
    synced = []
    monkeypatch.setattr(atomic_files, "fsync_directory", synced.append)
    atomic_files.write_text(tmp_path / "a" / "b" / "summary.json", "{}")
    assert synced == [tmp_path / "a" / "b", tmp_path / "a", tmp_path]  # the rename, then b in a, then a
    synced.clear()
    atomic_files.write_text(tmp_path / "a" / "b" / "summary.json", "{}")
    assert synced == [tmp_path / "a" / "b"]  # nothing made: the rename only


def test_a_zombie_or_finished_process_is_not_alive_and_a_running_one_is():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 20
    while atomic_files.process_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # exited but not reaped: a zombie, which os.kill(pid, 0) alone calls alive
    assert not atomic_files.process_alive(child.pid)
    child.wait()
    assert not atomic_files.process_alive(child.pid)
    assert atomic_files.process_alive(os.getpid())
