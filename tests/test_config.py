"""The typed-config loader: YAML file < dotted overrides, unknown keys named, `1e-5` read as a number."""

import pytest

from megatron_avar.config import apply_overrides, config_to_dict, load_config
from megatron_avar.sft.config import SFTConfig


def test_overrides_apply_over_the_file_and_numbers_with_exponents_are_floats(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("out: runs/x\nmodel: {hf_path: m}\ndata: {path: d}\noptim: {lr: 2e-6}\n")
    config = load_config(SFTConfig, config_file, ["optim.lr=1e-5", "avar.layers=[8, 9]", "train.steps=3"])
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.avar.layers == [8, 9] and config.train.steps == 3 and config.data.path == "d"
    assert load_config(SFTConfig, config_file, []).optim.lr == 2e-6
    assert config_to_dict(config)["optim"]["lr"] == 1e-5
    assert apply_overrides({}, ["a.b=-3E+2", "c=text"]) == {"a": {"b": -300.0}, "c": "text"}


def test_unknown_and_missing_keys_are_named(tmp_path):
    base = ["out=o", "model.hf_path=m", "data.path=d"]
    with pytest.raises(ValueError, match=r"unknown config key\(s\) optim.lrr; allowed in optim: adam_beta1"):
        load_config(SFTConfig, None, base + ["optim.lrr=1"])
    with pytest.raises(ValueError, match="model.hf_path must be set"):
        load_config(SFTConfig, None, ["out=o", "model.role_attention_impl=auto", "data.path=d"])
    with pytest.raises(ValueError, match="not of the form dotted.key=value"):
        load_config(SFTConfig, None, base + ["optim.lr"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "missing.yaml", base)
