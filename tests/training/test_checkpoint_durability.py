"""A checkpoint is on the disk before `latest` names it: a node crash (not only a killed process) right after
the pointer is replaced must not leave a `latest` that names files still in the page cache. Flushing is where a
file system reports delayed write errors (EIO, a quota), so a failed flush fails the save like a failed write:
CheckpointWriteError on every rank (none left waiting), the partial folder removed, `latest` unchanged.

save_checkpoint runs for real on 2 gloo ranks with megatron's parallel state, around a stand-in model whose
sharded state is one file per rank (megatron's writer, which flushes its own files, is not what is tested)."""

import pytest

from megatron_avar.testing import run_on_ranks

pytestmark = pytest.mark.multiprocess


def _save_twice_recording(root: str, fail_flush_of: str) -> dict:
    import errno
    import os
    from pathlib import Path
    from types import SimpleNamespace

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_avar import atomic_files
    from megatron_avar.training import checkpointing
    from megatron_avar.training.megatron_setup import init_distributed

    init_distributed(1, 1, seed=0)
    rank, run = dist.get_rank(), Path(root)
    model = SimpleNamespace(gather_updated_weights=lambda: None, scheduler=SimpleNamespace(state_dict=lambda: {}),
                            chunks=[SimpleNamespace(ddp_config=SimpleNamespace(use_distributed_optimizer=False))])
    checkpointing._sharded_state = lambda model, is_loading: {}
    dist_checkpointing.save = lambda state, folder: Path(folder, f"__{rank}_0.distcp").write_bytes(b"weights")

    events, armed = [], []  # the flush fails (with fail_flush_of) in the second save only

    def relative(path) -> str:
        return str(Path(path).resolve().relative_to((run / "checkpoints").resolve()))

    real_file, real_directory, real_rename, real_replace = (atomic_files.fsync_file, atomic_files.fsync_directory,
                                                            os.rename, os.replace)

    def fsync_file(path):
        if any(armed) and Path(path).name == fail_flush_of:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        events.append(("fsync", relative(path)))
        real_file(path)

    atomic_files.fsync_file = fsync_file
    atomic_files.fsync_directory = lambda path: (events.append(("fsync", relative(path))), real_directory(path))[1]
    os.rename = lambda a, b: (events.append(("rename", relative(a), relative(b))), real_rename(a, b))[1]
    os.replace = lambda a, b: (events.append(("replace", relative(b))), real_replace(a, b))[1]
    result = {"error": None}
    try:
        checkpointing.save_checkpoint(run, 1, model, {"data": {}}, keep=2)
        first = sorted(str(p.relative_to(run / "checkpoints")) for p in (run / "checkpoints").rglob("*"))
        armed.append(bool(fail_flush_of))
        try:
            checkpointing.save_checkpoint(run, 2, model, {"data": {}}, keep=2)
        except checkpointing.CheckpointWriteError as error:
            result["error"] = str(error)
    finally:
        atomic_files.fsync_file, atomic_files.fsync_directory, os.rename, os.replace = (
            real_file, real_directory, real_rename, real_replace)
        parallel_state.destroy_model_parallel()
    latest = checkpointing.latest_checkpoint(run)
    result.update(events=events, first=first, latest=latest.name if latest else None,
                  left=sorted(p.name for p in (run / "checkpoints").iterdir()))
    return result


def test_every_file_is_flushed_before_the_rename_and_the_rename_before_latest(tmp_path):
    results = run_on_ranks(_save_twice_recording, 2, str(tmp_path / "run"), "", timeout_s=120)
    events = [tuple(event) for event in results[0]["events"]]
    assert results[0]["latest"] == "step_00000002" and results[0]["error"] is None
    rename = events.index(("rename", ".step_00000001.partial", "step_00000001"))
    flushed_before = {event[1] for event in events[:rename] if event[0] == "fsync"}
    files = {name.replace("step_00000001", ".step_00000001.partial", 1) for name in results[0]["first"]
             if name.startswith("step_00000001")}
    assert files <= flushed_before  # every file and folder of the checkpoint, and the folder itself
    assert {".step_00000001.partial/rank_state/00001.safetensors", ".step_00000001.partial/__1_0.distcp"} <= files
    latest = events.index(("replace", "latest"))
    assert ("fsync", ".") in events[rename:latest]  # the rename is durable before latest names it
    assert ("fsync", ".") in events[latest:]  # and so is the new pointer
    rank_1 = {tuple(event) for event in results[1]["events"]}
    assert ("fsync", ".step_00000001.partial/rank_state/00001.safetensors") in rank_1  # flushed on its own node


def test_a_failed_flush_fails_the_save_on_every_rank_and_publishes_nothing(tmp_path):
    results = run_on_ranks(_save_twice_recording, 2, str(tmp_path / "run"), "trainer_state.json", timeout_s=120)
    for result in results:
        assert result["error"] is not None and "writing checkpoint step_00000002 failed" in result["error"]
        assert "step_00000001 stays the latest checkpoint" in result["error"]
        assert result["latest"] == "step_00000001"
    assert "OSError: [Errno 5] Input/output error" in results[0]["error"]
    # the other rank names the rank whose write failed, and its error
    assert "(writing its part failed on rank 0 (its error: OSError: [Errno 5] Input/output error" in results[1]["error"]
    assert results[0]["left"] == ["latest", "step_00000001"]  # the partial folder is gone


@pytest.mark.parametrize("pointer", [b"\xff\xfe", b"../../elsewhere\n", b"step_00000001/../../x"])
def test_a_latest_pointer_that_names_no_step_folder_is_refused_by_name(tmp_path, pointer):
    """Found in review: a non-UTF-8 `latest` gave a decode error naming no file, and one naming a path outside
    the run was followed."""
    from megatron_avar.training import checkpointing

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_bytes(pointer)
    with pytest.raises(ValueError, match="latest does not name a step_\\* folder of this run: it was altered"):
        checkpointing.latest_checkpoint(tmp_path)
