"""`avar convert`: HF safetensors -> megatron torch_dist checkpoint written by TP=2 x PP=2 ranks -> HF again,
loaded at TP=1/PP=1 (megatron reshards on load): every tensor comes back bit for bit, side files are copied,
and bad input is refused with the tensor or folder named; `verify` compares logits with HF."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "models"))
from qwen_vl_cases import tiny_hf_model  # noqa: E402

from megatron_avar.cli import main  # noqa: E402


def _hf_tensors(folder):
    from safetensors.torch import load_file

    from megatron_avar.models.qwen2_5_vl.hf_mapping import canonical_hf_name

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update({canonical_hf_name(k): v for k, v in load_file(path).items()})
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert") / "hf"
    tiny_hf_model(num_text_layers=4).save_pretrained(folder, max_shard_size="200KB")  # several shards
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


@pytest.mark.multiprocess
def test_hf_to_mcore_tp2_pp2_and_back_is_bit_exact(hf_dir, tmp_path):
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(mcore), "--tp", "2",
                 "--pp", "2"]) == 0
    info = json.loads((mcore / "avar_checkpoint.json").read_text())
    assert info["format"] == "torch_dist" and (mcore / "metadata.json").is_file()
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(mcore), "--out", str(back),
                 "--max-shard-size-mb", "0.2"]) == 0
    assert (back / "model.safetensors.index.json").is_file()
    original, converted = _hf_tensors(hf_dir), _hf_tensors(back)
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    for side in ("config.json", "generation_config.json", "chat_template.jinja"):
        assert (back / side).read_bytes() == (hf_dir / side).read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left behind
    # verify: the checkpoint written at TP=2 x PP=2, loaded at TP=2 and at PP=2 (megatron's pipeline schedule),
    # gives HF's logits (fp32: ~2e-6 observed)
    assert main(["convert", "verify", "--hf-path", str(hf_dir), "--mcore-path", str(mcore), "--tp", "2",
                 "--max-abs-diff", "1e-4"]) == 0
    assert main(["convert", "verify", "--hf-path", str(hf_dir), "--mcore-path", str(mcore), "--pp", "2",
                 "--max-abs-diff", "1e-4"]) == 0


def test_existing_output_is_not_clobbered(hf_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x"


def test_unknown_tensor_is_refused_by_name(hf_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    save_file({"model.visual.extra.weight": torch.zeros(2)}, str(bad / "extra.safetensors"))
    index["weight_map"]["model.visual.extra.weight"] = "extra.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["convert", "hf-to-mcore", "--hf-path", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "model.visual.extra.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
