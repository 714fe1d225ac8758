"""Each benchmark read from a copy in its real hub schema and layout; prompts, extraction and scores
against hand-worked expectations (eval_fixtures.CASES); re-scoring a predictions file is exact."""

import json
import shutil

import pytest

from eval_fixtures import CASES, HALLUSION_ROWS, hallusion_id
from megatron_avar.eval.benchmarks import BENCHMARKS, get_benchmark
from megatron_avar.eval.runner import score_run


def _samples(name, root, **kwargs):
    return {s.id: s for s in get_benchmark(name).samples(root, **kwargs)}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_case_is_judged_as_worked_out_by_hand(name, eval_data_root):
    samples = _samples(name, eval_data_root)
    benchmark = get_benchmark(name)
    wrong = [(sid, response, expected) for sid, response, expected in CASES[name]
             if benchmark.evaluate(response, samples[sid].target)["correct"] is not expected]
    assert not wrong
    # every sample of the copy is exercised, and every prompt carries its images
    assert {sid for sid, _, _ in CASES[name]} == set(samples)
    assert all(any(item["type"] == "image" for item in s.content) for s in samples.values())


def _write_predictions(out, name, root, responses):
    samples = _samples(name, root)
    with (out / "predictions" / f"{name}.jsonl").open("w") as handle:
        for sid, response in responses.items():
            handle.write(json.dumps({"id": sid, "response": response, "target": samples[sid].target}) + "\n")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_accuracy_of_a_predictions_file_and_rescoring_is_exact(name, eval_data_root, tmp_path):
    first = {}
    for sid, response, expected in CASES[name]:
        first.setdefault(sid, (response, expected))
    (tmp_path / "predictions").mkdir()
    _write_predictions(tmp_path, name, eval_data_root, {sid: r for sid, (r, _) in first.items()})
    scores = score_run(tmp_path, (name,))["benchmarks"][name]
    expected_accuracy = 100.0 * sum(e for _, e in first.values()) / len(first)
    assert scores["accuracy"] == pytest.approx(expected_accuracy, abs=0.01)
    assert scores["num_samples"] == len(first)
    snapshot = (tmp_path / "scores.json").read_bytes(), (tmp_path / "results.md").read_bytes()
    score_run(tmp_path, (name,))
    assert ((tmp_path / "scores.json").read_bytes(), (tmp_path / "results.md").read_bytes()) == snapshot


def test_hallusionbench_question_and_figure_accuracy(eval_data_root, tmp_path):
    # canned: VD/illusion f0q0 ok, f0q1 ok, f1q0 wrong, f1q1 ok; VS/math ok; VD/math unknown (wrong)
    responses = dict(zip([hallusion_id(r) for r in HALLUSION_ROWS], ["Yes", "No", "Yes", "No", "Yes", "Unknown"]))
    (tmp_path / "predictions").mkdir()
    _write_predictions(tmp_path, "hallusionbench", eval_data_root, responses)
    s = score_run(tmp_path, ("hallusionbench",))["benchmarks"]["hallusionbench"]
    # aAcc 4/6; figures {VD-ill-f0: ok, VD-ill-f1: no, VS-math-f0: ok, VD-math-f0: no} -> 2/4;
    # questions {VD-ill-q0: no, VD-ill-q1: ok, VS-math-q0: ok, VD-math-q0: no} -> 2/4 (category keeps the two
    # "math" subcategories apart: merged, fAcc would be 1/3)
    assert (s["aAcc"], s["fAcc"], s["qAcc"]) == (pytest.approx(66.67), 50.0, 50.0)
    assert s["score"] == pytest.approx((200 / 3 + 50 + 50) / 3, abs=0.01)
    assert s["extraction_failure_rate"] == pytest.approx(100 / 6, abs=0.01)


def test_failure_rates_separate_format_and_extraction(eval_data_root, tmp_path):
    responses = {"0": "<think>never closed", "1": "no letter here", "2": "<think>x</think>B"}
    (tmp_path / "predictions").mkdir()
    _write_predictions(tmp_path, "mmstar", eval_data_root, responses)
    s = score_run(tmp_path, ("mmstar",))["benchmarks"]["mmstar"]
    assert s["format_failure_rate"] == pytest.approx(100 / 3, abs=0.01)
    assert s["extraction_failure_rate"] == pytest.approx(200 / 3, abs=0.01)  # the format failure has no answer either
    assert s["accuracy"] == pytest.approx(100 / 3, abs=0.01)
    assert s["by_category"] == {"coarse perception": 0.0, "math": 50.0}


def test_mmmu_pro_headline_is_the_mean_of_its_two_settings(eval_data_root, tmp_path):
    responses = {"standard (10 options)/test_Math_1": "J", "standard (10 options)/test_Math_2": "C",
                 "vision/test_Art_1": "C", "vision/test_Art_2": "B"}
    (tmp_path / "predictions").mkdir()
    _write_predictions(tmp_path, "mmmu_pro", eval_data_root, responses)
    s = score_run(tmp_path, ("mmmu_pro",))["benchmarks"]["mmmu_pro"]
    assert s["by_setting"] == {"standard (10 options)": 100.0, "vision": 50.0}
    assert s["score"] == 75.0 and s["accuracy"] == 75.0


