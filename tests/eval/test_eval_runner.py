"""The resumable loop with a stand-in generator: done samples are skipped, an interrupted file resumes,
runs with other settings are refused, scores come from the files."""

import json

import pytest

import megatron_avar.eval.runner as runner
from megatron_avar.cli import main
from megatron_avar.eval.generation import GenerationConfig
from megatron_avar.eval.runner import EvalConfig, read_predictions, run_eval, score_run


def _config(tmp_path, root, **kwargs):
    (tmp_path / "model").mkdir(parents=True, exist_ok=True)
    if not (tmp_path / "model" / "config.json").exists():
        (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
        (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    kwargs.setdefault("benchmarks", ("mmstar", "mathvista"))
    return EvalConfig(model=str(tmp_path / "model"), out=tmp_path / "out", data_root=root, **kwargs)


def test_resume_skips_done_samples(fake_generator, tmp_path, eval_data_root):
    run_eval(_config(tmp_path, eval_data_root, limit=2, generation=GenerationConfig(batch_size=2)))
    assert fake_generator.calls == [["0", "1"], ["1", "2"]]  # mmstar 0,1 then mathvista pids 1,2, batched
    path = tmp_path / "out" / "predictions" / "mmstar.jsonl"
    first_lines = path.read_text().splitlines()
    fake_generator.calls.clear()
    scores = run_eval(_config(tmp_path, eval_data_root, generation=GenerationConfig(batch_size=2)))  # no limit now
    assert fake_generator.calls == [["2"], ["3", "4"]]  # only what is missing
    assert path.read_text().splitlines()[:2] == first_lines  # earlier predictions untouched
    assert scores["benchmarks"]["mmstar"]["num_samples"] == 3 and scores["benchmarks"]["mmstar"]["accuracy"] == 100.0
    fake_generator.calls.clear()
    run_eval(_config(tmp_path, eval_data_root))  # everything done: the generator is not even asked
    assert fake_generator.calls == []


def test_the_table_says_how_many_samples_the_folder_holds(fake_generator, tmp_path, eval_data_root):
    """Scores cover every stored record: a shorter --limit over a fuller folder does not relabel them."""
    results = tmp_path / "out" / "results.md"
    run_eval(_config(tmp_path, eval_data_root, limit=2))
    assert "Only the first 2 samples" in results.read_text()
    run_eval(_config(tmp_path, eval_data_root, limit=1))
    assert "Only the first 2 samples" in results.read_text()
    run_eval(_config(tmp_path, eval_data_root))
    run_eval(_config(tmp_path, eval_data_root, limit=1))
    assert "Only the first" not in results.read_text()


def test_interrupted_write_is_dropped_and_redone(fake_generator, tmp_path, eval_data_root):
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    path = tmp_path / "out" / "predictions" / "mmstar.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # the process died mid-line
    fake_generator.calls.clear()
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    assert fake_generator.calls == [["2"]]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["0", "1", "2"]


def test_the_repairs_touch_the_files_end_only(tmp_path, monkeypatch):
    """Before: the half-written line was dropped by rewriting the whole file (a kill during the rewrite of a large
    file left it empty), and a whole last line without its newline had the next record glued to it."""
    path = tmp_path / "p.jsonl"
    record = '{"id": "%s", "response": "B", "target": {"answer": "B"}}'
    path.write_text(record % "a" + "\n" + record % "b" + "\n" + (record % "c")[:20])
    import pathlib

    inode, writes = path.stat().st_ino, []
    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_text", lambda self, *args, **kwargs: writes.append(self))
        assert list(read_predictions(path)) == ["a", "b"]
    assert not writes and path.stat().st_ino == inode  # cut in place, nothing rewritten
    assert path.read_text() == record % "a" + "\n" + record % "b" + "\n"
    path.write_text(record % "a" + "\n" + record % "b")  # whole, no newline
    assert list(read_predictions(path)) == ["a", "b"]
    with path.open("a") as handle:  # what the next run appends
        handle.write(record % "c" + "\n")
    assert list(read_predictions(path)) == ["a", "b", "c"]


def test_a_line_cut_inside_a_character_is_a_half_written_line(tmp_path):
    """Records keep UTF-8 (a response with ° or ×): a kill can cut the last line inside a character. Before, the
    whole file was decoded first, and resuming (or scoring) stopped on a UnicodeDecodeError naming no file."""
    path = tmp_path / "p.jsonl"
    record = '{"id": "%s", "response": "the angle is 30°", "target": {"answer": "30"}}'
    whole = (record % "a" + "\n").encode()
    encoded = (record % "b").encode()
    cut = encoded[:encoded.index("°".encode()) + 1]  # ends inside the two bytes of °
    path.write_bytes(whole + cut)
    assert list(read_predictions(path, repair=False)) == ["a"] and path.read_bytes() == whole + cut  # left as is
    assert list(read_predictions(path)) == ["a"] and path.read_bytes() == whole  # cut at the end only
    path.write_bytes(cut + b"\n" + whole)  # not the last line: an error naming it
    with pytest.raises(ValueError, match="p.jsonl:1 is not valid UTF-8"):
        read_predictions(path)


def test_an_out_that_is_a_file_is_named(tmp_path, eval_data_root):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ValueError, match="--out .*out is a file; give a folder"):
        score_run(tmp_path / "out", ("mmstar",))
    assert (tmp_path / "out").read_text() == "mine"


def test_malformed_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    record = '{"id": "%s", "response": "B", "target": {"answer": "B"}}\n'
    path.write_text(record % "a" + "not json\n" + record % "b")
    with pytest.raises(ValueError, match="p.jsonl:2 is not valid JSON"):
        read_predictions(path)


def test_other_settings_in_the_same_folder_are_refused(fake_generator, tmp_path, eval_data_root):
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    with pytest.raises(ValueError, match="different generation"):
        run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",),
                         generation=GenerationConfig(max_new_tokens=7)))
    config = _config(tmp_path, eval_data_root, benchmarks=("mmstar",))
    run_eval(EvalConfig(**{**config.__dict__, "model": config.model + "/"}))  # the same folder, spelt otherwise
    # Before: the model was recorded by its path, so weights replaced in place were resumed as the same model.
    (tmp_path / "model" / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="holds predictions made with different weights"):
        run_eval(config)


