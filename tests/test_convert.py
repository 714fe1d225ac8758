"""`avar convert`: HF safetensors -> megatron torch_dist checkpoint written by TP=2 x PP=2 ranks -> HF again,
loaded at TP=1/PP=1 (megatron reshards on load): every tensor comes back bit for bit under its own name, side
files are copied, and bad input is refused with the tensor or folder named; `verify` compares logits with HF.

Export layout: by default the published names (every Qwen2.5-VL checkpoint on the Hub, and what save_pretrained
writes, also in transformers 5), so HF -> megatron -> HF of a Hub checkpoint gives back the same key set;
``--hf-layout transformers5`` gives back a checkpoint in transformers-5 module names the same way."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "models"))
from megatron_avar.cli import main  # noqa: E402
from megatron_avar.models.hf_weights import INDEX_NAME  # noqa: E402
from megatron_avar.models.qwen2_5_vl.hf_mapping import hf_name_in_layout  # noqa: E402
from qwen_vl_cases import case_batch, hf_logits, tiny_hf_model  # noqa: E402

_WEIGHT_FILES = ("*.safetensors", INDEX_NAME)


def _hf_tensors(folder):
    """Every tensor of an HF folder under the name it is stored with."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _assert_same_tensors(converted, original):
    """Same names, dtypes and bits."""
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name


def _side_files(folder):
    weights = {p for pattern in _WEIGHT_FILES for p in Path(folder).glob(pattern)}
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and p not in weights}


