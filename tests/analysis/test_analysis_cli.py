"""`avar vas`, `avar vas compare` and `avar intervene` end to end on the toy checkpoint (real tokenizer, tiny
random weights) and a procedural dataset; bad input gives clear errors."""

import csv
import json
import math
import shutil
from pathlib import Path

import mpmath
import pytest
import torch

from analysis_cases import direct_vas
from megatron_avar.cli import main

NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    root = tmp_path_factory.mktemp("analysis_cli")
    checkpoint = write_toy_checkpoint(root / "toy-model", ToyModelConfig(num_layers=2))
    data = write_dataset(ProceduralConfig(num_samples=NUM_SAMPLES, image_size=(112, 84)), root / "data")
    return dict(root=root, model=str(checkpoint), data=str(data))


@pytest.fixture(scope="module")
def vas_run(toy):
    out = toy["root"] / "vas"
    # batch size 3 over 4 samples: a left-padded batch and a partial one
    code = main(["vas", "--model", toy["model"], "--data", toy["data"], "--out", str(out), "--batch-size", "3",
                 "--name", "base"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_vas_report_and_figures(toy, vas_run):
    out, report = vas_run
    for key in ("vas", "vas_per_layer", "ratio_of_means", "image_share", "num_samples", "vas_per_head", "variants",
                "config", "checkpoint"):
        assert key in report
    assert report["num_samples"] == NUM_SAMPLES and report["layers"] == [0, 1]
    assert len(report["vas_per_head"]) == 2 and len(report["vas_per_head"][0]) == 4
    assert report["checkpoint"]["config_sha256"] and report["checkpoint"]["weights_sha256"]
    assert report["vas"] == report["variants"]["sink_included"]["vas"] != report["variants"]["sink_excluded"]["vas"]
    for name in ("vas_per_layer.png", "image_share_heatmap.png", "ratio_distribution.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_vas_equals_unbatched_eager_probabilities(toy, vas_run):
    """Batched, padded role-attention VAS == per-sample VAS from HF eager probabilities and rendered roles."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_avar.analysis.batching import collate_prompts, prompt_samples
    from megatron_avar.processor import load_processor

    _, report = vas_run
    processor = load_processor(toy["model"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(toy["model"], attn_implementation="eager").eval()
    per_sample = {variant: [] for variant in ("sink_included", "sink_excluded")}
    for sample in prompt_samples(toy["data"], processor):
        batch = collate_prompts([sample], pad_token_id=0, image_token_id=processor.image_token_id)
        with torch.no_grad():
            probs = [a.double() for a in model(**batch.inputs, output_attentions=True).attentions]
        for variant, exclude in (("sink_included", False), ("sink_excluded", True)):
            per_sample[variant].append(float(direct_vas(probs, batch.roles, [0, 1], exclude)[0]["ratio"].mean()))
    for variant, values in per_sample.items():
        assert report["variants"][variant]["per_sample_vas"] == pytest.approx(values, rel=2e-5)
        assert report["variants"][variant]["vas"] == pytest.approx(sum(values) / len(values), rel=2e-5)


@pytest.fixture(scope="module")
def layer1_run(toy):
    """A second report: layer 1 only, without the sink."""
    out = toy["root"] / "vas-layer1"
    assert main(["vas", "--model", toy["model"], "--data", toy["data"], "--out", str(out), "--layers", "1",
                 "--exclude-sink", "--name", "layer1"]) == 0
    return out


def test_vas_exclude_sink_and_layer_subset(vas_run, layer1_run):
    _, full = vas_run
    report = json.loads((layer1_run / "report.json").read_text())
    assert report["exclude_sink"] and report["layers"] == [1]
    # other batch sizes pad differently: fp32 noise only
    assert report["vas"] == pytest.approx(full["variants"]["sink_excluded"]["vas_per_layer"][1], rel=1e-6)


def test_vas_shards_merge(toy, vas_run, capsys):
    _, full = vas_run
    shards = []
    for index in (0, 1):
        shards.append(str(toy["root"] / f"shard{index}"))
        assert main(["vas", "--model", toy["model"], "--data", toy["data"], "--out", shards[-1], "--shard",
                     f"{index}/2",
                     "--batch-size", "3"]) == 0
    assert main(["vas", "merge", *shards, "--out", str(toy["root"] / "merged")]) == 0
    merged = json.loads((toy["root"] / "merged" / "report.json").read_text())
    assert merged["num_samples"] == NUM_SAMPLES and merged["config"]["merged_from"] == shards
    assert merged["vas"] == pytest.approx(full["vas"], rel=1e-6)  # other batches pad differently: fp32 noise only
    assert sorted(s["id"] for s in merged["samples"]) == sorted(s["id"] for s in full["samples"])
    capsys.readouterr()
    assert main(["vas", "merge", shards[0], shards[0], "--out", str(toy["root"] / "bad")]) == 2
    assert "['0/2', '0/2']: a merge needs each of 0/N .. N-1/N exactly once" in capsys.readouterr().err
    # only the shards of one run, all of them: another checkpoint or setting, a missing shard, a whole-run report
    edited = toy["root"] / "shard1-edited"
    for change, message in ((lambda r: r["checkpoint"].update(weights_sha256="0" * 64), "another checkpoint"),
                            (lambda r: r["config"].update(num_samples=3), "was run with other num_samples")):
        report = json.loads((Path(shards[1]) / "report.json").read_text())
        change(report)
        edited.mkdir(exist_ok=True)
        (edited / "report.json").write_text(json.dumps(report))
        assert main(["vas", "merge", shards[0], str(edited), "--out", str(toy["root"] / "bad")]) == 2
        assert message in capsys.readouterr().err
    # found in review: the same data given as a relative path in one shard's job refused the merge; so did the same
    # weights staged at another path (node-local disk): weights are compared by content
    report = json.loads((Path(shards[1]) / "report.json").read_text())
    assert report["config"]["data_resolved"] == str(Path(toy["data"]).resolve())
    report["config"].update(data=str(Path(toy["data"]).relative_to(toy["root"])), layers="0-1")
    report["checkpoint"].update(path="/local/scratch/model", shards=[{**shard, "stat": None}
                                                                     for shard in report["checkpoint"]["shards"]])
    (edited / "report.json").write_text(json.dumps(report))
    assert main(["vas", "merge", shards[0], str(edited), "--out", str(toy["root"] / "merged-edited")]) == 0
    assert main(["vas", "merge", shards[0], "--out", str(toy["root"] / "bad")]) == 2
    assert "a merge needs each of 0/N .. N-1/N exactly once" in capsys.readouterr().err
    assert main(["vas", "merge", shards[0], str(vas_run[0]), "--out", str(toy["root"] / "bad")]) == 2
    assert "is not a shard" in capsys.readouterr().err
    assert not (toy["root"] / "bad").exists()
    # found in review: a merge into one of its inputs' folders replaced that shard's report
    shard_report = (Path(shards[0]) / "report.json").read_bytes()
    assert main(["vas", "merge", *shards, "--out", shards[0], "--overwrite"]) == 2
    assert f"--out {shards[0]} holds {shards[0]}, one of the reports being merged" in capsys.readouterr().err
    assert (Path(shards[0]) / "report.json").read_bytes() == shard_report


def test_a_shard_without_vas_queries_still_merges(toy, tmp_path, capsys):
    """A shard of text-only records has no VAS query: it writes its state anyway, for the merge."""
    first = json.loads(Path(toy["data"]).read_text().splitlines()[0])
    text_only = {"id": "text-only", "messages": [{"role": "user", "content": "1 + 1?"},
                                                 {"role": "assistant", "content": "2"}], "answer": "2"}
    for image in first["messages"][0]["content"]:
        if image["type"] == "image":
            image["image"] = str(Path(toy["data"]).parent / image["image"])
    data = tmp_path / "mixed.jsonl"
    data.write_text(json.dumps(first) + "\n" + json.dumps(text_only) + "\n")
    shards = [str(tmp_path / f"shard{index}") for index in (0, 1)]
    for index, shard in enumerate(shards):
        assert main(["vas", "--model", toy["model"], "--data", str(data), "--out", shard, "--shard", f"{index}/2"]) == 0
    assert json.loads((Path(shards[1]) / "report.json").read_text())["num_samples"] == 0
    assert main(["vas", "merge", *shards, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert merged["num_samples"] == 1 and merged["skipped_sample_ids"] == ["text-only"]
    capsys.readouterr()
    assert main(["vas", "compare", shards[1]]) == 2
    assert "a shard without VAS samples" in capsys.readouterr().err


def test_a_second_run_never_replaces_results_unasked(toy, vas_run, capsys, tmp_path):
    """`avar vas`, `avar vas merge` and `avar intervene` refuse an --out holding an earlier run's results before
    any work (the files stay byte-identical) and name the fix; --overwrite replaces them."""
    out, _ = vas_run
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    assert main(["vas", "--model", toy["model"], "--data", toy["data"], "--out", str(out), "--layers", "1"]) == 2
    assert f"{out / 'report.json'} holds a VAS report from an earlier run; pass --overwrite" in capsys.readouterr().err
    assert main(["vas", "merge", str(out), "--out", str(out)]) == 2
    assert "one of the reports being merged: the merge would replace it" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    replaced = tmp_path / "vas"
    shutil.copytree(out, replaced)
    assert main(["vas", "--model", toy["model"], "--data", toy["data"], "--out", str(replaced), "--layers", "1",
                 "--num-samples", "2", "--overwrite"]) == 0
    assert json.loads((replaced / "report.json").read_text())["layers"] == [1]

    # Two runs (shards given one --out) at once: before, both wrote report.json and both said so; one was lost.
    import fcntl

    from megatron_avar.training.run_lock import LOCK_FILE

    busy = tmp_path / "busy"
    busy.mkdir()
    with (busy / LOCK_FILE).open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["vas", "--model", toy["model"], "--data", toy["data"], "--out", str(busy), "--shard", "1/2"]) == 2
    assert "two `avar vas` runs writing one --out would replace each other's report" in capsys.readouterr().err
    assert not (busy / "report.json").exists()

    sweep = tmp_path / "sweep.json"
    sweep.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\nan earlier plot")
    argv = ["intervene", "--model", toy["model"], "--data", toy["data"], "--out", str(sweep), "--sweep",
            "--sweep-alpha-sys", "0", "--sweep-layers", "0", "--max-new-tokens", "2", "--num-samples", "1"]
    assert main(argv) == 2
    assert f"{sweep.with_suffix('.png')} holds intervention results" in capsys.readouterr().err
    assert not sweep.exists() and sweep.with_suffix(".png").read_bytes() == b"\x89PNG\r\n\x1a\nan earlier plot"
    assert main([*argv, "--overwrite"]) == 0
    assert sweep.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_vas_overwrite_never_leaves_a_report_beside_another_runs_figures(vas_run, tmp_path, monkeypatch):
    """Found in review: `avar vas --overwrite` killed after report.json was written left the new report beside the
    earlier run's figures. The figures are drawn into temporary files first, the report is written last."""
    from megatron_avar import atomic_files
    from megatron_avar.analysis import figures
    from megatron_avar.analysis.run_vas import write_vas_report
    from megatron_avar.analysis.vas import VASAccumulator

    figure_names = ("vas_per_layer.png", "image_share_heatmap.png", "ratio_distribution.png")
    out, report = vas_run
    folder = tmp_path / "vas"
    shutil.copytree(out, folder)
    earlier = {path.name: path.read_bytes() for path in folder.iterdir()}

    def write():  # the statistics of vas_run under another name: a report of the same run that tells itself apart
        return write_vas_report(VASAccumulator.merge([report["accumulator_state"]]), folder, exclude_sink=True,
                                name="new", config=report["config"], checkpoint=report["checkpoint"],
                                runtime=report["runtime"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # killed while the last figure is drawn: the earlier run stays whole
        patch.setattr(figures, "plot_ratio_distribution", killed)
        with pytest.raises(KeyboardInterrupt):
            write()
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == earlier
    for name in figure_names:  # marked, to tell the earlier figures from new ones of the same statistics
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\nan earlier figure")
    with monkeypatch.context() as patch:  # killed after the figures, before the report: no report beside them
        patch.setattr(atomic_files, "write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            write()
    assert not (folder / "report.json").exists()
    assert all((folder / name).read_bytes()[:4] == b"\x89PNG" and b"earlier" not in (folder / name).read_bytes()
               for name in figure_names)
    write()
    assert json.loads((folder / "report.json").read_text())["name"] == "new"
    assert sorted(path.name for path in folder.iterdir()) == sorted(earlier)  # no temporary file left


def test_vas_compare_and_merge_refuse_the_flags_of_a_vas_run(vas_run, tmp_path, capsys):
    """Found in review: `avar vas --exclude-sink --layers 0 --num-samples 3 --name foo compare A B` printed the
    sink-included numbers (exit 0), its flags ignored; `avar vas --overwrite compare A --out C` said to pass
    --overwrite. A flag of the VAS run before `compare` / `merge` is refused by name; --overwrite works there."""
    out, report = vas_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps(dict(report, name="other")))
    capsys.readouterr()
    assert main(["vas", "--exclude-sink", "--layers", "0", "--num-samples", "3", "--name", "foo", "compare", str(out),
                 str(other), "--out", str(tmp_path / "c1")]) == 2
    error = capsys.readouterr().err
    assert "`avar vas compare` does not use --num-samples, --layers, --exclude-sink, --name" in error, error
    assert error.count("\n") == 1 and not (tmp_path / "c1").exists()
    assert main(["vas", "--batch-size", "2", "merge", str(out), "--out", str(tmp_path / "m")]) == 2
    assert "`avar vas merge` does not use --batch-size (options of `avar vas` itself" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["vas", "compare", str(out), "--out", str(tmp_path / "c2")]) == 0
    assert main(["vas", "--overwrite", "compare", str(out), str(other), "--out", str(tmp_path / "c2")]) == 0
    assert "| other |" in (tmp_path / "c2" / "compare.md").read_text()


def test_vas_compare_with_accuracies(vas_run, layer1_run, capsys, tmp_path):
    out, layer1 = vas_run[0], layer1_run
    third = tmp_path / "third"
    third.mkdir()
    report = json.loads((out / "report.json").read_text())
    report.update(name="text-sft", vas=report["vas"] * 1.5)
    (third / "report.json").write_text(json.dumps(report))
    accuracies = {"base": 0.40, "layer1": 0.35, "text-sft": 0.55}
    vas_values = [json.loads((p / "report.json").read_text())["vas"] for p in (out, layer1, third)]
    json_file = tmp_path / "acc.json"
    json_file.write_text(json.dumps(accuracies))
    csv_file = tmp_path / "acc.csv"
    with open(csv_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "accuracy"])
        writer.writerows(accuracies.items())
    expected_r = float(torch.corrcoef(torch.tensor([vas_values, list(accuracies.values())], dtype=torch.float64))[0, 1])
    # n = 3: one degree of freedom, Student's t is the Cauchy distribution; two-sided tail by quadrature.
    t = expected_r * math.sqrt(1 / (1 - expected_r**2))
    expected_p = float(2 * mpmath.quad(lambda x: 1 / (mpmath.pi * (1 + x * x)), [abs(t), mpmath.inf]))
    for accuracy_file in (json_file, csv_file):
        capsys.readouterr()
        compare_out = tmp_path / f"cmp-{accuracy_file.suffix[1:]}"
        assert main(["vas", "compare", str(out), str(layer1), str(third), "--accuracy", str(accuracy_file),
                     "--out", str(compare_out)]) == 0
        printed = capsys.readouterr().out
        assert "| base |" in printed and "+50.0%" in printed and "Pearson r" in printed
        # layer1 averages one layer, the others all: said, as a mix of --exclude-sink is
        assert "warning: the reports were computed with different --layers" in printed
        assert "different --data" not in printed
        written = json.loads((compare_out / "compare.json").read_text())
        assert written["pearson"]["r"] == pytest.approx(expected_r, rel=1e-9)
        assert written["pearson"]["p_value"] == pytest.approx(expected_p, rel=1e-6)
        assert (compare_out / "compare.md").read_text().startswith("| name |")
        assert (compare_out / "vas_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # found in review: accuracies all equal (0 for early or toy models) stopped the comparison with no table
    same = tmp_path / "same.json"
    same.write_text(json.dumps(dict.fromkeys(accuracies, 0.0)))
    assert main(["vas", "compare", str(out), str(layer1), str(third), "--accuracy", str(same), "--out",
                 str(tmp_path / "cmp-same")]) == 0
    assert "Pearson r (VAS vs accuracy): undefined, the accuracy is the same (0) for every report, n = 3" in \
        capsys.readouterr().out
    written = json.loads((tmp_path / "cmp-same" / "compare.json").read_text())
    assert written["pearson"] == {"r": None, "p_value": None, "n": 3,
                                  "undefined": "the accuracy is the same for every report"}
    assert len(written["rows"]) == 3 and not (tmp_path / "cmp-same" / "vas_vs_accuracy.png").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": 0.4}))
    assert main(["vas", "compare", str(out), str(layer1), "--accuracy", str(bad)]) == 2
    assert "no accuracy for report 'layer1'" in capsys.readouterr().err
    bad.write_text('{"base": 0.4, "layer1": NaN, "text-sft": 0.5}')  # a NaN gave r = 1.0000, p = 0
    assert main(["vas", "compare", str(out), str(layer1), str(third), "--accuracy", str(bad)]) == 2
    assert "accuracy of 'layer1' is nan, not a finite number" in capsys.readouterr().err
    # found in review: a report given twice was two rows (two points of r); a key naming no report and a file
    # mixing fractions with percentages were used as they were
    assert main(["vas", "compare", str(out), str(out / "report.json")]) == 2
    assert "are the same report: give each report once" in capsys.readouterr().err
    for content, message in (('{"base": 0.4, "layer1": 35, "text-sft": 0.5}', "mix fractions and percentages"),
                             ('{"base": 0.4, "layer1": 0.3, "text-sft": 0.5, "txet-sft": 0.5}',
                              "['txet-sft'] name no report given here")):
        bad.write_text(content)
        assert main(["vas", "compare", str(out), str(layer1), str(third), "--accuracy", str(bad)]) == 2
        assert message in capsys.readouterr().err
    # an earlier comparison is replaced only with --overwrite, and its plot does not outlive it
    compare_out = tmp_path / "cmp-json"
    assert main(["vas", "compare", str(out), "--out", str(compare_out)]) == 2
    assert "holds a VAS comparison from an earlier run; pass --overwrite" in capsys.readouterr().err
    assert main(["vas", "compare", str(out), "--out", str(compare_out), "--overwrite"]) == 0
    assert not (compare_out / "vas_vs_accuracy.png").exists()
    bad.write_text("5")
    assert main(["vas", "compare", str(bad)]) == 2
    assert "not a VAS report (a JSON int, not an object)" in capsys.readouterr().err


def test_vas_compare_warns_only_about_settings_that_differ(toy, vas_run, capsys, tmp_path, monkeypatch):
    """Found in review: the raw --data and --layers strings were compared, so the same file given as a relative
    and an absolute path, or --layers all and 0-1 on a 2-layer model, warned. Reports without data_resolved
    (older ones) have their data resolved against the current directory."""
    out, report = vas_run
    monkeypatch.chdir(toy["root"])
    relative = str(Path(toy["data"]).relative_to(toy["root"]))

    def compared(**config) -> str:
        folder = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(dict(report, name=folder.name,
                                                            config=dict(report["config"], **config))))
        capsys.readouterr()
        assert main(["vas", "compare", str(out), str(folder)]) == 0
        return capsys.readouterr().out

    assert report["config"]["layers"] == "all" and report["config"]["layers_resolved"] == [0, 1]
    assert "warning" not in compared(data=relative, data_resolved=str(Path(toy["data"]).resolve()), layers="0-1")
    old_report = {key: value for key, value in report["config"].items() if key != "data_resolved"}
    assert "warning" not in compared(**dict(old_report, data=relative))
    assert "different --data" in compared(data="other.jsonl", data_resolved=str(tmp_path / "other.jsonl"))
    assert "different --layers" in compared(layers="1", layers_resolved=[1])
    # the samples measured count, not --num-samples: 500 of a dataset with fewer records measure the same ones
    assert "warning" not in compared(num_samples=500)
    report = dict(report, samples=report["samples"][:-1])
    assert "warning: the reports measured different samples" in compared()


def test_intervene_and_sweep(toy, tmp_path):
    out = tmp_path / "intervene.json"
    assert main(["intervene", "--model", toy["model"], "--data", toy["data"], "--out", str(out), "--alpha-sys", "0.4",
                 "--layers", "all", "--max-new-tokens", "4", "--num-samples", "2", "--mode", "additive"]) == 0
    written = json.loads(out.read_text())
    assert written["intervention"]["mode"] == "additive" and written["intervention"]["layers"] == [0, 1]
    assert written["num_graded"] == 2 and 0 <= written["accuracy"] <= 1
    assert all({"generated", "extracted", "correct", "answer"} <= set(s) for s in written["samples"])

    sweep = tmp_path / "sweep.json"
    assert main(["intervene", "--model", toy["model"], "--data", toy["data"], "--out", str(sweep), "--sweep",
                 "--sweep-alpha-sys", "0,0.6", "--sweep-layers", "0;all", "--max-new-tokens", "3",
                 "--num-samples", "2", "--batch-size", "2"]) == 0
    table = json.loads(sweep.read_text())
    assert [(r["layers"], r["alpha_sys"]) for r in table["rows"]] == [("0", 0.0), ("0", 0.6), ("all", 0.0),
                                                                      ("all", 0.6)]
    assert table["baseline"]["num_graded"] == 2
    assert "| layers |" in sweep.with_suffix(".md").read_text()
    assert sweep.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # A single run over the sweep's --out: refused unasked (its table and figure too); with --overwrite they go,
    # not left to describe other results than the .json's.
    single = ["intervene", "--model", toy["model"], "--data", toy["data"], "--out", str(sweep), "--alpha-sys", "0",
              "--max-new-tokens", "2", "--num-samples", "1"]
    assert main(single) == 2
    assert main([*single, "--overwrite"]) == 0
    assert "intervention" in json.loads(sweep.read_text())
    assert not sweep.with_suffix(".md").exists() and not sweep.with_suffix(".png").exists()


def test_intervene_decodes_greedily_whatever_the_checkpoint_ships(toy, tmp_path):
    """Qwen2.5-VL-Instruct's generation_config.json holds sampling fields and a repetition penalty; the baseline
    `avar intervene` reports is plain greedy decoding, as `avar eval`'s."""
    shipped = tmp_path / "shipped"
    shutil.copytree(toy["model"], shipped)
    generation = json.loads((shipped / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=3.0)
    (shipped / "generation_config.json").write_text(json.dumps(generation))
    generated = []
    for model in (toy["model"], str(shipped)):
        out = tmp_path / f"{len(generated)}.json"
        assert main(["intervene", "--model", model, "--data", toy["data"], "--out", str(out), "--alpha-sys", "0",
                     "--max-new-tokens", "6", "--num-samples", "2"]) == 0
        generated.append([s["generated"] for s in json.loads(out.read_text())["samples"]])
    assert generated[0] == generated[1]


def test_bad_input_gives_clear_errors(toy, tmp_path, capsys):
    def error_of(argv):
        capsys.readouterr()
        assert main(argv) == 2
        return capsys.readouterr().err

    missing_image = tmp_path / "missing.jsonl"
    missing_image.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "nowhere.png"}, {"type": "text", "text": "How many?"}]}], "answer": "3"}) + "\n")
    base = ["vas", "--model", toy["model"], "--out", str(tmp_path / "o")]
    assert "image file not found" in error_of(base + ["--data", str(missing_image)])
    assert "cannot read '8-x'" in error_of(base + ["--data", toy["data"], "--layers", "8-x"])
    assert "layer 8 is out of range; this model has 2 decoder layers (0-1)" in error_of(
        ["intervene", "--model", toy["model"], "--data", toy["data"], "--out", str(tmp_path / "i.json"), "--layers",
         "8-13"])
    megatron = tmp_path / "megatron-ckpt"
    megatron.mkdir()
    (megatron / "avar_checkpoint.json").write_text("{}")
    assert "unsupported checkpoint description" in error_of(
        ["vas", "--model", str(megatron), "--data", toy["data"], "--out", str(tmp_path / "o")])
    export = f"{megatron} is a megatron checkpoint: export it (avar convert mcore-to-hf --mcore-path {megatron}"
    assert export in error_of(["intervene", "--model", str(megatron), "--data", toy["data"], "--out",
                               str(tmp_path / "i.json")])
    assert "missing --data" in error_of(["vas", "--model", toy["model"], "--out", str(tmp_path / "o")])
    assert "alpha_sys" in error_of(["intervene", "--model", toy["model"], "--data", toy["data"],
                                    "--out", str(tmp_path / "i.json"), "--alpha-sys", "1.5"])