def test_results_table_has_the_paper_rows_and_ours(fake_generator, tmp_path, eval_data_root):
    scores = run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar", "hallusionbench")))
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert table[0] == ("| model | MathVista | MathVision | MathVerse-VO | MMMU | MMMU-Pro | MMStar | HallusionBench "
                        "| Avg |")
    assert table[2] == "| Qwen2.5-VL-7B (paper) | 68.2 | 25.2 | 41.1 | 58.1 | 38.3 | 62.1 | 50.7 | 49.1 |"
    assert table[3] == "| AVAR-Thinker-7B (paper) | 74.7 | 37.4 | 50.4 | 63.8 | 42.9 | 64.1 | 59.5 | 56.1 |"
    hallusion = scores["benchmarks"]["hallusionbench"]["score"]
    assert table[4] == f"| ours: model |  |  |  |  |  | 100.0 | {hallusion:.1f} |  |"  # no average without all seven
    assert "average" not in json.loads((tmp_path / "out" / "scores.json").read_text())


def test_the_vas_line_says_when_the_answers_were_intervened():
    """--vas-samples measures the model; with --intervene the answers come from the model with edited attention,
    and the line said nothing of it beside their accuracy."""
    from megatron_avar.eval.report import results_table

    summary = {"score": 50.0, "num_samples": 2, "extraction_failure_rate": 0.0, "format_failure_rate": 0.0,
               "vas": {"vas": 1.234, "num_samples": 2}}
    plain = results_table({"mmstar": summary}, "ours: m")
    intervened = results_table({"mmstar": summary}, "ours: m", intervened=True)
    assert "MMStar 1.234 (n=2)" in plain and "without the intervention" not in plain
    assert "of the model without the intervention the answers were generated with): MMStar 1.234" in intervened