def _assert_loads_like(export, source):
    """from_pretrained of the export reports no missing, unexpected or mismatched keys and gives the source's
    logits exactly (the weights are the same bits in the same dtype)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    exported, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(source)
    assert exported.dtype == reference.dtype
    inputs = case_batch("several_images")
    inputs["pixel_values"] = inputs["pixel_values"].to(reference.dtype)
    assert torch.equal(hf_logits(exported.eval(), inputs), hf_logits(reference.eval(), inputs))


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
    original = _hf_tensors(hf_dir)
    assert all(hf_name_in_layout(name, "published") == name for name in original)  # what save_pretrained writes
    _assert_same_tensors(_hf_tensors(back), original)
    assert sorted(json.loads((back / INDEX_NAME).read_text())["weight_map"]) == sorted(original)
    assert _side_files(back) == _side_files(hf_dir)
    assert {"config.json", "generation_config.json", "chat_template.jinja"} <= set(_side_files(back))
    _assert_loads_like(back, hf_dir)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folders left behind
    # verify: the checkpoint written at TP=2 x PP=2, loaded at TP=2 and at PP=2 (megatron's pipeline schedule),
    # gives HF's logits (fp32: ~2e-6 observed)
    assert main(["convert", "verify", "--hf-path", str(hf_dir), "--mcore-path", str(mcore), "--tp", "2",
                 "--max-abs-diff", "1e-4"]) == 0
    assert main(["convert", "verify", "--hf-path", str(hf_dir), "--mcore-path", str(mcore), "--pp", "2",
                 "--max-abs-diff", "1e-4"]) == 0
    # The export's config names the dtype its weights are written in, not the one of the model the checkpoint
    # came from (found in review: an fp32-trained export of a bf16 model said bfloat16, and from_pretrained and
    # vLLM's dtype=auto loaded it in bf16, rounding the training away).
    side_config = mcore / "hf" / "config.json"
    side_config.write_text(json.dumps(dict(json.loads(side_config.read_text()), dtype="bfloat16")))
    again = tmp_path / "again"
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(mcore), "--out", str(again)]) == 0
    assert json.loads((again / "config.json").read_text())["dtype"] == "float32"
    _assert_loads_like(again, hf_dir)


@pytest.mark.multiprocess
def test_a_checkpoint_and_a_model_that_do_not_match_are_named(hf_dir, tmp_path, capsys):
    """A checkpoint whose hf/config.json disagrees with its weights (torch's CheckpointException, a BaseException,
    used to escape as a traceback per rank), and `verify` against the HF folder of another model (it died with an
    IndexError, or reported a large difference as if the conversion were broken)."""
    import shutil

    mcore = tmp_path / "mcore"
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(mcore)]) == 0
    # this test model has neither: said, since the checkpoint cannot be trained or analysed without them
    assert "has no tokenizer files and no image processor config" in capsys.readouterr().err
    edited = tmp_path / "edited"
    shutil.copytree(mcore, edited)
    config = json.loads((edited / "hf" / "config.json").read_text())
    text = config.get("text_config", config)
    text["intermediate_size"] *= 2
    (edited / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(edited), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not match the model of its hf/config.json" in err and "Traceback" not in err
    other = tmp_path / "other"
    tiny_hf_model(num_text_layers=2).save_pretrained(other)
    assert main(["convert", "verify", "--hf-path", str(other), "--mcore-path", str(mcore)]) == 2
    err = capsys.readouterr().err
    assert f"--hf-path {other} holds another model than --mcore-path {mcore} (text.num_layers: 2 vs 4" in err
    assert main(["convert", "verify", "--hf-path", str(mcore / "hf"), "--mcore-path", str(mcore)]) == 2
    assert "has neither model.safetensors.index.json nor model.safetensors" in capsys.readouterr().err
    for tolerance in ("-1", "nan"):  # found in review: accepted, and the check then reported FAILED
        assert main(["convert", "verify", "--hf-path", str(other), "--mcore-path", str(mcore), "--max-abs-diff",
                     tolerance]) == 2
        assert f"--max-abs-diff {float(tolerance)}: give a finite tolerance >= 0" in capsys.readouterr().err


def test_damaged_inputs_and_file_paths_are_named(hf_dir, tmp_path, capsys):
    import shutil

    for flag_value, message in ((hf_dir / "config.json", "config.json is a file: give the HF model folder"),
                                (tmp_path / "nowhere", "nowhere is missing: give the HF model folder")):
        assert main(["convert", "hf-to-mcore", "--hf-path", str(flag_value), "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    no_map = tmp_path / "no-map"
    shutil.copytree(hf_dir, no_map)
    (no_map / INDEX_NAME).write_text('{"metadata": {}}')
    assert main(["convert", "hf-to-mcore", "--hf-path", str(no_map), "--out", str(tmp_path / "o")]) == 2
    assert f"{no_map / INDEX_NAME} is not a safetensors index" in capsys.readouterr().err
    truncated = tmp_path / "truncated"
    shutil.copytree(hf_dir, truncated)
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # a download cut short
    assert main(["convert", "hf-to-mcore", "--hf-path", str(truncated), "--out", str(tmp_path / "o")]) == 2
    assert f"{shard} is not a readable safetensors file" in capsys.readouterr().err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's")
    for out in (a_file, a_file / "export"):  # --overwrite replaces folders it wrote, never a file
        assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(out), "--overwrite"]) == 2
        assert f"{a_file} is a file; choose an --out folder elsewhere" in capsys.readouterr().err
    assert a_file.read_text() == "the user's" and not (tmp_path / "o").exists()


def test_an_out_written_by_another_conversion_meanwhile_is_kept(tmp_path):
    from megatron_avar.convert.hf_files import atomic_output_dir

    out = tmp_path / "export"
    with pytest.raises(ValueError, match="was written by another process while this conversion ran; it is kept"):
        with atomic_output_dir(out, overwrite=False, inputs={}) as temp:
            (temp / "model.safetensors").write_text("ours")
            out.mkdir()
            (out / "model.safetensors").write_text("theirs")  # the other conversion finished first
    assert (out / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # our temporary folder is gone


def test_existing_output_is_not_clobbered(hf_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep").read_text() == "x"
    # --overwrite replaces a model folder, never a folder of the user's (`--out ~` deleted a home)
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(out), "--overwrite"]) == 2
    assert f"--out {out} holds other things than a model: --overwrite replaces only" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    converted = tmp_path / "converted"
    for _ in range(2):  # the second replaces the first conversion's output
        assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(converted), "--overwrite"]) == 0
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    (exported / "model.safetensors").write_text("an earlier export")
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(converted), "--out", str(exported),
                 "--overwrite"]) == 0
    assert "model_type" in json.loads((exported / "config.json").read_text())


def test_layouts_and_folders_that_cannot_work_are_named_before_any_rank_starts(hf_dir, tmp_path, capsys):
    """megatron's own checks are assertions inside each rank (a traceback per rank)."""
    for flags, message in ((["--pp", "3"], "4 language-model layers do not split over 3 pipeline stages: choose "
                                           "parallel.pipeline_model_parallel_size (convert: --pp) among [1, 2, 4]"),
                           (["--tp", "4"], "2 key/value heads do not split over 4 tensor-parallel ranks")):
        assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(tmp_path / "o"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    out = str(tmp_path / "o")
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "avar_checkpoint.json").write_text(json.dumps({"format": "torch_dist", "dtype": "F32"}))
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(partial), "--out", str(tmp_path / "o")]) == 2
    assert "lacks hf/config.json" in capsys.readouterr().err
    assert main(["convert", "verify", "--hf-path", str(tmp_path / "nowhere"), "--mcore-path", str(partial)]) == 2
    assert "lacks hf/config.json" in capsys.readouterr().err


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


