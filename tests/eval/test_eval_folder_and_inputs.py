"""`avar eval` on bad input and on an --out it must not mix, replace or share: other data on resume, a folder it did not
write, a second run of the same shard, damaged benchmark, model and run files, settings the run would ignore.
Each failure is one line naming the problem and the fix, and leaves what the folder held as it was."""

import fcntl
import json
import shutil
from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.eval.runner import EvalConfig, read_predictions, run_eval, score_run
from megatron_avar.training.run_lock import LOCK_FILE


def _model(tmp_path) -> Path:
    """A model folder the checks accept (generation is stood in for by the fixture above)."""
    model = tmp_path / "model"
    if not model.is_dir():
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
        (model / "model.safetensors").write_bytes(b"weights")
    return model


def _config(tmp_path, root, **kwargs) -> EvalConfig:
    kwargs.setdefault("benchmarks", ("mmstar",))
    return EvalConfig(model=str(_model(tmp_path)), out=tmp_path / "out", data_root=root, **kwargs)


def _argv(tmp_path, root, *extra) -> list[str]:
    return ["eval", "--model", str(_model(tmp_path)), "--data-root", str(root), "--out", str(tmp_path / "out"),
            "--benchmarks", "mmstar", *extra]


def _error(captured: str) -> str:
    """The CLI's error line (after any progress bar the failing run had drawn on that line)."""
    (line,) = [line for line in captured.splitlines() if "avar eval: error:" in line]
    return line[line.index("avar eval: error:"):]


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` but the lock (which names its last holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _mmstar_copy(source_root: Path, root: Path, edit) -> Path:
    """DATA_ROOT holding source_root's MMStar with ``edit(rows)`` applied (a list of row dicts, changed in place)."""
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(source_root / "mmstar" / "mmstar.parquet"),
                                  split="train")
    rows = table.to_list()
    edit(rows)
    (root / "mmstar").mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=table.features).to_parquet(str(root / "mmstar" / "mmstar.parquet"))
    return root


def _shift_ids(rows):  # another split: other ids, questions and answers
    for row in rows:
        row["index"] += 10


def test_a_resume_reading_other_data_is_refused(fake_generator, tmp_path, eval_data_root, capsys):
    """Found in review: rerunning an --out with another --data-root (a different split file) appended the new data's
    ids to predictions/mmstar.jsonl and scored the two datasets together as one benchmark."""
    other = _mmstar_copy(eval_data_root, tmp_path / "other", _shift_ids)
    assert main(_argv(tmp_path, eval_data_root)) == 0
    before = _contents(tmp_path / "out")
    capsys.readouterr()
    assert main(_argv(tmp_path, other)) == 2
    error = capsys.readouterr().err
    assert (f"mmstar: the data (--data-root {other.resolve()}) differ from those the predictions in "
            f"{tmp_path / 'out' / 'predictions'} were made from (--data-root {eval_data_root.resolve()}): sample 0 "
            "(id '10') differs") in error and "give another --out for these data" in error
    assert _contents(tmp_path / "out") == before
    assert fake_generator.calls == [["0"], ["1"], ["2"]]  # nothing of the other data was generated


def test_a_refused_resume_leaves_the_folder_finished(fake_generator, tmp_path, eval_data_root):
    """A run refused for its data before writing anything leaves the folder's recorded limit alone: its benchmark
    stays finished (a widened limit would have made it unfinished until the other data were generated)."""
    other = _mmstar_copy(eval_data_root, tmp_path / "other", _shift_ids)
    run_eval(_config(tmp_path, eval_data_root, limit=2))
    with pytest.raises(ValueError, match="sample 0 .id '10'. differs"):
        run_eval(_config(tmp_path, other))
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["limits"]["mmstar"] == 2
    assert score_run(tmp_path / "out", ("mmstar",))["benchmarks"]["mmstar"]["num_samples"] == 2


def test_the_data_are_compared_on_the_samples_both_runs_read(fake_generator, tmp_path, eval_data_root):
    """--limit changes how many samples a run reads, not which: a resume with another limit is compared on the
    samples both read (MMMU-Pro's limit counts each setting); a changed answer, or data longer or shorter than a
    complete record, is refused."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar", "mmmu_pro"), limit=1))
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar", "mmmu_pro")))  # the rest of the same data
    assert fake_generator.calls[-1] == ["vision/test_Art_2"]

    def change_answer(rows):
        rows[1]["answer"] = "C"

    changed = _mmstar_copy(eval_data_root, tmp_path / "changed", change_answer)
    with pytest.raises(ValueError, match=r"sample 1 \(id '1'\) differs in its id, question, answer or images"):
        run_eval(_config(tmp_path, changed))
    longer = _mmstar_copy(eval_data_root, tmp_path / "longer", lambda rows: rows.append({**rows[0], "index": 7}))
    with pytest.raises(ValueError, match=r"sample 3 \(id '7'\) is one more than the 3 recorded"):
        run_eval(_config(tmp_path, longer))
    shorter = _mmstar_copy(eval_data_root, tmp_path / "shorter", lambda rows: rows.pop())
    with pytest.raises(ValueError, match="they end after 2 samples, where the predictions were made from 3"):
        run_eval(_config(tmp_path, shorter))
    assert len(read_predictions(tmp_path / "out" / "predictions" / "mmstar.jsonl")) == 3
    # the same data again (copied elsewhere): resumed, nothing to generate
    fake_generator.calls.clear()
    run_eval(_config(tmp_path, _mmstar_copy(eval_data_root, tmp_path / "copy", lambda rows: None)))
    assert fake_generator.calls == []


def test_a_folder_eval_did_not_write_is_refused(fake_generator, tmp_path, eval_data_root, capsys):
    """Found in review: `avar eval --out DIR` replaced the user's results.md and scores.json in a folder no eval run
    had written (no run_config.json), where `avar vas` / `avar intervene` refuse such an --out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.md").write_text("my notes\n")
    (out / "scores.json").write_text('{"mine": 1}\n')
    before = _contents(out)
    capsys.readouterr()
    assert main(_argv(tmp_path, eval_data_root)) == 2
    error = capsys.readouterr().err
    assert (f"--out {out} holds scores.json and results.md that `avar eval` did not write, and a run would replace "
            "them: choose another --out") in error and error.count("\n") == 1
    assert main(["eval", "--out", str(out), "--score-only"]) == 2
    assert _contents(out) == before and fake_generator.calls == []
    # predictions without the run_config.json of the run that made them: of unknown model and settings
    shutil.rmtree(out)
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "mmstar.jsonl").write_text('{"id": "0", "response": "B", "target": {"answer": "B"}}\n')
    assert main(_argv(tmp_path, eval_data_root)) == 2
    assert "holds predictions but no run_config.json" in capsys.readouterr().err
    assert fake_generator.calls == []


def test_scoring_some_benchmarks_keeps_the_folders_others(fake_generator, tmp_path, eval_data_root):
    """Found in review: `--score-only --benchmarks mmstar` on a folder that had scored mmstar and mathvista wrote a
    scores.json and results.md without mathvista."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar", "mathvista")))
    before = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert main(["eval", "--out", str(tmp_path / "out"), "--benchmarks", "mmstar", "--score-only"]) == 0
    after = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert set(after["benchmarks"]) == {"mmstar", "mathvista"} and after == before
    assert "| ours: model |" in (tmp_path / "out" / "results.md").read_text()


def test_two_runs_of_one_shard_on_one_folder_are_refused(fake_generator, tmp_path, eval_data_root, capsys):
    """Found in review: two `avar eval` runs on one --out both generated the missing samples and interleaved their
    appends. The second is refused naming the holder; shards of one run have a lock each."""
    out = tmp_path / "out"
    out.mkdir()
    with (out / LOCK_FILE).open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert main(_argv(tmp_path, eval_data_root)) == 2
        error = capsys.readouterr().err
        assert "is in use by" in error and "two unsharded `avar eval` runs on one --out would both generate" in error
        assert not (out / "predictions").exists() and fake_generator.calls == []
        # another shard is not held up by it
        assert main(_argv(tmp_path, eval_data_root, "--num-shards", "2", "--shard-index", "1")) == 0
    shard_lock = out / ".avar-locks" / "shard-0-of-2" / LOCK_FILE
    shard_lock.parent.mkdir(parents=True)
    with shard_lock.open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(_argv(tmp_path, eval_data_root, "--num-shards", "2", "--shard-index", "0")) == 2
        assert "`avar eval` runs of shard 0 of 2 on one --out" in capsys.readouterr().err
    assert not (out / "predictions" / "mmstar.shard-0-of-2.jsonl").exists()
    assert main(_argv(tmp_path, eval_data_root, "--num-shards", "2", "--shard-index", "0")) == 0  # released


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "is empty"),
    (b"{bad json\n", "cannot be read as json (ArrowInvalid: JSON parse error"),
], ids=["empty", "bad-json"])
def test_a_damaged_benchmark_file_is_named(fake_generator, tmp_path, capsys, content, problem):
    """Found in review: an empty split file gave `RuntimeError: generator raised StopIteration` and one that is not
    JSON a DatasetGenerationError, both as tracebacks naming no file."""
    root = tmp_path / "data"
    (root / "mmstar").mkdir(parents=True)
    (root / "mmstar" / "val.jsonl").write_bytes(content)
    capsys.readouterr()
    assert main(_argv(tmp_path, root)) == 2
    error = _error(capsys.readouterr().err)
    assert error.startswith(f"avar eval: error: benchmark mmstar: {root / 'mmstar' / 'val.jsonl'} {problem}")
    assert "hf download --repo-type dataset Lin-Chen/MMStar" in error


def test_a_damaged_parquet_file_is_named(tmp_path, eval_data_root):
    """A parquet file cut short: pyarrow's ArrowInvalid named no file (MMStar's own mmstar.parquet as well)."""
    from megatron_avar.eval.benchmarks import get_benchmark

    root = tmp_path / "data"
    (root / "mmstar").mkdir(parents=True)
    whole = (eval_data_root / "mmstar" / "mmstar.parquet").read_bytes()
    (root / "mmstar" / "mmstar.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"mmstar.parquet cannot be read as parquet \(ArrowInvalid: .*download it"):
        list(get_benchmark("mmstar").samples(root))


@pytest.mark.parametrize(("flags", "message"), [
    (["--temperature", "0.5"], "generation.temperature=0.5 (--temperature) applies only with --do-sample"),
    (["--top-k", "3"], "(--top-k) applies only with --do-sample"),
    (["--top-p", "0.9"], "(--top-p) applies only with --do-sample"),
    (["--seed", "4"], "(--seed) applies only with --do-sample"),
    (["generation.top_k=3"], "(--top-k) applies only with --do-sample"),
    (["--alpha-img", "0.5"], "(--alpha-img) applies only with --intervene"),
    (["--alpha-sys", "0.1"], "(--alpha-sys) applies only with --intervene"),
    (["--intervene-mode", "additive"], "(--intervene-mode) applies only with --intervene"),
    (["--intervene-layers", "all"], "(--intervene-layers) applies only with --intervene"),
    (["--tensor-parallel-size", "2"], "(--tensor-parallel-size) applies only with --backend vllm"),
    (["--max-model-len", "8192"], "(--max-model-len) applies only with --backend vllm"),
])
def test_settings_the_run_would_ignore_are_refused(capsys, flags, message):
    """Found in review: sampling settings without --do-sample, intervention settings without --intervene and
    --tensor-parallel-size with the hf backend were ignored, yet recorded in run_config.json as if used."""
    capsys.readouterr()
    assert main(["eval", "--out", "o", *flags, "--print-config"]) == 2
    error = capsys.readouterr().err
    assert message in error and "leave" in error and error.count("\n") == 1, error


def test_the_settings_apply_with_what_they_need(capsys):
    argv = ["eval", "--out", "o", "--do-sample", "--temperature", "0.5", "--top-k", "3", "--seed", "4", "--intervene",
            "--alpha-img", "0.3", "--intervene-layers", "all", "--print-config"]
    assert main(argv) == 0
    generation = json.loads(capsys.readouterr().out)["generation"]
    assert (generation["temperature"], generation["top_k"], generation["alpha_img"]) == (0.5, 3, 0.3)
    assert main(["eval", "--out", "o", "--backend", "vllm", "--max-model-len", "8192", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["generation"]["max_model_len"] == 8192
    # vLLM's length holds the prompt and the response
    assert main(["eval", "--out", "o", "--backend", "vllm", "--max-model-len", "2048", "--print-config"]) == 2
    assert "max_model_len (2048) must exceed max_new_tokens (2048)" in capsys.readouterr().err


def test_a_folder_recorded_with_an_ignored_setting_still_resumes(fake_generator, tmp_path, eval_data_root):
    """A run_config.json written before ignored settings were refused holds e.g. a greedy run's temperature 0.7;
    that run decoded greedily, so a greedy resume is the same setting."""
    run_eval(_config(tmp_path, eval_data_root, limit=1))
    path = tmp_path / "out" / "run_config.json"
    recorded = json.loads(path.read_text())
    recorded["generation"].update(temperature=0.7, alpha_img=0.5)
    path.write_text(json.dumps(recorded))
    run_eval(_config(tmp_path, eval_data_root))
    assert fake_generator.calls == [["0"], ["1"], ["2"]]


def test_damaged_json_files_are_named(fake_generator, tmp_path, eval_data_root, capsys):
    """Found in review: a damaged run_config.json in --out (or config.json / tokenizer.json in --model) printed only
    `Expecting value: line 1 column 1 (char 0)`, naming no file."""
    run_eval(_config(tmp_path, eval_data_root))
    out = tmp_path / "out"
    (out / "run_config.json").write_text("")
    capsys.readouterr()
    assert main(_argv(tmp_path, eval_data_root)) == 2
    assert f"{out / 'run_config.json'} is not valid JSON (Expecting value" in capsys.readouterr().err
    assert main(["eval", "--out", str(out), "--score-only"]) == 2
    assert f"{out / 'run_config.json'} is not valid JSON" in capsys.readouterr().err
    assert (out / "run_config.json").read_text() == ""  # left for the user to restore
    shutil.rmtree(out)
    model = _model(tmp_path)
    for name in ("tokenizer.json", "config.json"):
        (model / name).write_text("{")
        assert main(_argv(tmp_path, eval_data_root)) == 2
        assert f"--model {model}: {model / name} is not valid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_a_truncated_weights_file_is_named(toy_checkpoint, tmp_path, eval_data_root, capsys):
    """Found in review: a model.safetensors cut short gave a safetensors_rust.SafetensorError traceback."""
    model = tmp_path / "model"
    shutil.copytree(toy_checkpoint, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data-root", str(eval_data_root), "--out", str(tmp_path / "out"),
                 "--benchmarks", "mmstar", "--limit", "1", "--max-new-tokens", "2"]) == 2
    error = _error(capsys.readouterr().err)
    assert f"{weights} is not a readable safetensors file" in error and "cut short" in error
    assert "download or copy it again" in error


def test_score_only_refuses_the_settings_only_generation_uses(fake_generator, tmp_path, eval_data_root, capsys):
    """Found in review: `--score-only` with --model, --data-root, --limit, --vas-samples, sampling or intervention
    flags printed scores and exited 0, every one of them ignored (a generating run refuses the settings it would not
    use)."""
    run_eval(_config(tmp_path, eval_data_root))
    fake_generator.calls.clear()
    out = tmp_path / "out"
    before = _contents(out)
    score_only = ["eval", "--score-only", "--out", str(out)]
    capsys.readouterr()
    assert main([*score_only, "--vas-samples", "3", "--intervene", "--alpha-img", "0.5", "--do-sample",
                 "--temperature", "0.3", "--limit", "99", "--data-root", "nosuch"]) == 2
    error = capsys.readouterr().err
    assert ("--data-root, --limit, --do-sample, --temperature, --vas-samples, --intervene, --alpha-img apply only "
            "when generating; --score-only re-scores the stored predictions without generating: leave them out, or "
            "drop --score-only to generate") in error and error.count("\n") == 1, error
    for extra in (["--model", str(_model(tmp_path))], ["--seed", "3"], ["--num-shards", "2"],
                  ["generation.max_new_tokens=5"], ["limit=2"]):
        assert main([*score_only, *extra]) == 2
        error = capsys.readouterr().err
        assert f"{extra[0]} applies only when generating" in error and "leave it out" in error, error
    assert _contents(out) == before and fake_generator.calls == []
    # what scoring reads is taken
    assert main([*score_only, "--benchmarks", "mmstar", "benchmarks=[mmstar]", f"out={out}"]) == 0


def test_score_only_names_an_out_that_is_not_a_run_folder(tmp_path, capsys):
    """Before: `--score-only --out nosuch` said "no predictions for mathvista" (the first of all seven)."""
    capsys.readouterr()
    assert main(["eval", "--score-only", "--out", str(tmp_path / "nosuch")]) == 2
    error = capsys.readouterr().err
    assert (f"--out {tmp_path / 'nosuch'} does not exist: --score-only scores the predictions an earlier `avar eval` "
            "wrote there; give that run's folder") in error and error.count("\n") == 1
    (tmp_path / "file").write_text("x")
    assert main(["eval", "--score-only", "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'} is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--score-only", "--out", str(tmp_path / "empty")]) == 2
    assert f"no predictions to score in {tmp_path / 'empty' / 'predictions'}" in capsys.readouterr().err
    assert not (tmp_path / "nosuch").exists() and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("split", [["--mathvision-split", "testmini"], ["--mathvision-split", "test"],
                                   ["mathvision_split=testmini"]])
def test_a_mathvision_split_for_a_run_without_mathvision_is_refused(capsys, split):
    """Found in review: `--mathvision-split testmini --benchmarks mmstar` was accepted, and ignored."""
    capsys.readouterr()
    assert main(["eval", "--out", "o", "--benchmarks", "mmstar,mmmu", *split, "--print-config"]) == 2
    error = capsys.readouterr().err
    assert (f"{split[-1] if '=' in split[-1] else split[0]} applies to mathvision, which this run's benchmarks "
            "(mmstar, mmmu) leave out: add mathvision to --benchmarks") in error and error.count("\n") == 1, error
    assert main(["eval", "--out", "o", "--benchmarks", "mmstar,mathvision", *split, "--print-config"]) == 0


def test_a_data_root_that_is_not_a_folder_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Found in review: `--data-root nosuch` (or a file) was reported as "split 'val' not found" once the model had
    loaded."""
    import megatron_avar.eval.runner as runner

    def loading(config):
        raise AssertionError("the run started")

    monkeypatch.setattr(runner, "run_eval", loading)
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    for root, problem in ((tmp_path / "nosuch", "does not exist"), (tmp_path / "file", "is not a folder")):
        assert main(["eval", "--model", str(_model(tmp_path)), "--data-root", str(root), "--out",
                     str(tmp_path / "out"), "--benchmarks", "mmstar"]) == 2
        error = capsys.readouterr().err
        assert (f"--data-root (data_root) {root} {problem}: give the folder with one subfolder per benchmark"
                in error and error.count("\n") == 1), error
    assert not (tmp_path / "out").exists()
    # with --allow-hub a missing folder means the hub (a shared config's data_root, absent on this machine)
    with pytest.raises(AssertionError, match="the run started"):
        main(["eval", "--model", str(_model(tmp_path)), "--data-root", str(tmp_path / "nosuch"), "--allow-hub",
              "--out", str(tmp_path / "out"), "--benchmarks", "mmstar"])


@pytest.mark.parametrize(("flags", "message"), [
    (["--seed", str(2**63)], f"generation.seed (--seed) must be in [0, 2**63) with the hf backend, got {2**63}"),
    (["--seed", "99999999999999999999999"], "generation.seed (--seed) must be in [0, 2**63)"),
    (["--seed", "-1"], "generation.seed (--seed) must be in [0, 2**63) with the hf backend, got -1"),
    # vLLM seeds numpy with it, which takes 32-bit seeds
    (["--backend", "vllm", "--seed", str(2**32)], "generation.seed (--seed) must be in [0, 2**32) with the vllm"),
])
def test_a_seed_torch_or_vllm_cannot_take_is_refused_before_the_model_loads(capsys, flags, message):
    """Before: `--do-sample --seed 99999999999999999999999` failed with torch's "Overflow when unpacking long long",
    after the model had loaded."""
    capsys.readouterr()
    assert main(["eval", "--out", "o", "--do-sample", *flags, "--print-config"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert main(["eval", "--out", "o", "--do-sample", "--seed", str(2**63 - 1), "--print-config"]) == 0
    assert main(["eval", "--out", "o", "--do-sample", "--backend", "vllm", "--seed", str(2**32 - 1),
                 "--print-config"]) == 0