def test_cli_errors_and_score_only(fake_generator, tmp_path, eval_data_root, capsys):
    assert main(["eval", "--out", str(tmp_path / "o"), "--benchmarks", "mmstar,nope"]) == 2
    assert "unknown; choose from mathvista" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "o"), "--benchmarks", "mmstar"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "o"), "--benchmarks", "mmstar", "--score-only"]) == 2
    assert f"--out {tmp_path / 'o'} does not exist: --score-only scores" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    assert main(["eval", "--out", str(tmp_path / "o"), "--benchmarks", "mmstar", "--score-only"]) == 2
    assert "no predictions for mmstar" in capsys.readouterr().err
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    before = (tmp_path / "out" / "scores.json").read_text()
    assert main(["eval", "--out", str(tmp_path / "out"), "--benchmarks", "mmstar", "--score-only"]) == 0
    assert (tmp_path / "out" / "scores.json").read_text() == before
    # without --benchmarks: the folder's own (before: all seven, so "no predictions for mathvista")
    assert main(["eval", "--out", str(tmp_path / "out"), "--score-only"]) == 0
    assert (tmp_path / "out" / "scores.json").read_text() == before


def test_example_config_then_overrides_then_flags(tmp_path):
    from pathlib import Path

    from megatron_avar.cli import build_parser
    from megatron_avar.eval.cli import resolve_config

    example = Path(__file__).resolve().parents[2] / "examples" / "eval" / "vlmevalkit_qwen2_5_vl.yaml"
    args = build_parser().parse_args(["eval", "--config", str(example), "out=o", "generation.max_new_tokens=64",
                                      "limit=5", "--limit", "2", "--benchmarks", "mmstar,mmmu", "--batch-size", "4"])
    config = resolve_config(args)
    assert config.generation.min_pixels == 1280 * 28 * 28 and config.generation.max_pixels == 16384 * 28 * 28
    assert config.generation.max_new_tokens == 64 and config.generation.batch_size == 4
    assert config.limit == 2 and config.benchmarks == ("mmstar", "mmmu") and str(config.out) == "o"
    assert resolve_config(build_parser().parse_args(["eval", "--out", "o"])).benchmarks == tuple(
        "mathvista mathvision mathverse_vo mmmu mmmu_pro mmstar hallusionbench".split())
    with pytest.raises(ValueError, match="generation.top_q"):
        resolve_config(build_parser().parse_args(["eval", "--out", "o", "generation.top_q=1"]))


def test_shards_cover_every_sample_once_and_score_like_one_process(fake_generator, tmp_path, eval_data_root):
    from megatron_avar.eval.runner import score_run

    benchmarks = ("mathvista", "mmmu_pro", "hallusionbench")
    single = run_eval(_config(tmp_path / "single", eval_data_root, benchmarks=benchmarks))
    asked = [sid for call in fake_generator.calls for sid in call]
    fake_generator.calls.clear()
    for index in (1, 0, 2):  # any order, one shared folder
        assert run_eval(_config(tmp_path, eval_data_root, benchmarks=benchmarks, num_shards=3,
                                shard_index=index)) is None
    sharded_ids = [sid for call in fake_generator.calls for sid in call]
    assert sorted(sharded_ids) == sorted(asked)  # every sample exactly once over the shards
    files = sorted(p.name for p in (tmp_path / "out" / "predictions").glob("*.jsonl"))
    assert files == [f"{b}.shard-{i}-of-3.jsonl" for b in sorted(benchmarks) for i in range(3)]
    sharded = score_run(tmp_path / "out", benchmarks)
    assert sharded["benchmarks"] == single["benchmarks"]
    with pytest.raises(ValueError, match="shard_index"):
        _config(tmp_path, eval_data_root, num_shards=2, shard_index=2)


def test_a_scoring_failure_keeps_the_generated_responses(fake_generator, tmp_path, eval_data_root, monkeypatch):
    """A rule that raises (a bug, or an input it never met) must not throw away what the model generated, nor stop
    the benchmark's generation half-way (its scores after the fix would be of the first batches only)."""
    from megatron_avar.eval.benchmarks.mmstar import MMStar

    def broken(self, response, target):
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(MMStar, "evaluate", broken)
    with pytest.raises(ValueError, match=r"mmstar: scoring sample '0' failed \(OverflowError: .*every response is "
                                         r"saved in .*--score-only"):
        run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), generation=GenerationConfig(batch_size=1)))
    saved = read_predictions(tmp_path / "out" / "predictions" / "mmstar.jsonl")
    assert list(saved) == ["0", "1", "2"] and all("OverflowError" in r["scoring_error"] for r in saved.values())
    monkeypatch.undo()
    fake_generator.calls.clear()
    scores = score_run(tmp_path / "out", ("mmstar",))  # after the fix: scored from the stored responses
    assert scores["benchmarks"]["mmstar"]["num_samples"] == 3 and fake_generator.calls == []


