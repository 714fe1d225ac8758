"""What an `avar eval` folder records of its runs: each benchmark's own --limit, the samples any sharding has
generated, and the model's weights by content (a copy resumes, a fine-tune written over them does not)."""

import dataclasses
import hashlib
import json
import os
import shutil

import pytest

import megatron_avar.analysis.model_loading as model_loading
import megatron_avar.eval.runner as runner
from megatron_avar.eval.generation import GenerationConfig
from megatron_avar.eval.runner import EvalConfig, run_eval, score_run


def _config(tmp_path, root, **kwargs) -> EvalConfig:
    model = tmp_path / "model"
    if not model.is_dir():
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
        (model / "model.safetensors").write_bytes(b"weights")
    kwargs.setdefault("benchmarks", ("mmstar",))
    return EvalConfig(model=str(model), out=tmp_path / "out", data_root=root, **kwargs)


def _run_config(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "run_config.json").read_text())


def _counts(scores: dict | None) -> dict[str, int]:
    """benchmark -> how many samples its scores are of."""
    assert scores is not None
    return {name: summary["num_samples"] for name, summary in scores["benchmarks"].items()}


def _ids(calls) -> list[str]:
    return [sample for call in calls for sample in call]


def test_each_benchmark_is_scored_over_its_own_limit(fake_generator, tmp_path, eval_data_root):
    """Before: the folder recorded one --limit for all benchmarks. After a full run of one, a --limit run of another
    refused its own scores (and told to rerun the same command, which failed again); the reverse order dropped the
    earlier limited benchmark from the scores."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mathvista",)))
    scores = run_eval(_config(tmp_path, eval_data_root, limit=2))
    assert _counts(scores) == {"mathvista": 4, "mmstar": 2}
    assert _run_config(tmp_path)["limits"] == {"mathvista": None, "mmstar": 2}
    assert "Only the first 2 samples" in (tmp_path / "out" / "results.md").read_text()
    shutil.rmtree(tmp_path / "out")
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mathvista",), limit=2))
    scores = run_eval(_config(tmp_path, eval_data_root))
    assert _counts(scores) == {"mathvista": 2, "mmstar": 3}


def test_a_folder_with_one_limit_for_all_is_read_as_it_was(fake_generator, tmp_path, eval_data_root):
    """A folder written before per-benchmark limits holds its one ``limit`` for each of its benchmarks; a later run
    records them per benchmark. Where that limit asks for more than a benchmark's finished runs (a run over every
    sample that stopped), the refusal names the command that finishes it."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar", "mathvista"), limit=2))
    path = tmp_path / "out" / "run_config.json"
    old = _run_config(tmp_path)
    del old["limits"]
    path.write_text(json.dumps({**old, "limit": 2}))
    scores = score_run(tmp_path / "out", ("mmstar", "mathvista"))
    assert _counts(scores) == {"mmstar": 2, "mathvista": 2}
    scores = run_eval(_config(tmp_path, eval_data_root))  # mmstar whole: mathvista stays as its run left it
    assert _counts(scores) == {"mmstar": 3, "mathvista": 2}
    assert _run_config(tmp_path)["limits"] == {"mmstar": None, "mathvista": 2}
    path.write_text(json.dumps({**old, "limit": None}))  # the folder's limit came from a full run that stopped
    with pytest.raises(ValueError, match=r"mathvista: no run has finished generating all its samples .*`avar eval` "
                                         r"without --limit finishes it"):
        score_run(tmp_path / "out", ("mathvista",))