def _save_published(folder, model):
    model.save_pretrained(folder)
    for name, text in (("tokenizer_config.json", '{"model_max_length": 32768}'), ("chat_template.jinja", "{{ x }}"),
                       ("preprocessor_config.json", '{"patch_size": 14}')):
        (folder / name).write_text(text)  # stand-ins: side files travel as bytes, whatever they hold


def _save_transformers5(folder, model):
    """A checkpoint in transformers-5 module names (what `avar convert` exported before the published layout):
    save_pretrained's folder with its weights rewritten under the in-memory names."""
    from safetensors.torch import save_file

    _save_published(folder, model)
    (folder / "model.safetensors").unlink()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert all(name.startswith(("model.language_model.", "model.visual.", "lm_head.")) for name in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# (source layout, dtype, tied embeddings, TP, PP): Hub-like bf16 with Qwen2.5-VL-3B's tied embeddings at one rank;
# fp32 untied (the 7B/32B/72B style) in transformers-5 names written by two pipeline stages. (Published names, fp32,
# untied, written at TP=2 x PP=2: the first test.)
LAYOUT_CASES = {
    "published-bf16-tied-1x1": ("published", torch.bfloat16, True, 1, 1),
    "transformers5-fp32-1x2": ("transformers5", torch.float32, False, 1, 2),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_export_gives_back_the_source_checkpoint_in_its_layout(case, tmp_path):
    layout, dtype, tied, tp, pp = LAYOUT_CASES[case]
    model = tiny_hf_model(tie_word_embeddings=tied, num_text_layers=2).to(dtype)
    source, mcore, back = tmp_path / "source", tmp_path / "mcore", tmp_path / "back"
    {"published": _save_published, "transformers5": _save_transformers5}[layout](source, model)
    original = _hf_tensors(source)
    assert ("lm_head.weight" in original) == (not tied)
    assert main(["convert", "hf-to-mcore", "--hf-path", str(source), "--out", str(mcore), "--tp", str(tp),
                 "--pp", str(pp)]) == 0
    layout_flag = [] if layout == "published" else ["--hf-layout", layout]  # published is the default
    assert main(["convert", "mcore-to-hf", "--mcore-path", str(mcore), "--out", str(back), *layout_flag]) == 0
    _assert_same_tensors(_hf_tensors(back), original)
    assert _side_files(back) == _side_files(source)
    _assert_loads_like(back, source)
    if layout == "transformers5":  # the default export of it: what save_pretrained writes for the same model
        published, reference = tmp_path / "published", tmp_path / "save_pretrained"
        assert main(["convert", "mcore-to-hf", "--mcore-path", str(mcore), "--out", str(published)]) == 0
        model.save_pretrained(reference)
        _assert_same_tensors(_hf_tensors(published), _hf_tensors(reference))


def test_hf_layout_names():
    from megatron_avar.convert import cli
    from megatron_avar.models.qwen2_5_vl.hf_mapping import HF_LAYOUTS

    assert cli.HF_LAYOUTS == HF_LAYOUTS
    published = {"model.language_model.embed_tokens.weight": "model.embed_tokens.weight",
                 "model.language_model.layers.3.mlp.up_proj.weight": "model.layers.3.mlp.up_proj.weight",
                 "model.language_model.norm.weight": "model.norm.weight",
                 "model.visual.blocks.0.attn.qkv.bias": "visual.blocks.0.attn.qkv.bias",
                 "model.visual.merger.mlp.0.weight": "visual.merger.mlp.0.weight",
                 "lm_head.weight": "lm_head.weight"}
    for transformers5, name in published.items():
        for given in (transformers5, name):  # either layout in, the asked one out
            assert hf_name_in_layout(given, "published") == name
            assert hf_name_in_layout(given, "transformers5") == transformers5
    with pytest.raises(ValueError, match="transformers5"):
        hf_name_in_layout("lm_head.weight", "hub")


def test_unknown_hf_layout_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "mcore-to-hf", "--mcore-path", str(tmp_path), "--out", str(tmp_path / "out"),
              "--hf-layout", "hub"])
    assert exit_.value.code == 2 and "published" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _export_on_a_full_disk(mcore_dir: str, out_dir: str, how: str) -> str:
    """One rank of mcore-to-hf on a file system that is full from the start ("no room") or fills up while the
    shards are written ("fills up"); returns the ValueError's message."""
    import shutil

    import safetensors
    import safetensors.torch

    from megatron_avar.convert import checkpoint

    if how == "no room":
        real = shutil.disk_usage
        shutil.disk_usage = lambda path: real(path)._replace(free=1000)
    else:
        def full(*args, **kwargs):  # what safetensors raises on ENOSPC: the cause in words only
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                              "error 28)")
        safetensors.torch.save_file = full
    with pytest.raises(ValueError) as error:
        checkpoint.mcore_to_hf_rank(mcore_dir, out_dir, 2**20)
    return str(error.value)


