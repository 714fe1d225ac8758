"""`avar vas` / `avar intervene` on a damaged checkpoint, a device name torch does not take, a second
`avar intervene` run on an --out in use, an --out that is an input, another file or a folder: one line naming the
problem and the fix, nothing written."""

import fcntl
import json
import shutil
from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.training.run_lock import LOCK_FILE


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from megatron_avar.data.procedural import ProceduralConfig, write_dataset
    from megatron_avar.models.qwen2_5_vl.toy import ToyModelConfig, write_toy_checkpoint

    root = tmp_path_factory.mktemp("analysis_inputs")
    checkpoint = write_toy_checkpoint(root / "toy-model", ToyModelConfig(num_layers=2))
    data = write_dataset(ProceduralConfig(num_samples=2, image_size=(112, 84)), root / "data")
    return dict(model=checkpoint, data=str(data))


def _error(capsys, argv) -> str:
    """The one error line of a refused command (exit 2)."""
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def _commands(model, data, out_dir):
    return {"vas": ["vas", "--model", str(model), "--data", data, "--out", str(out_dir / "vas")],
            "intervene": ["intervene", "--model", str(model), "--data", data, "--out", str(out_dir / "i.json"),
                          "--max-new-tokens", "2"]}


@pytest.mark.parametrize("command", ["vas", "intervene"])
def test_a_device_torch_does_not_take_is_named_with_the_choices(toy, tmp_path, capsys, command):
    """Found in review: `--device gpu` gave torch's RuntimeError traceback listing every backend torch knows."""
    argv = _commands(toy["model"], toy["data"], tmp_path)[command]
    assert "--device 'gpu': use one of auto, cpu, cuda or cuda:N" in _error(capsys, [*argv, "--device", "gpu"])
    assert not (tmp_path / "i.json").exists() and not (tmp_path / "vas" / "report.json").exists()