def test_a_device_map_without_accelerate_is_one_line_naming_the_fix(toy, tmp_path, capsys, monkeypatch):
    """Found in review: --device-map auto without accelerate (in no extra then) failed inside transformers."""
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_accelerate_available", lambda *args, **kwargs: False)
    for command, out in (("vas", tmp_path / "o"), ("intervene", tmp_path / "i.json")):
        assert main([command, "--model", toy["model"], "--data", toy["data"], "--out", str(out), "--device-map",
                     "auto"]) == 2
        error = capsys.readouterr().err
        assert error == (f"avar {command}: error: --device-map auto needs accelerate>="
                         f"{import_utils.ACCELERATE_MIN_VERSION}, which is not installed: "
                         "pip install accelerate (the gpu extra has it), or leave --device-map out to load the model "
                         "on one device\n")
        assert not out.exists()


def test_intervene_config_file_overrides_and_flags(capsys):
    """defaults < examples/vas/intervene_sweep.yaml < KEY=VALUE < flags."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "vas" / "intervene_sweep.yaml"
    capsys.readouterr()
    assert main(["intervene", "--config", str(example), "--model", "m", "--data", "d", "--out", "o.json",
                 "max_new_tokens=64", "alpha_img=0.3", "--alpha-img", "0.2", "--sweep-layers", "0-1;all", "--keep-sink",
                 "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["sweep"] is True and config["sweep_alpha_sys"] == [0.0, 0.05, 0.4, 0.6]   # from the file
    assert config["max_new_tokens"] == 64 and config["alpha_img"] == 0.2                    # override, then flag
    assert config["sweep_layers"] == ["0-1",
                                      "all"] and config["edit_sink"] is False and config["mode"] == "multiplicative"
    assert main(["intervene", "--model", "m", "--data", "d", "--out", "o.json", "alpha_sis=0.3"]) == 2
    assert "unknown config key(s) alpha_sis" in capsys.readouterr().err
    # found in review: an empty set ("middle;;all") was dropped without a word
    assert main(["intervene", "--model", "m", "--data", "d", "--out", "o.json", "--sweep-layers", "0;;all"]) == 2
    assert "--sweep-layers '0;;all' has an empty layer set" in capsys.readouterr().err


SWEEP_EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "vas" / "intervene_sweep.yaml")


@pytest.mark.parametrize(("flags", "message"), [
    (["--sweep", "--alpha-sys", "0.4", "--layers", "all"],
     "alpha_sys (override alpha_sys=0.4) and layers (override layers=\"all\") set one intervention, but this run is "
     "a sweep (sweep: true, override sweep=true)"),
    (["--sweep", "alpha_sys=0.4"], "alpha_sys (override alpha_sys=0.4) set one intervention"),
    (["--config", SWEEP_EXAMPLE, "--layers", "all"], "but this run is a sweep (sweep: true, " + SWEEP_EXAMPLE + ":5)"),
    (["--sweep-alpha-sys", "0,0.4"], "sweep_alpha_sys (override sweep_alpha_sys=[0.0, 0.4]) set a sweep's grid, but "
                                     "this run is a single intervention"),
    (["sweep_layers=[all]"], "sweep_layers (override sweep_layers=[all]) set a sweep's grid"),
], ids=["single-flags-in-a-sweep", "override-in-a-sweep", "flag-over-a-sweep-file", "grid-flag-alone",
        "grid-override-alone"])
def test_intervene_refuses_settings_its_run_would_ignore(capsys, flags, message):
    """A sweep runs sweep_alpha_sys x sweep_layers and a single run alpha_sys at layers: a setting of the other
    kind, from a flag, a KEY=VALUE or the config file, used to be dropped without a word."""
    capsys.readouterr()
    assert main(["intervene", "--model", "m", "--data", "d", "--out", "o.json", *flags, "--print-config"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error


def test_megatron_checkpoint_gives_the_hf_vas(toy, vas_run):
    """The same weights converted to a megatron checkpoint: VAS from the megatron model's AVAR layers
    (RoleMassCoreAttention) equals VAS from the HF model's hooked attention (fp32; other batching, too), with the
    attention sink in K_sys and without it (--exclude-sink: the top-level numbers are the latter)."""
    _, hf_report = vas_run
    mcore = toy["root"] / "mcore"
    assert main(["convert", "hf-to-mcore", "--hf-path", toy["model"], "--out", str(mcore)]) == 0
    out = toy["root"] / "vas-mcore"
    assert main(["vas", "--model", str(mcore), "--data", toy["data"], "--out", str(out), "--batch-size", "2",
                 "--exclude-sink"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["backend"] == "megatron" and report["num_samples"] == hf_report["num_samples"]
    assert report["exclude_sink"] is True
    for variant in ("sink_included", "sink_excluded"):
        got, want = report["variants"][variant], hf_report["variants"][variant]
        for key in ("vas", "ratio_of_means", "system_share", "vas_per_layer"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (variant, key)
    assert report["image_share"] == pytest.approx(hf_report["image_share"], rel=1e-5)
    assert report["vas"] == pytest.approx(hf_report["variants"]["sink_excluded"]["vas"], rel=1e-5)