def test_prompts_follow_the_harness(eval_data_root):
    vista = _samples("mathvista", eval_data_root)["1"]
    assert vista.content[0]["type"] == "image"
    assert vista.content[1]["text"].startswith("Hint: answer it.\nQuestion: question 1?")
    mmmu = _samples("mmmu", eval_data_root)
    assert mmmu["validation_Math_1"].prompt_text == (
        "Question: How many sides does <image> have?\nOptions:\nA. 2\nB. 4\nC. 6\nD. 8\n"
        "Please select the correct answer from the options above. \n")
    # images interleaved where referenced, also inside options; unreferenced image_3 dropped
    kinds = [item["type"] for item in mmmu["validation_Math_3"].content]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert mmmu["validation_Math_2"].prompt_text == "Question: Compare <image> with <image>: what is the sum?\n"
    pro = _samples("mmmu_pro", eval_data_root)
    assert pro["vision/test_Art_1"].prompt_text == (
        "<image>Answer the following multiple-choice question in the image. "
        "Answer directly with the option letter from the given choices. ")
    assert pro["standard (10 options)/test_Math_1"].prompt_text.endswith(
        "J. 9\nAnswer directly with the option letter from the given choices. ")
    star = _samples("mmstar", eval_data_root)["0"]
    assert star.prompt_text == ("<image>Question: Which shape is shown?\nOptions:\nA. circle\nB. square\nC. triangle\n"
                                "D. star\nPlease select the correct answer from the options above. \n")
    hallusion = _samples("hallusionbench", eval_data_root)["VD_illusion_0_0_1"]
    assert hallusion.prompt_text == "<image>Is statement 1 true for figure 0?"
    vision = _samples("mathvision", eval_data_root)
    assert "<image1>" not in vision["1"].prompt_text and "(E) 5/6" in vision["1"].prompt_text
    assert vision["2"].prompt_text.startswith("<image>Hint: Please answer the question and provide the final answer")


def test_subsets_splits_and_limits(eval_data_root):
    verse = _samples("mathverse_vo", eval_data_root)
    assert list(verse) == ["2", "4", "6"]  # only the "Vision Only" rows of the five versions
    assert all(s.target["question_for_eval"] for s in verse.values())
    assert len(_samples("mmmu", eval_data_root)) == 4  # the dev split next to validation is not read
    assert list(_samples("mathvista", eval_data_root, limit=2)) == ["1", "2"]
    pro = _samples("mmmu_pro", eval_data_root, limit=1)  # --limit applies per setting
    assert list(pro) == ["standard (10 options)/test_Math_1", "vision/test_Art_1"]


def test_missing_benchmark_names_the_expected_files_and_hub(tmp_path):
    with pytest.raises(ValueError, match=r"mathvista.*testmini-\*\.parquet.*AI4Math/MathVista"):
        list(get_benchmark("mathvista").samples(tmp_path))
    (tmp_path / "mmmu_pro" / "standard (10 options)").mkdir(parents=True)  # an empty config folder
    with pytest.raises(ValueError, match=r"mmmu_pro/standard \(10 options\)/test-\*\.parquet.*MMMU/MMMU_Pro"):
        list(get_benchmark("mmmu_pro").samples(tmp_path))
    with pytest.raises(ValueError, match="no --data-root"):
        list(get_benchmark("mmstar").samples(None))


def test_jsonl_copy_with_image_paths_reads_like_parquet(eval_data_root, tmp_path):
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(eval_data_root / "mmstar" / "mmstar.parquet"), split="train")
    folder = tmp_path / "mmstar"
    (folder / "images").mkdir(parents=True)
    with (folder / "val.jsonl").open("w") as handle:
        for row in rows:
            row["image"].save(folder / "images" / f"{row['index']}.png")
            handle.write(json.dumps({**row, "image": str(folder / "images" / f"{row['index']}.png")}) + "\n")
    from_jsonl, from_parquet = _samples("mmstar", tmp_path), _samples("mmstar", eval_data_root)
    assert list(from_jsonl) == list(from_parquet)
    assert from_jsonl["1"].target == from_parquet["1"].target
    assert from_jsonl["1"].content[0]["image"].tobytes() == from_parquet["1"].content[0]["image"].tobytes()


def test_a_copy_without_a_hub_column_and_a_record_without_a_response_are_named(eval_data_root, tmp_path):
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(eval_data_root / "mmstar" / "mmstar.parquet"), split="train")
    folder = tmp_path / "data" / "mmstar"
    (folder / "images").mkdir(parents=True)
    with (folder / "val.jsonl").open("w") as handle:
        for row in rows:
            row["image"].save(folder / "images" / f"{row['index']}.png")
            record = {k: v for k, v in row.items() if k != "question"}
            handle.write(json.dumps({**record, "image": str(folder / "images" / f"{row['index']}.png")}) + "\n")
    with pytest.raises(ValueError, match=r"mmstar: a row lacks the column 'question' of Lin-Chen/MMStar"):
        _samples("mmstar", tmp_path / "data")

    out = tmp_path / "run"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "mmstar.jsonl").write_text(json.dumps({"id": "0", "target": {"answer": "B"}}) + "\n")
    with pytest.raises(ValueError, match=r"mmstar.jsonl:1 lacks response"):
        score_run(out, ("mmstar",))