def test_a_later_run_of_other_benchmarks_keeps_the_earlier_scores(fake_generator, tmp_path, eval_data_root):
    """Before: scores.json and results.md held only the last run's benchmarks, the earlier ones' predictions
    left unscored beside them."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    scores = run_eval(_config(tmp_path, eval_data_root, benchmarks=("mathvista",)))
    assert set(scores["benchmarks"]) == {"mmstar", "mathvista"}
    assert set(json.loads((tmp_path / "out" / "scores.json").read_text())["benchmarks"]) == {"mmstar", "mathvista"}


def test_a_run_that_stopped_before_its_first_prediction_does_not_bind_the_folder(fake_generator, tmp_path,
                                                                                 eval_data_root, monkeypatch):
    """Before: run_config.json was recorded before the generator was built, so a run that failed there (a backend
    this machine lacks) left the folder refusing every other setting, with nothing in it to mix."""
    def unavailable(model, config):
        raise ValueError("the vllm backend needs vLLM")

    monkeypatch.setattr(runner, "make_generator", unavailable)
    with pytest.raises(ValueError, match="needs vLLM"):
        run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",),
                         generation=GenerationConfig(max_new_tokens=7)))
    monkeypatch.setattr(runner, "make_generator", lambda model, config: fake_generator)
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))  # other settings: not refused
    assert [sample for call in fake_generator.calls for sample in call] == ["0", "1", "2"]


def _generates_then_dies(fake_generator, monkeypatch, batches: int):
    """Make the stand-in generator answer ``batches`` batches, then die as a killed run would."""
    calls = []

    def generate(samples):
        calls.append(samples)
        if len(calls) > batches:
            raise KeyboardInterrupt
        return ["<answer>B</answer>"] * len(samples)

    monkeypatch.setattr(fake_generator, "generate", generate)


def test_scoring_refuses_a_benchmark_whose_generation_has_not_finished(fake_generator, tmp_path, eval_data_root,
                                                                        capsys):
    """Before: `--score-only` scored whatever the shard files held — with a shard still running, one that had
    stopped, or one never started — as the benchmark's score, without a word."""
    benchmarks = ("mmstar",)
    for index in (0, 2):  # shard 1 of 3 never ran
        run_eval(_config(tmp_path, eval_data_root, benchmarks=benchmarks, num_shards=3, shard_index=index))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"generation has not finished .*mmstar: 2 of its 3 samples have predictions "
                                         r".*--allow-partial"):
        score_run(out, benchmarks)
    assert main(["eval", "--out", str(out), "--benchmarks", "mmstar", "--score-only"]) == 2
    assert "generation has not finished" in capsys.readouterr().err
    assert main(["eval", "--out", str(out), "--score-only"]) == 2  # the folder's benchmarks: none finished
    assert "nothing finished to score" in capsys.readouterr().err
    assert main(["eval", "--out", str(out), "--benchmarks", "mmstar", "--score-only", "--allow-partial"]) == 0
    scores = json.loads((out / "scores.json").read_text())["benchmarks"]["mmstar"]
    assert scores["num_samples"] == 2 and "2 of its 3 samples" in scores["partial"]
    assert "partial: generation has not finished" in (out / "results.md").read_text()
    assert main(["eval", "--out", str(out), "--benchmarks", "mmstar", "--allow-partial"]) == 2
    assert "--allow-partial applies to --score-only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--judge records its replies by rewriting the predictions files"):
        score_run(out, benchmarks, judge=object(), allow_partial=True)  # type: ignore[arg-type]
    run_eval(_config(tmp_path, eval_data_root, benchmarks=benchmarks, num_shards=3, shard_index=1))
    assert "partial" not in score_run(out, benchmarks)["benchmarks"]["mmstar"]