@pytest.mark.multiprocess
def test_a_full_disk_is_named_in_one_line_before_or_while_writing(hf_dir, tmp_path, capsys, monkeypatch):
    """Found in review: a full disk gave a 34-line traceback ending in SafetensorError (mcore-to-hf) and a 42-line
    one naming no ENOSPC at all (hf-to-mcore: torch's zip writer said "unexpected pos 704 vs 598")."""
    import shutil

    from megatron_avar.convert import hf_files
    from megatron_avar.testing import run_on_ranks

    real = shutil.disk_usage
    with monkeypatch.context() as patch:
        patch.setattr(hf_files.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
        assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(tmp_path / "mc")]) == 2
    err = capsys.readouterr().err
    assert "the conversion writes 0.00 GB, but the file system of" in err and "has 0.00 GB free: free space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left, not even the temporary folder
    assert main(["convert", "hf-to-mcore", "--hf-path", str(hf_dir), "--out", str(tmp_path / "mc")]) == 0
    for how, says in (("no room", "has 0.00 GB free: free space there, or choose an --out on another file system"),
                      ("fills up", "writing the converted checkpoint failed (No space left on device); nothing was "
                                   "published: free space on the file system of")):
        (tmp_path / how).mkdir()
        message = run_on_ranks(_export_on_a_full_disk, 1, str(tmp_path / "mc"), str(tmp_path / how), how,
                               timeout_s=300)[0]
        assert says in message, message
