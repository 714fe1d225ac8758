"""Fault injection (issue 16) on `avar convert`: an --out that is, contains or lies inside the input (also through
a symlink) is refused before anything is read or written, naming both paths, with or without --overwrite.

The conversion ranks are replaced by a stand-in that writes one file (the real ones take tens of seconds): without
the refusal, `mcore-to-hf --overwrite` would then replace --out, and with it the run directory holding the input."""

import json
import os
import sys
from pathlib import Path

import pytest

from megatron_avar.cli import main


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A training run directory whose checkpoint looks like one `avar convert` can read; conversion stubbed."""
    from megatron_avar.convert import checkpoint

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "iter_0000010"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "config.json").write_text("{}")
    (ckpt / "avar_checkpoint.json").write_text(json.dumps({"format": "torch_dist", "dtype": "F32"}))
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("{}\n")

    def fake_launch(fn, world_size, source, out_dir, *args):
        (tmp_path / "launched").write_text(out_dir)
        (Path(out_dir) / "model.safetensors").touch()

    monkeypatch.setattr(checkpoint, "launch", fake_launch)
    monkeypatch.delenv("AVAR_DEBUG", raising=False)
    return run


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("out_of", [
    lambda run, ckpt: ckpt,                    # --out is the input
    lambda run, ckpt: run,                     # --out contains the input (the whole run directory)
    lambda run, ckpt: ckpt / "export",         # --out inside the input
    lambda run, ckpt: ckpt.parent / "latest",  # a symlink to the input
], ids=["same", "contains", "inside", "symlink"])
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "no-overwrite"])
def test_mcore_to_hf_refuses_an_out_overlapping_the_input(run_dir, out_of, overwrite, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "iter_0000010"
    (ckpt.parent / "latest").symlink_to(ckpt.name)
    out = out_of(run_dir, ckpt)
    before = _snapshot(tmp_path)
    argv = ["convert", "mcore-to-hf", "--mcore-path", str(ckpt), "--out", str(out)] + ["--overwrite"] * overwrite
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and f"--mcore-path {ckpt}" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path) == before and not (tmp_path / "launched").exists()


def test_mcore_to_hf_to_a_separate_folder_still_works(run_dir, tmp_path):
    ckpt = run_dir / "checkpoints" / "iter_0000010"
    out = tmp_path / "hf-export"  # a sibling whose name starts like the input's parent's: not inside it
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(ckpt), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    out = tmp_path / "run-hf"
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(ckpt), "--out", str(out)]) == 0


@pytest.mark.parametrize("relation", ["same", "contains", "inside"])
def test_hf_to_mcore_refuses_an_out_overlapping_the_input(relation, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AVAR_DEBUG", raising=False)
    hf = tmp_path / "models" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")  # refused before it is read
    out = {"same": hf, "contains": hf.parent, "inside": hf / "mcore"}[relation]
    before = _snapshot(tmp_path)
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and f"--hf-path {hf}" in err and len(err.strip().splitlines()) == 1, err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["export", "export[v2]"])  # found in review: a glob pattern, never matched
def test_leftovers_of_a_killed_conversion_are_cleaned_and_a_moved_aside_output_restored(tmp_path, name):
    import socket
    import subprocess

    from megatron_avar.convert.hf_files import atomic_output_dir

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid names nothing now
    out = tmp_path / name
    stale = tmp_path / f".{name}.tmp-{host}-{dead.pid}"
    live = tmp_path / f".{name}.tmp-{host}-{os.getppid()}"  # a conversion still running on this host
    elsewhere = tmp_path / f".{name}.tmp-other-node-1"  # another host's: cannot be judged here
    moved_aside = tmp_path / f".{name}.old-{host}-{dead.pid}"  # killed between moving out aside and replacing it
    for folder in (stale, live, elsewhere, moved_aside):
        folder.mkdir()
    (moved_aside / "model.safetensors").write_text("the previous export")
    (moved_aside / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists: choose another --out or pass --overwrite"):
        with atomic_output_dir(out, overwrite=False, inputs={}):
            pass
    assert (out / "model.safetensors").read_text() == "the previous export"  # restored, not lost
    with atomic_output_dir(out, overwrite=True, inputs={}) as temp:
        (temp / "model.safetensors").write_text("the new export")
    assert (out / "model.safetensors").read_text() == "the new export"
    assert not stale.exists() and not moved_aside.exists() and live.is_dir() and elsewhere.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, elsewhere.name])


def test_overwrite_never_replaces_a_training_checkpoint(tmp_path):
    """Found in review: a training run's step folder passed as a checkpoint `avar convert` wrote (it has
    avar_checkpoint.json and .metadata too); replacing it lost the optimizer and RNG states, and the run could no
    longer resume."""
    from megatron_avar.convert.hf_files import atomic_output_dir

    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    for name in ("avar_checkpoint.json", ".metadata", "trainer_state.json"):
        (step / name).parent.mkdir(parents=True, exist_ok=True)
        (step / name).write_text("{}")
    with pytest.raises(ValueError, match=r"holds other things than a model: .* \(not a training run's\)"):
        with atomic_output_dir(step, overwrite=True, inputs={}):
            pytest.fail("started")
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "avar_checkpoint.json", "trainer_state.json"]
    (step / "trainer_state.json").unlink()  # what hf-to-mcore writes: replaceable
    with atomic_output_dir(step, overwrite=True, inputs={}) as temp:
        (temp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in step.iterdir()) == ["model.safetensors"]


def test_a_published_output_is_on_the_disk_before_it_replaces_anything(tmp_path, monkeypatch):
    """Found in review: the shards were never flushed before the old output was moved aside and deleted, so a
    node crash could leave neither the old model nor a whole new one."""
    from megatron_avar import atomic_files
    from megatron_avar.convert.hf_files import atomic_output_dir

    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("old")
    events = []
    monkeypatch.setattr(atomic_files, "fsync_tree", lambda root: events.append(("fsync", sorted(
        p.name for p in Path(root).iterdir()), (out / "model.safetensors").read_text())))
    with atomic_output_dir(out, overwrite=True, inputs={}) as temp:
        (temp / "model.safetensors").write_text("new")
    assert events == [("fsync", ["model.safetensors"], "old")]  # flushed while the old output was still in place
    assert (out / "model.safetensors").read_text() == "new"


def test_an_infinite_shard_size_is_refused(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "iter_0000010"
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(ckpt), "--out", str(run_dir.parent / "o"),
                 "--max-shard-size-mb", "inf"]) == 2
    assert "--max-shard-size-mb must be a finite size > 0 (MiB), got inf" in capsys.readouterr().err