def test_a_resume_under_another_sharding_keeps_what_the_others_generated(fake_generator, tmp_path, eval_data_root,
                                                                         monkeypatch):
    """Before: a run resumed from its own predictions file only, so changing the sharding (one process after a
    sharded run, or the reverse) generated everything again."""
    for index in (0, 1):
        run_eval(_config(tmp_path, eval_data_root, limit=3, num_shards=2, shard_index=index))
    fake_generator.calls.clear()
    scores = run_eval(_config(tmp_path, eval_data_root))  # every sample: the shards held all 3 (limit 3 of 3)
    assert fake_generator.calls == [] and _counts(scores) == {"mmstar": 3}
    shutil.rmtree(tmp_path / "out")

    asked = []

    def dies_after_one(samples):  # an unsharded run killed after its first sample
        asked.append(samples)
        if len(asked) > 1:
            raise KeyboardInterrupt
        return ["<answer>B</answer>"] * len(samples)

    monkeypatch.setattr(fake_generator, "generate", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_eval(_config(tmp_path, eval_data_root, generation=GenerationConfig(batch_size=1)))
    monkeypatch.undo()
    monkeypatch.setattr(runner, "make_generator", lambda model, config: fake_generator)
    fake_generator.calls.clear()
    for index in (0, 1):
        assert run_eval(_config(tmp_path, eval_data_root, num_shards=2, shard_index=index)) is None
    assert sorted(_ids(fake_generator.calls)) == ["1", "2"]
    assert _counts(score_run(tmp_path / "out", ("mmstar",))) == {"mmstar": 3}  # each sample once


def _weights(model, size: int = (16 << 20) + 4096) -> bytes:
    """A shard larger than the 16 MiB the identity hashed before (header and leading tensors)."""
    data = bytes(size)
    (model / "model.safetensors").write_bytes(data)
    return data


def test_a_copy_of_the_weights_resumes(fake_generator, tmp_path, eval_data_root):
    """Before: each shard's mtime was part of the weights' identity, so a copy of the same weights (cp without -p,
    staging to node-local disk per Slurm task) refused the next shard and every resume as "different weights"."""
    shard = tmp_path / "model" / "model.safetensors"
    run_eval(_config(tmp_path, eval_data_root, limit=1, num_shards=2, shard_index=0))
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data)  # copied again: another inode and mtime
    run_eval(_config(tmp_path, eval_data_root, limit=1, num_shards=2, shard_index=1))
    run_eval(_config(tmp_path, eval_data_root, limit=1, num_shards=2, shard_index=0))
    assert _run_config(tmp_path)["weights"]["weights_sha256"] == \
        hashlib.sha256(f"model.safetensors {hashlib.sha256(data).hexdigest()}\n".encode()).hexdigest()
    # a copy at another path (each task staging the model to its node's disk) is the same model too
    staged = tmp_path / "staged"
    shutil.copytree(tmp_path / "model", staged)
    run_eval(dataclasses.replace(_config(tmp_path, eval_data_root, limit=1, num_shards=2, shard_index=1),
                                 model=str(staged)))


def test_a_fine_tune_written_over_the_weights_is_another_model(fake_generator, tmp_path, eval_data_root):
    """Before: the content was hashed over the first shard's first 16 MiB only, so a same-size fine-tune whose
    changes lie past them (its header and leading tensors, e.g. a frozen embedding table, unchanged), written in
    place with the old mtime kept, was resumed as the same model."""
    config = _config(tmp_path, eval_data_root, limit=1)
    shard = tmp_path / "model" / "model.safetensors"
    data = _weights(tmp_path / "model")
    run_eval(config)
    before = shard.stat()
    tuned = bytearray(data)
    tuned[-1] = 1
    shard.write_bytes(bytes(tuned))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ValueError, match=r"holds predictions made with different weights .*their content differs"):
        run_eval(config)


def test_a_resume_in_place_does_not_read_the_weights_again(fake_generator, tmp_path, eval_data_root, monkeypatch):
    """The recorded hash of a shard whose stat (device, inode, size, mtime, ctime) is unchanged is reused; a copy
    is read once."""
    config = _config(tmp_path, eval_data_root, limit=1)
    shard = tmp_path / "model" / "model.safetensors"
    _weights(tmp_path / "model")
    run_eval(config)
    read = []
    hash_file = model_loading._sha256
    monkeypatch.setattr(model_loading, "_sha256", lambda path, *head: read.append(path.name) or hash_file(path, *head))
    run_eval(config)
    assert "model.safetensors" not in read
    shutil.copyfile(shard, tmp_path / "copy")
    os.replace(tmp_path / "copy", shard)
    run_eval(config)
    assert read.count("model.safetensors") == 1


def _legacy_record(model) -> dict:
    """The weights record of a folder written before content hashes."""
    shard = model / "model.safetensors"
    with shard.open("rb") as handle:
        head = hashlib.sha256(handle.read(16 << 20)).hexdigest()
    config = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    return dict(path=str(model.resolve()), config_sha256=config, index_sha256=None,
                shards=[dict(name=shard.name, bytes=shard.stat().st_size, mtime=shard.stat().st_mtime)],
                first_shard_head_sha256=head)


def test_a_record_from_before_content_hashes_resumes_and_is_upgraded(fake_generator, tmp_path, eval_data_root):
    """An older folder's record (sizes, mtimes, a 16 MiB head hash) resumes while it matches as it did, and is then
    replaced by the content record. A shard with another mtime is refused (that record cannot tell a copy from a
    same-size fine-tune), naming how to give it back its recorded time."""
    config = _config(tmp_path, eval_data_root, limit=1)
    shard = tmp_path / "model" / "model.safetensors"
    data = _weights(tmp_path / "model")
    run_eval(config)
    path = tmp_path / "out" / "run_config.json"
    legacy = {**_run_config(tmp_path), "weights": _legacy_record(tmp_path / "model")}
    path.write_text(json.dumps(legacy))
    shard.write_bytes(data)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"different weights .*recorded by size and mtime.* 1 shard\(s\) have another "
                                         r"mtime.*touch -d @"):
        run_eval(config)
    mtime = legacy["weights"]["shards"][0]["mtime"]
    os.utime(shard, (mtime, mtime))  # what `touch -d @MTIME` does
    run_eval(config)
    assert _run_config(tmp_path)["weights"]["weights_sha256"]  # upgraded: a copy resumes from now on
    shard.write_bytes(data)
    run_eval(config)
