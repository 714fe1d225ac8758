"""`avar vas` / `avar intervene` on a damaged checkpoint, a device name torch does not take, and a second
`avar intervene` run on an --out in use: one line naming the problem and the fix, nothing written."""

import fcntl
import shutil

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
