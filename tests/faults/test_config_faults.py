"""Fault injection (issue 16) on the config loader: wrong-typed values on the command line or in YAML, bad YAML
syntax and a missing model folder give one line naming the field, the value, what is expected and (for YAML) the
file and line; through `avar sft` that line and exit code 2, never a traceback. No training runs here."""

import json
import re
from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.config import load_config
from megatron_avar.sft.config import SFTConfig

BASE = ["out=o", "model.hf_path=m", "data.path=d"]


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", r'train\.steps="abc" \(override train\.steps=abc\): expected an integer, got a string'),
    ("optim.lr=abc", r'optim\.lr="abc" \(override optim\.lr=abc\): expected a number, got a string'),
    ("train=5", r"train=5 \(override train=5\): expected a section \(a mapping of global_batch_size, .*steps.*\), "
                r"got an integer"),
    ("train.steps=2.5", r"train\.steps=2\.5 \(override train\.steps=2\.5\): expected an integer, got a "
                        r"non-integral number"),
    ("train.steps=true", r"train\.steps=true \(override train\.steps=true\): expected an integer, got true/false"),
    ("log.wandb_project=[1]", r"log\.wandb_project=\[1\] .*: expected a string or null, got a list"),
    ("avar.layers=[8, x]", r'avar\.layers=\[8, "x"\] .*: expected a string or a list of integers'),
])
def test_a_wrong_typed_override_names_field_value_and_expected_type(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(SFTConfig, None, BASE + [override])


def test_accepted_conversions_are_exact():
    config = load_config(SFTConfig, None, BASE + ["train.steps=1e3", "optim.lr=1"])
    assert config.train.steps == 1000 and type(config.train.steps) is int  # an integral float is that integer
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    # a section left empty (`train:` in YAML, or null) keeps its defaults; an override can still fill it in
    assert load_config(SFTConfig, None, BASE + ["train=null"]).train.steps == 100
    assert load_config(SFTConfig, None, BASE + ["train=null", "train.steps=7"]).train.steps == 7


def test_yaml_values_are_named_with_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\ntrain:\n  global_batch_size: 4\n  steps: true\n")
    with pytest.raises(ValueError, match=rf"^train\.steps=true \({path}:6\): expected an integer, got true/false$"):
        load_config(SFTConfig, path)
    # an override replaces the file's value, and is what the message then names
    with pytest.raises(ValueError, match=r"^train\.steps=2\.5 \(override train\.steps=2\.5\): expected an integer"):
        load_config(SFTConfig, path, ["train.steps=2.5"])
    # errors of a section's own validation name the file lines of the fields they mention
    path.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\ntrain:\n  precision: fp16\n")
    with pytest.raises(ValueError, match=rf"^train\.precision='fp16'.* \(train\.precision: {path}:5\)$"):
        load_config(SFTConfig, path)
    path.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\noptim:\n  lrr: 1\n")
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) optim\.lrr; allowed in optim: .* "
                                         rf"\(optim\.lrr: {path}:5\)"):
        load_config(SFTConfig, path)


def test_bad_yaml_syntax_names_file_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out: o\nmodel:\n  hf_path: m\n data: x\n")
    with pytest.raises(ValueError, match=rf"^{path}:4:2: invalid YAML: expected <block end>"):
        load_config(SFTConfig, path)
    path.write_text("- out: o\n")
    with pytest.raises(ValueError, match=rf"^{path}: expected a mapping of config keys at the top level, got a list"):
        load_config(SFTConfig, path)
    with pytest.raises(ValueError, match=r"^override 'avar\.layers=\[8, 9': the value is not valid YAML"):
        load_config(SFTConfig, None, BASE + ["avar.layers=[8, 9"])