def test_a_run_that_stopped_mid_benchmark_is_not_scored_as_finished(fake_generator, tmp_path, eval_data_root,
                                                                     monkeypatch, capsys):
    """A killed run is not finished, also over a folder whose earlier, shorter run (--limit) had finished, and also
    after a later --limit rerun that had nothing to generate: its scores would be of the samples that happened to
    be done, without the table's "first N samples" note."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), limit=1))
    _generates_then_dies(fake_generator, monkeypatch, batches=1)
    with pytest.raises(KeyboardInterrupt):
        run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), generation=GenerationConfig(batch_size=1)))
    monkeypatch.undo()
    monkeypatch.setattr(runner, "make_generator", lambda model, config: fake_generator)
    with pytest.raises(ValueError, match=r"mmstar: no run has finished generating all its samples"):
        run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), limit=1))  # nothing left to generate
    with pytest.raises(ValueError, match=r"mmstar: no run has finished generating all its samples"):
        score_run(tmp_path / "out", ("mmstar",))
    # a later run of another benchmark leaves the unfinished one out of its scores, saying so
    scores = run_eval(_config(tmp_path, eval_data_root, benchmarks=("mathvista",)))
    assert set(scores["benchmarks"]) == {"mathvista"}
    assert "mmstar left out of the scores: its generation has not finished" in capsys.readouterr().err
    scores = run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    assert scores["benchmarks"]["mmstar"]["num_samples"] == 3 and "partial" not in scores["benchmarks"]["mmstar"]
    assert set(scores["benchmarks"]) == {"mmstar", "mathvista"}
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), limit=1))  # a shorter rerun narrows nothing
    assert score_run(tmp_path / "out", ("mmstar",))["benchmarks"]["mmstar"]["num_samples"] == 3


def test_a_rerun_that_fails_before_generating_keeps_the_benchmark_finished(fake_generator, tmp_path, eval_data_root):
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    with pytest.raises(ValueError):
        run_eval(_config(tmp_path, tmp_path / "no-data", benchmarks=("mmstar",)))  # a wrong --data-root
    assert score_run(tmp_path / "out", ("mmstar",))["benchmarks"]["mmstar"]["num_samples"] == 3


def test_a_resharded_run_that_holds_every_sample_is_finished(fake_generator, tmp_path, eval_data_root, monkeypatch):
    """Shard 1 of 2 died; the benchmark was then run whole in one process: the dead shard's file is left over,
    but every sample has a prediction."""
    _generates_then_dies(fake_generator, monkeypatch, batches=0)
    with pytest.raises(KeyboardInterrupt):
        run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), num_shards=2, shard_index=1))
    monkeypatch.undo()
    monkeypatch.setattr(runner, "make_generator", lambda model, config: fake_generator)
    (tmp_path / "out" / "predictions" / "mmstar.shard-1-of-2.jsonl").write_text("")  # what it had begun
    scores = run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    assert scores["benchmarks"]["mmstar"]["num_samples"] == 3 and "partial" not in scores["benchmarks"]["mmstar"]


def test_scoring_leaves_a_file_being_written_as_it_is(fake_generator, tmp_path, eval_data_root):
    """Before: scoring cut a half-written last line off a file a running shard was appending to; the shard then
    finished its line after the cut, leaving a headless fragment that broke every later read."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",), num_shards=2, shard_index=0))
    path = tmp_path / "out" / "predictions" / "mmstar.shard-1-of-2.jsonl"
    path.write_text('{"id": "1", "response": "<answer>B</ans')  # shard 1, mid-write
    with pytest.raises(ValueError, match="2 of its 3 samples"):
        score_run(tmp_path / "out", ("mmstar",))
    assert path.read_text() == '{"id": "1", "response": "<answer>B</ans'


def test_a_folder_from_before_completion_records_is_scored_as_it_was(fake_generator, tmp_path, eval_data_root):
    """A folder written before the completion records is scored unchecked, also after a later run of another
    benchmark (which records completion from then on)."""
    run_eval(_config(tmp_path, eval_data_root, benchmarks=("mmstar",)))
    out = tmp_path / "out"
    for done in (out / "predictions").glob("*.done.json"):
        done.unlink()
    run_config = json.loads((out / "run_config.json").read_text())
    del run_config["records_completion"]
    (out / "run_config.json").write_text(json.dumps(run_config))
    assert score_run(out, ("mmstar",))["benchmarks"]["mmstar"]["num_samples"] == 3
    scores = run_eval(_config(tmp_path, eval_data_root, benchmarks=("mathvista",)))
    assert set(scores["benchmarks"]) == {"mmstar", "mathvista"}
