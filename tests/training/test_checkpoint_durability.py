"""A checkpoint is on the disk before `latest` names it: a node crash (not only a killed process) right after
the pointer is replaced must not leave a `latest` that names files still in the page cache."""

import pytest

from megatron_avar.testing import run_on_ranks

pytestmark = pytest.mark.multiprocess


def _publish_recording_events(root: str) -> tuple[list, list[str]]:
    import os
    from pathlib import Path

    from megatron_avar import atomic_files
    from megatron_avar.training.checkpointing import LATEST, TRAINER_STATE, _publish

    root_path = Path(root)
    partial = root_path / ".step_00000002.partial"
    (partial / "rank_state").mkdir(parents=True)
    (partial / TRAINER_STATE).write_text("{}")
    (partial / "rank_state" / "00000.safetensors").write_bytes(b"rng")
    (partial / "__0_0.distcp").write_bytes(b"weights")
    files = sorted(str(p.relative_to(root_path)) for p in partial.rglob("*"))

    events = []

    def relative(path) -> str:
        return str(Path(path).resolve().relative_to(root_path.resolve()))

    real_file, real_directory, real_rename, real_replace = (atomic_files.fsync_file, atomic_files.fsync_directory,
                                                            os.rename, os.replace)
    atomic_files.fsync_file = lambda path: (events.append(("fsync", relative(path))), real_file(path))[1]
    atomic_files.fsync_directory = lambda path: (events.append(("fsync", relative(path))), real_directory(path))[1]
    os.rename = lambda a, b: (events.append(("rename", relative(a), relative(b))), real_rename(a, b))[1]
    os.replace = lambda a, b: (events.append(("replace", relative(b))), real_replace(a, b))[1]
    try:
        _publish(root_path, root_path / "step_00000002", partial, keep=2)
    finally:
        atomic_files.fsync_file, atomic_files.fsync_directory, os.rename, os.replace = (
            real_file, real_directory, real_rename, real_replace)
    assert (root_path / LATEST).read_text() == "step_00000002\n"
    return events, files


def test_every_file_and_folder_is_flushed_before_the_rename_and_the_rename_before_latest(tmp_path):
    root = tmp_path / "checkpoints"
    events, files = run_on_ranks(_publish_recording_events, 1, str(root), timeout_s=120)[0]
    events = [tuple(event) for event in events]
    rename = events.index(("rename", ".step_00000002.partial", "step_00000002"))
    flushed_before = {event[1] for event in events[:rename] if event[0] == "fsync"}
    assert set(files) | {".step_00000002.partial"} <= flushed_before  # files, subfolders and the folder itself
    latest = events.index(("replace", "latest"))
    assert ("fsync", ".") in events[rename:latest]  # the rename is durable before latest names it
    assert ("fsync", ".") in events[latest:]  # and so is the new pointer
