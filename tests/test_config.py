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
    # found in review: a folder was "does not exist", a binary file a decode error naming no file
    with pytest.raises(ValueError, match=f"config file {tmp_path} is a folder: give a YAML file"):
        load_config(SFTConfig, tmp_path, base)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"image.png is not UTF-8 text \(byte 0\)"):
        load_config(SFTConfig, tmp_path / "image.png", base)


def test_a_partial_section_keeps_the_fields_own_default_section():
    from megatron_avar.grpo.config import GRPOConfig

    # GRPO's optim defaults to OptimConfig(lr=1e-6); setting another optim field keeps that lr (not SFT's 5e-6)
    base = ["out=o", "model.hf_path=m", "data.path=d", "train.prompts_per_step=4"]
    assert load_config(GRPOConfig, None, base + ["optim.weight_decay=0.1"]).optim.lr == 1e-6
    assert load_config(GRPOConfig, None, base + ["optim={}"]).optim.lr == 1e-6


def test_list_items_are_overridden_by_index(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("out: o\nmodel: {hf_path: m}\ndata: {path: d}\navar:\n  layers:\n    - 8\n    - 9\n")
    assert load_config(SFTConfig, config_file, ["avar.layers.1=12"]).avar.layers == [8, 12]
    with pytest.raises(ValueError, match=r"avar.layers is a list of 2 item\(s\), so '2' is not one of its items "
                                         r"\(indexes from 0 to 1\); set the whole list instead"):
        load_config(SFTConfig, config_file, ["avar.layers.2=12"])
    with pytest.raises(ValueError, match=r"avar.layers is not set here \(its default applies\), so it has no item 0"):
        load_config(SFTConfig, None, ["out=o", "model.hf_path=m", "data.path=d", "avar.layers.0=12"])
    with pytest.raises(ValueError, match=r"override 'out.x=1': out is not a section or a list"):
        load_config(SFTConfig, config_file, ["out.x=1"])
    assert apply_overrides({"a": [{"b": 1}, {"b": 2}]}, ["a.1.b=3"]) == {"a": [{"b": 1}, {"b": 3}]}


def test_parallel_layouts_that_cannot_run_are_refused_by_name():
    from megatron_avar.grpo.config import GRPOConfig
    from megatron_avar.sft.trainer import build_run
    from megatron_avar.training.megatron_setup import RankLayout

    base = ["out=o", "model.hf_path=m", "data.path=d"]
    with pytest.raises(ValueError, match="sequence_parallel=true splits rows over tensor-parallel ranks: it needs"):
        load_config(SFTConfig, None, base + ["parallel.sequence_parallel=true"])
    with pytest.raises(ValueError, match=r"data.seq_length \(4095\) must be a multiple of 2: parallel."
                                         r"sequence_parallel splits each row over tensor_model_parallel_size=2"):
        load_config(SFTConfig, None, base + ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                                             "data.seq_length=4095"])
    with pytest.raises(ValueError, match=r"data.seq_length \(4100\) must be a multiple of 16: parallel."
                                         r"context_parallel_size=2 cuts each row into 4 equal chunks and "
                                         r"sequence_parallel splits each chunk over tensor_model_parallel_size=4"):
        load_config(SFTConfig, None, base + ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true",
                                             "parallel.context_parallel_size=2", "data.seq_length=4100"])
    with pytest.raises(ValueError, match="with parallel.context_parallel_size > 1 use model.mass_mode=probe"):
        load_config(SFTConfig, None, base + ["parallel.context_parallel_size=2", "model.mass_mode=fused"])
    with pytest.raises(ValueError, match="context_parallel_size must be >= 1"):
        load_config(SFTConfig, None, base + ["parallel.context_parallel_size=0"])
    with pytest.raises(ValueError, match=r"train.seq_length \(8190\) must be a multiple of 4: parallel."
                                         r"context_parallel_size=2 cuts each row into 4 equal chunks"):
        load_config(GRPOConfig, None, base + ["parallel.context_parallel_size=2", "train.seq_length=8190"])
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size > 1 interleaves pipeline stages: it "
                                         "needs parallel.pipeline_model_parallel_size > 1"):
        load_config(SFTConfig, None, base + ["parallel.virtual_pipeline_model_parallel_size=2"])
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size > 1 is for avar sft"):
        load_config(GRPOConfig, None, base + ["parallel.pipeline_model_parallel_size=2",
                                              "parallel.virtual_pipeline_model_parallel_size=2"])
    # GRPO's default row length (the longest rollout) is rounded up to a multiple of TP under SP
    grpo = load_config(GRPOConfig, None, base + ["parallel.tensor_model_parallel_size=4",
                                                 "parallel.sequence_parallel=true", "data.max_prompt_length=1001",
                                                 "rollout.max_new_tokens=1000"])
    assert grpo.seq_length == 2004
    grpo = load_config(GRPOConfig, None, base + ["parallel.tensor_model_parallel_size=2",
                                                 "parallel.context_parallel_size=2", "parallel.sequence_parallel=true",
                                                 "data.max_prompt_length=1001", "rollout.max_new_tokens=1000"])
    assert grpo.seq_length == 2008  # 2 x CP chunks, each split over TP
    # the interleaved schedule's micro-batch groups, checked before anything is built
    sft = load_config(SFTConfig, None, base + ["parallel.pipeline_model_parallel_size=2",
                                               "parallel.virtual_pipeline_model_parallel_size=2",
                                               "train.global_batch_size=3"])
    layout = RankLayout(rank=0, world_size=2, local_rank=0, tp=1, pp=2, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, vpp=2)
    with pytest.raises(ValueError, match=r"a step has 3 per data-parallel rank .* make it a multiple of 2"):
        build_run(sft, layout)