def test_a_key_written_twice_is_named_not_dropped(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section silently dropped the whole first one."""
    path = tmp_path / "run.yaml"
    path.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\ntrain:\n  steps: 7\noptim: {lr: 1e-5}\n"
                    "train:\n  precision: fp32\n")
    with pytest.raises(ValueError, match=rf"^{path}:7:1: invalid YAML: key 'train' repeated \(first at line 4\)"):
        load_config(SFTConfig, path)
    path.write_text("out: o\nmodel: {hf_path: m, hf_path: n}\ndata: {path: d}\n")
    with pytest.raises(ValueError, match=r"key 'hf_path' repeated \(first at line 2\)"):
        load_config(SFTConfig, path)
    path.write_text("out: o\n2: oops\n")  # a key YAML reads as a number
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) 2; allowed in the top level: .* \(2: {path}:2\)"):
        load_config(SFTConfig, path)
    from megatron_avar.config import read_config_file

    path.write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")  # a merge key's values may still be overridden
    assert read_config_file(path)["b"] == {"x": 3, "y": 2}


@pytest.fixture
def no_training(monkeypatch):
    """`avar sft` with run_sft replaced: a config that gets through the loader is recorded, not trained."""
    import megatron_avar.sft.trainer as trainer

    started = []
    monkeypatch.setattr(trainer, "run_sft", started.append)
    monkeypatch.delenv("AVAR_DEBUG", raising=False)
    return started


@pytest.mark.parametrize("override, expected", [
    ("train.steps=abc", 'train.steps="abc" (override train.steps=abc): expected an integer, got a string'),
    ("train.steps=2.5", "train.steps=2.5 (override train.steps=2.5): expected an integer, got a non-integral"),
    ("train.steps=true", "train.steps=true (override train.steps=true): expected an integer, got true/false"),
    ("train=5", "train=5 (override train=5): expected a section"),
])
def test_avar_sft_prints_the_one_line_and_exits_2(override, expected, tmp_path, capsys, no_training):
    config = tmp_path / "run.yaml"
    config.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\n")
    assert main(["sft", "--config", str(config), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"avar sft: error: {expected}") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not no_training


def test_avar_sft_bad_yaml_file_is_one_line_with_file_and_line(tmp_path, capsys, no_training):
    config = tmp_path / "run.yaml"
    config.write_text("out: o\nmodel: {hf_path: m\ndata: {path: d}\n")
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"avar sft: error: {config}:3:") and "invalid YAML" in err, err
    assert len(err.strip().splitlines()) == 1 and not no_training


def test_a_missing_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """A path given wrong that surfaces as a FileNotFoundError where it is read (here a stand-in trainer opening
    model.hf_path; the trainer's own up-front check names it as a ValueError): `avar` reports it in one line
    naming the path, with AVAR_DEBUG=1 for the traceback."""
    import megatron_avar.sft.trainer as trainer

    monkeypatch.setattr(trainer, "run_sft", lambda config: open(config.model.hf_path))  # noqa: SIM115
    monkeypatch.delenv("AVAR_DEBUG", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\n")
    missing = tmp_path / "nonexistent"
    assert main(["sft", "--config", str(config), f"model.hf_path={missing}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avar sft: error: No such file or directory: ") and str(missing) in err, err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.setenv("AVAR_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["sft", "--config", str(config), f"model.hf_path={missing}"])


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_a_missing_model_folder_is_refused_by_field_before_anything_is_written(tmp_path, command):
    """The trainers check model.hf_path first: no process group, no run directory left behind."""
    from megatron_avar.config import load_config

    if command == "sft":
        from megatron_avar.sft.config import SFTConfig as Config
        from megatron_avar.sft.trainer import run_sft as run
    else:
        from megatron_avar.grpo.config import GRPOConfig as Config
        from megatron_avar.grpo.trainer import run_grpo as run
    out, missing = tmp_path / "run", tmp_path / "nonexistent"
    config = load_config(Config, None, [f"out={out}", f"model.hf_path={missing}", f"data.path={tmp_path}"])
    with pytest.raises(ValueError, match=f"model.hf_path={missing}: no config.json there"):
        run(config)
    assert not out.exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-0.5"])
def test_a_non_finite_or_negative_agto_weight_is_refused(value):
    from megatron_avar.config import load_config
    from megatron_avar.sft.config import SFTConfig

    with pytest.raises(ValueError, match="avar.alpha and avar.beta must be finite and >= 0"):
        load_config(SFTConfig, None, ["out=o", "model.hf_path=m", "data.path=d", f"avar.alpha={value}"])


def test_wandb_without_wandb_installed_is_refused_before_the_run_starts(tmp_path):
    """Before: the logger found it, after a run starting over (checkpoint.resume=false checkpoint.overwrite=true)
    had cleared the earlier run and the model was built. The config itself loads (`avar plan` and `avar sweep`
    read it on machines that need no wandb); both trainers refuse it before any process group exists."""
    import importlib.util

    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.grpo.trainer import run_grpo
    from megatron_avar.sft.trainer import run_sft

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "summary.json").write_text("{}")
    overrides = [f"out={tmp_path / 'earlier'}", "model.hf_path=m", "data.path=d", "log.wandb_project=myproj",
                 "checkpoint.resume=false", "checkpoint.overwrite=true"]
    for config_class, run in ((SFTConfig, run_sft), (GRPOConfig, run_grpo)):
        config = load_config(config_class, None, overrides)
        with pytest.raises(ValueError, match="log.wandb_project is set but wandb is not installed: pip install"):
            run(config)
    assert (tmp_path / "earlier" / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_an_out_that_is_not_this_commands_run_directory_is_refused_before_anything_is_written(tmp_path, command):
    """Found in review: out=model.hf_path replaced the model's config.json with the run config; `avar grpo` in an
    SFT run's folder reported a finished GRPO run; out="" wrote the run into the working directory."""
    from megatron_avar.config import load_config

    if command == "sft":
        from megatron_avar.sft.config import SFTConfig as Config
        from megatron_avar.sft.trainer import run_sft as run
        other = {"out": "o", "model": {}, "data": {}, "train": {}, "checkpoint": {}, "rollout": {}, "reward": {}}
    else:
        from megatron_avar.grpo.config import GRPOConfig as Config
        from megatron_avar.grpo.trainer import run_grpo as run
        other = {"out": "o", "model": {}, "data": {}, "train": {}, "checkpoint": {}, "avar": {}}
    model = tmp_path / "model"
    model.mkdir()
    model_config = '{"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}'
    (model / "config.json").write_text(model_config)
    other_run, not_json = tmp_path / "other_run", tmp_path / "not_json"
    for folder, text in ((other_run, json.dumps(other)), (not_json, "{not json")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    cases = [('""', "out is empty: give the run directory"),
             (str(model), f"out={model} is model.hf_path: the run would write its config.json over the model's"),
             (str(other_run), f"out={other_run} holds a run of another command (its config.json has sections "
                              f"{'avar' if command == 'grpo' else 'reward, rollout'}"),
             (str(not_json), f"out={not_json} holds a config.json that is not readable as a run config")]
    copy = tmp_path / "model_copy"
    copy.mkdir()
    (copy / "config.json").write_text(model_config)
    cases.append((str(copy), f"out={copy} holds a config.json that is a Hugging Face model's (model_type "
                             "'qwen2_5_vl')"))
    for out, message in cases:
        config = load_config(Config, None, [f"out={out}", f"model.hf_path={model}", f"data.path={tmp_path}"])
        with pytest.raises(ValueError, match=re.escape(message)):
            run(config)
    assert (model / "config.json").read_text() == model_config and sorted(p.name for p in model.iterdir()) == [
        "config.json"]
    assert json.loads((other_run / "config.json").read_text()) == other and len(list(other_run.iterdir())) == 1


# A setting that only some other setting makes the run read: (command, overrides that set it where the run would ignore
# it, the refused key=value, the setting that leaves it unused, the one that uses it). Each was accepted and recorded
# in the run's config.json, yet changed nothing.
UNUSED_SETTINGS = [
    ("grpo", ["loss.max_len=2048"], "loss.max_len=2048", "loss.aggregation=token_mean",
     "loss.aggregation=sequence_sum_norm"),
    ("grpo", ["loss.aggregation=sequence_mean", "loss.max_len=2048"], "loss.max_len=2048",
     "loss.aggregation=sequence_mean", "loss.aggregation=sequence_sum_norm"),
    ("grpo", ["rollout.vllm_gpu_memory_utilization=0.3"], "rollout.vllm_gpu_memory_utilization=0.3",
     "rollout.backend=local", "rollout.backend=vllm"),
    ("grpo", ["rollout.vllm_enable_sleep=false"], "rollout.vllm_enable_sleep=false", "rollout.backend=local",
     "rollout.backend=vllm"),
    ("grpo", ["rollout.backend=vllm", "rollout.batch_size=4"], "rollout.batch_size=4", "rollout.backend=vllm",
     "rollout.backend=local"),
    ("grpo", ["advantage.mode=dr_grpo", "advantage.eps=1e-3"], "advantage.eps=0.001", "advantage.mode=dr_grpo",
     "advantage.mode=grpo"),
    ("grpo", ["data.shuffle=false", "data.seed=3"], "data.seed=3", "data.shuffle=false", "data.shuffle=true"),
    ("grpo", ["reward.lambda_visual=0", "reward.gate_visual_on_correct=false"], "reward.gate_visual_on_correct=false",
     "reward.lambda_visual=0.0", "reward.lambda_visual > 0"),
    *[(command, ["checkpoint.resume=false", "checkpoint.accept_data_change=true"], "checkpoint.accept_data_change=true",
       "checkpoint.resume=false", "checkpoint.resume=true") for command in ("sft", "grpo")],
    *[(command, ["parallel.overlap_grad_reduce=false", "parallel.ddp_bucket_size=40000"],
       "parallel.ddp_bucket_size=40000", "parallel.overlap_grad_reduce=false", "parallel.overlap_grad_reduce=true")
      for command in ("sft", "grpo")],
]


def _config_class(command: str):
    from megatron_avar.grpo.config import GRPOConfig

    return SFTConfig if command == "sft" else GRPOConfig


@pytest.mark.parametrize("command, overrides, setting, here, used_with", UNUSED_SETTINGS)
def test_a_setting_the_run_would_ignore_is_refused_in_one_line_naming_the_fix(command, overrides, setting, here,
                                                                              used_with):
    """Before, each of these loaded: the run ignored the setting (loss.max_len under token_mean, vLLM's memory share
    with the local backend, ...) while its config.json recorded it as applied. Now the config refuses it in one line
    naming the key, the setting that leaves it unused, the one that uses it and the fix; the same setting loads where
    it is used, and its default loads anywhere."""
    key = setting.split("=")[0]
    with pytest.raises(ValueError) as error:
        load_config(_config_class(command), None, BASE + overrides)
    message = str(error.value)
    assert message.startswith(f"{setting} has no effect with {here}: only {used_with} uses it"), message
    assert f"Remove {key} (or set its default, {key}=" in message and f"or set {used_with}" in message, message
    assert "\n" not in message
    fixed = [o for o in overrides if not o.startswith(key + "=")]
    assert load_config(_config_class(command), None, BASE + fixed)  # without it the config loads
    if ">" not in used_with:  # where it is used, it loads too
        with_use = [o for o in overrides if not o.startswith(used_with.split("=")[0] + "=")] + [used_with]
        if key == "loss.max_len":  # sequence_sum_norm needs it equal to the response budget
            with_use.append("rollout.max_new_tokens=2048")
        assert load_config(_config_class(command), None, BASE + with_use)


def test_the_commands_refuse_an_ignored_setting_before_running(tmp_path, capsys, monkeypatch):
    """The refusal is the config's own (one home): `avar grpo` prints it in one line and exits 2 without running, and
    `avar plan` refuses it too (here the 7B example's vLLM memory share once the backend is switched to local), as
    does `avar sweep` for a point's SFT config."""
    import megatron_avar.grpo.trainer as trainer

    started = []
    monkeypatch.setattr(trainer, "run_grpo", started.append)
    monkeypatch.delenv("AVAR_DEBUG", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\nloss:\n  max_len: 2048\n")
    assert main(["grpo", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avar grpo: error: loss.max_len=2048 has no effect with loss.aggregation=token_mean"), err
    assert f"(loss.max_len: {config}:5)" in err and len(err.strip().splitlines()) == 1 and not started

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    assert main(["plan", "--config", "examples/grpo/avar_7b.yaml", "--model", "7b", "rollout.backend=local"]) == 2
    err = capsys.readouterr().err
    assert "rollout.vllm_gpu_memory_utilization=0.45 has no effect with rollout.backend=local" in err, err
    assert "examples/grpo/avar_7b.yaml:" in err and err.count("\n") == 1

    assert main(["sweep", "--config", "examples/sweeps/tiny_cpu.yaml", "--no-wait", f"out={tmp_path / 'sweep'}",
                 "sft_overrides=[checkpoint.interval=0,parallel.overlap_grad_reduce=false,"
                 "parallel.ddp_bucket_size=40000]"]) == 2
    err = capsys.readouterr().err
    assert "its SFT config does not load: parallel.ddp_bucket_size=40000 has no effect with " \
           "parallel.overlap_grad_reduce=false" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "sweep").exists()