def test_parquet_converter_layout_and_save_to_disk_read_like_the_hub_files(eval_data_root, tmp_path):
    import shutil

    import datasets

    (tmp_path / "converted" / "mmstar" / "val").mkdir(parents=True)  # refs/convert/parquet: <split>/0000.parquet
    shutil.copy(eval_data_root / "mmstar" / "mmstar.parquet",
                tmp_path / "converted" / "mmstar" / "val" / "0000.parquet")
    rows = datasets.load_dataset("parquet", data_files=str(eval_data_root / "mmstar" / "mmstar.parquet"), split="train")
    rows.save_to_disk(str(tmp_path / "saved" / "mmstar" / "val"))
    reference = _samples("mmstar", eval_data_root)
    for root in (tmp_path / "converted", tmp_path / "saved"):
        samples = _samples("mmstar", root)
        assert list(samples) == list(reference)
        assert [s.target for s in samples.values()] == [s.target for s in reference.values()]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _with_postscript(source, dest, column, row):
    """``source`` parquet with row ``row``'s ``column`` image replaced by PostScript bytes, written to ``dest``."""
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(source), split="train")
    rows = rows.cast_column(column, datasets.Image(decode=False))
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows.map(lambda r, i: {column: {"bytes": EPS, "path": "cat.png"} if i == row else r[column]},
             with_indices=True).to_parquet(str(dest))


def test_benchmark_images_decode_only_as_photo_and_figure_formats(eval_data_root, tmp_path, monkeypatch):
    """PostScript in a benchmark's image column: `datasets` decodes images with any format PIL knows, and PIL hands
    PostScript to Ghostscript (an interpreter; a stand-in records whether it ran). Every way a split is read
    (hub shards, MMStar's own file, a save_to_disk folder) hands the images over undecoded, and they decode as
    roles.IMAGE_FORMATS only: the row is named, nothing runs."""
    import datasets

    bin_dir, ran = tmp_path / "bin", tmp_path / "gs ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f'#!/bin/sh\n[ "$1" = "--version" ] && echo 10.02.1 && exit 0\ntouch "{ran}"\nexit 1\n')
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    shard = "mathvista/data/testmini-00000-of-00001.parquet"
    _with_postscript(eval_data_root / shard, tmp_path / "shards" / shard, "decoded_image", 1)
    _with_postscript(eval_data_root / "mmstar" / "mmstar.parquet", tmp_path / "own" / "mmstar" / "mmstar.parquet",
                     "image", 2)
    pro = "mmmu_pro/vision/test-00000-of-00001.parquet"  # a config after the first: rows counted per config
    shutil.copytree(eval_data_root / "mmmu_pro" / "standard (10 options)",
                    tmp_path / "pro" / "mmmu_pro" / "standard (10 options)")
    _with_postscript(eval_data_root / pro, tmp_path / "pro" / pro, "image", 1)
    datasets.load_dataset("parquet", data_files=str(tmp_path / "shards" / shard), split="train").save_to_disk(
        str(tmp_path / "saved" / "mathvista" / "testmini"))
    for name, root, message in (("mathvista", tmp_path / "shards", "mathvista, row 1 of the data: an embedded image"),
                                ("mmstar", tmp_path / "own", "mmstar, row 2 of the data: an embedded image"),
                                ("mathvista", tmp_path / "saved", "mathvista, row 1 of the data: an embedded image"),
                                ("mmmu_pro", tmp_path / "pro", r"mmmu_pro \(vision\), row 1 of the data: an embedded "
                                                               "image")):
        with pytest.raises(ValueError, match=message + " is unreadable, corrupt or not one of PNG, JPEG"):
            _samples(name, root)
        assert not ran.exists(), (name, root)
    assert len(_samples("mathvista", tmp_path / "shards", limit=1)) == 1  # the rows before it read as before


@pytest.mark.parametrize("gold, response, correct", [
    # found in review: a one-character answer matched inside any word; MMMU's normalize_str pads it with a blank
    ("c", "The answer is acceleration.", False), ("x", "The final result is the maximum value.", False),
    ("c", "The answer is c.", True), ("C", "So the answer is c because of the graph", True),
    ("iron", "The metal is Iron.", True), ("24", "The sum is 124.", False), ("24", "It is 24.", True),
])
def test_mmmu_open_answers_follow_the_official_normalisation(gold, response, correct):
    target = {"answer": gold, "options": [], "open": True, "subject": "Math"}
    assert get_benchmark("mmmu").evaluate(response, target)["correct"] is correct