def test_a_cuda_device_this_machine_lacks_is_named(monkeypatch):
    import torch

    from megatron_avar import platform
    from megatron_avar.analysis.model_loading import resolve_device

    monkeypatch.setattr(platform, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("auto") == "cuda"
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("command", ["vas", "intervene"])
def test_a_truncated_weights_file_is_named(toy, tmp_path, capsys, command):
    """Found in review: a model.safetensors cut short gave a safetensors_rust.SafetensorError traceback."""
    model = tmp_path / "model"
    shutil.copytree(toy["model"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    error = _error(capsys, _commands(model, toy["data"], tmp_path)[command])
    assert f"{weights} is not a readable safetensors file" in error and "cut short" in error
    assert not (tmp_path / "i.json").exists() and not (tmp_path / "vas" / "report.json").exists()


@pytest.mark.parametrize("command", ["vas", "intervene"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_damaged_json_file_of_the_model_is_named(toy, tmp_path, capsys, command, name):
    """Found in review: a damaged config.json or tokenizer.json printed only `Expecting value: line 1 column 1
    (char 0)`, naming no file."""
    model = tmp_path / "model"
    shutil.copytree(toy["model"], model)
    (model / name).write_text("" if name == "config.json" else "{")
    error = _error(capsys, _commands(model, toy["data"], tmp_path)[command])
    assert f"--model {model}: {model / name} is not valid JSON" in error and "download it again" in error


def test_two_intervene_runs_on_one_out_are_refused(toy, tmp_path, capsys):
    """Found in review: `avar intervene` took no lock: two runs given one --out both ran and each wrote its results
    over the other's. The second is refused naming the holder; a run writing another file of the folder is not."""
    argv = _commands(toy["model"], toy["data"], tmp_path)["intervene"] + ["--num-samples", "1", "--layers", "0"]
    lock = tmp_path / ".avar-locks" / "i.json" / LOCK_FILE
    lock.parent.mkdir(parents=True)
    with lock.open("a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        error = _error(capsys, argv)
        assert "is in use by" in error and "two `avar intervene` runs writing one --out would replace" in error
        assert not (tmp_path / "i.json").exists()
        other = [*argv[:argv.index("--out") + 1], str(tmp_path / "j.json"), *argv[argv.index("--out") + 2:]]
        assert main(other) == 0 and (tmp_path / "j.json").is_file()
    assert main(argv) == 0 and (tmp_path / "i.json").is_file()  # released


@pytest.fixture
def no_work(monkeypatch):
    """A refusal comes before any work: loading the model fails the test."""
    from megatron_avar.analysis import model_loading

    def load_hf_model(*args, **kwargs):
        raise AssertionError("the model was loaded: the refusal came after the work")

    monkeypatch.setattr(model_loading, "load_hf_model", load_hf_model)


def test_intervene_never_writes_over_its_inputs(toy, tmp_path, capsys, no_work):
    """Found in review: `avar intervene --data D.json --out D.json --overwrite` replaced the dataset by its
    results; an --out in the model folder would replace a model file. Refused before any work, --overwrite or not."""
    model, data_dir = tmp_path / "model", tmp_path / "data_j"
    shutil.copytree(toy["model"], model)
    shutil.copytree(Path(toy["data"]).parent, data_dir)  # the images come along
    data = data_dir / "data.json"
    data.write_text(json.dumps([json.loads(line) for line in (data_dir / "data.jsonl").read_text().splitlines()]))
    (data_dir / "data.jsonl").unlink()
    before = {path: path.read_bytes() for path in (data, model / "config.json")}
    argv = ["intervene", "--model", str(model), "--num-samples", "1", "--max-new-tokens", "2", "--overwrite"]
    for flags, message in (
            (["--data", str(data), "--out", str(data)], f"--out {data} is the --data file"),
            (["--data", str(data), "--out", str(model / "config.json")],
             f"--out {model / 'config.json'} lies in the --model folder {model}"),
            (["--data", str(data_dir), "--out", str(data_dir / "results.json")],
             f"--out {data_dir / 'results.json'} lies in the --data folder {data_dir}, whose .json files are read")):
        assert message in _error(capsys, [*argv, *flags])
    assert {path: path.read_bytes() for path in before} == before
    assert not (data_dir / "results.json").exists()
    assert not (model / ".avar-locks").exists() and not (data_dir / ".avar-locks").exists()


def test_intervene_overwrite_replaces_only_its_own_results(toy, tmp_path, capsys):
    """--overwrite replaces the results of an earlier `avar intervene` (known by their keys, a sweep's table by its
    first line, its figure as a PNG); any other file at --out or beside it is named and kept."""
    out = tmp_path / "results.json"
    argv = ["intervene", "--model", str(toy["model"]), "--data", toy["data"], "--out", str(out), "--num-samples", "1",
            "--max-new-tokens", "2", "--layers", "0", "--overwrite"]
    for path, content, what in (
            (out, (Path(toy["model"]) / "config.json").read_bytes(), "a model's config"),
            (out, b'[{"messages": []}]', "a list of records (a .json dataset)"),
            (out, b"results: 3 of 4", "a file that is not JSON"),
            (out.with_suffix(".md"), b"# my notes on the results", "text that is not a sweep table"),
            (out.with_suffix(".png"), b"GIF89a", "a file that is not a PNG figure")):
        path.write_bytes(content)
        error = _error(capsys, argv)
        assert f"{path} holds {what}, which `avar intervene --out {out}` would replace" in error, error
        assert path.read_bytes() == content
        path.unlink()
    assert main(argv) == 0
    out.write_text(json.dumps(dict(json.loads(out.read_text()), runtime="the earlier run")))
    assert main(argv) == 0  # its own results: replaced
    assert json.loads(out.read_text())["runtime"] != "the earlier run"


def test_vas_overwrite_replaces_only_a_vas_report(toy, tmp_path, capsys, no_work):
    """Found in review: `avar vas --overwrite` (and `vas merge --overwrite`) replaced any report.json at --out (a
    user's own, another tool's). Refused before any work, --overwrite or not; the file is kept."""
    out = tmp_path / "out"
    out.mkdir()
    for content in (b'{"accuracy": 0.61, "model": "mine"}', b"not json", b"\xff\xfe"):
        (out / "report.json").write_bytes(content)
        for argv in (["vas", "--model", str(toy["model"]), "--data", toy["data"], "--out", str(out), "--overwrite"],
                     ["vas", "merge", str(tmp_path / "shard"), "--out", str(out), "--overwrite"]):
            error = _error(capsys, argv)
            assert f"{out / 'report.json'} is not a VAS report, and `avar vas` replaces only its own" in error, error
            assert (out / "report.json").read_bytes() == content


def test_a_folder_where_an_output_file_goes_is_refused_before_any_work(toy, tmp_path, capsys, no_work):
    """Found in review: `avar intervene --out dir.json` with dir.json a folder said it held an earlier run's results,
    and with --overwrite ran all the generation, then died with an IsADirectoryError traceback; so did `avar vas`
    with a folder at report.json (or a figure) and `avar vas compare` with one at compare.md. A folder is never
    replaced: refused before any work, naming it."""
    report = tmp_path / "r" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps(dict(vas=1.0, vas_per_layer=[1.0], ratio_of_means=1.0, image_share=0.5,
                                      num_samples=1)))
    run = ["--model", str(toy["model"]), "--data", toy["data"], "--num-samples", "1"]
    for folder, argv in (
            (tmp_path / "dir.json", ["intervene", *run, "--out", str(tmp_path / "dir.json"), "--max-new-tokens", "2"]),
            (tmp_path / "v9" / "report.json", ["vas", *run, "--out", str(tmp_path / "v9")]),
            (tmp_path / "v8" / "vas_per_layer.png", ["vas", *run, "--out", str(tmp_path / "v8")]),
            (tmp_path / "c9" / "compare.md", ["vas", "compare", str(report), "--out", str(tmp_path / "c9")]),
            (tmp_path / "m9" / "image_share_heatmap.png",
             ["vas", "merge", str(report), "--out", str(tmp_path / "m9")])):
        folder.mkdir(parents=True)
        for overwrite in ([], ["--overwrite"]):
            error = _error(capsys, [*argv, *overwrite])
            assert f"{folder} is a folder, where this run writes a file; move the folder away or choose another " \
                   "--out" in error, error
        assert folder.is_dir() and not any(folder.iterdir())
