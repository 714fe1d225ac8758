"""`avar plan` on the command line: the README's plans are what the command prints, --json carries the same numbers,
model sizes come from model.hf_path/config.json before --model, the config's command is detected, and bad input
is a one-line error."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from megatron_avar.cli import main

REPO = Path(__file__).resolve().parents[2]
README_PLAN = re.compile(r"```text\n\$ avar plan (?P<args>[^\n]+)\n(?P<output>.*?)\n```", re.DOTALL)


def _plan(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", *args])
    return code, out.getvalue()


def test_the_readmes_plans_are_what_the_command_prints(monkeypatch):
    monkeypatch.chdir(REPO)
    blocks = list(README_PLAN.finditer((REPO / "README.md").read_text()))
    assert {m["args"].split()[1] for m in blocks} >= {"examples/sft/avar_7b.yaml", "examples/sft/avar_72b.yaml",
                                                       "examples/grpo/avar_7b.yaml"}
    for block in blocks:
        code, output = _plan(*block["args"].split())
        assert code == 0
        assert output.rstrip() == block["output"], (
            f"README.md's `avar plan {block['args']}` is stale: run it and paste its output")


def test_json_has_every_stage_and_verdict(monkeypatch):
    monkeypatch.chdir(REPO)
    code, output = _plan("--config", "examples/sft/avar_72b.yaml", "--model", "72b", "--gpus", "64", "--json")
    plan = json.loads(output)
    assert code == 0 and plan["command"] == "sft" and plan["parallel"]["dp"] == 2
    stages = plan["memory"]["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3] and [s["in_flight_forwards"] for s in stages] == [4, 3, 2, 1]
    worst = max(stages, key=lambda s: s["peak"])
    assert plan["memory"]["peak_bytes"] == worst["peak"] == (
        sum(worst["static"].values()) + sum(worst["stored"].values()) + max(worst["transient"].values()))
    assert {v["gpu"] for v in plan["verdicts"]} == {"h100", "h200"}
    assert all(v["headroom_bytes"] == v["memory_bytes"] - v["required_bytes"] for v in plan["verdicts"])


def test_a_grpo_plan_takes_any_image_fraction(monkeypatch):
    """The labelled share is an SFT assumption: a GRPO plan (responses from its rollout settings) never checks it."""
    monkeypatch.chdir(REPO)
    code, output = _plan("--config", "examples/grpo/avar_7b.yaml", "--model", "7b", "--gpus", "8",
                         "--image-fraction", "0.7", "--json")
    assert code == 0 and json.loads(output)["command"] == "grpo"


def test_the_long_rows_example_plans_context_parallelism_and_fits_an_h100(monkeypatch):
    """README quotes a ~37 GB peak for the 32k-row example (CP=2): the plan reads CP from the config, halves the tokens
    and the image patches per rank, and the verdict is an H100 fit; without CP the same rows need more."""
    monkeypatch.chdir(REPO)
    plans = {}
    for cp in (2, 1):
        code, output = _plan("--config", "examples/sft/avar_7b_long_rows.yaml", "--model", "7b", "--gpus", "16",
                             f"parallel.context_parallel_size={cp}", "--json")
        assert code == 0
        plans[cp] = json.loads(output)
    assert (plans[2]["parallel"]["cp"], plans[2]["parallel"]["dp"]) == (2, 4)
    assert round(plans[2]["memory"]["peak_bytes"] / 1e9) == 37
    assert {v["gpu"]: v["fits"] for v in plans[2]["verdicts"]}["h100"]
    for part in ("decoder_activations", "vision_activations"):  # full recompute: each layer's input, half of them
        stored = [plans[cp]["memory"]["stages"][0]["stored"][part] for cp in (2, 1)]
        assert stored[0] == pytest.approx(stored[1] / 2), part


def test_config_json_of_the_checkpoint_comes_before_the_preset(tmp_path, monkeypatch, capsys):
    from megatron_avar.models.qwen2_5_vl.published import QWEN2_5_VL_3B

    monkeypatch.chdir(REPO)
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_5_VL_3B))
    code, output = _plan("--config", "examples/sft/avar_7b.yaml", f"model.hf_path={tmp_path}", "--model", "7b",
                         "--json")
    plan = json.loads(output)
    assert code == 0 and plan["model"] == str(tmp_path / "config.json") and plan["parameters"] == 3754622976
    # the preset is a fallback, but a wrong one is still refused (found in review: `--model 13b` passed)
    assert main(["plan", "--config", "examples/sft/avar_7b.yaml", f"model.hf_path={tmp_path}", "--model", "13b"]) == 2
    assert "--model '13b': allowed 3b, 7b, 72b" in capsys.readouterr().err


def test_the_command_is_detected_from_the_config():
    from megatron_avar.plan.runs import detect_command

    assert detect_command(str(REPO / "examples/grpo/avar_7b.yaml"), []) == "grpo"
    assert detect_command(str(REPO / "examples/sft/avar_7b.yaml"), []) == "sft"
    assert detect_command(None, ["rollout.n=4"]) == "grpo"
    assert detect_command(None, ["train.prompts_per_step=4"]) == "grpo"  # a key only GRPO's train section has
    assert detect_command(None, ["data.max_prompt_length=512", "train.steps=3"]) == "grpo"
    assert detect_command(None, ["train.steps=3"]) == "sft"


@pytest.mark.parametrize("args, message", [
    (["--config", "examples/sft/avar_7b.yaml"], "has no config.json on this machine: pass --model"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "13b"], "--model '13b': allowed 3b, 7b, 72b"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--gpus", "3"], "not a multiple of tensor x pipeline"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--gpus", "6"], "over the 3 data-parallel replicas"),
    # what the trainer would refuse, refused here too (a sweep skips such points instead of queueing them)
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--gpus", "16", "data.micro_batch_size=3"],
     "does not split into micro-batches of data.micro_batch_size=3"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--gpus", "16",
      "parallel.tensor_model_parallel_size=8"], "28 attention heads do not split over 8 tensor-parallel ranks"),
    (["--config", "examples/sft/avar_72b.yaml", "--model", "72b", "--gpus", "64",
      "parallel.virtual_pipeline_model_parallel_size=2", "train.global_batch_size=6"],
     "a step has 3 per data-parallel rank: make it a multiple of 4"),
    (["--config", "examples/grpo/avar_7b.yaml", "--model", "7b", "parallel.pipeline_model_parallel_size=2"],
     "rollout.backend=vllm runs vLLM with the trainer's tensor parallelism"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--mfu", "1.5"], "mfu must be in (0, 1]"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--image-fraction", "0.7"],
     "image fraction 0.7 + response fraction 0.35 exceed 1"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--response-fraction", "-0.1"],
     "response_fraction must be in [0, 1]"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "train.recompute=some"], "train.recompute='some'"),
    # before: clamped to the row length, silently (the plan said "samples of 16384 tokens")
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "--sample-tokens", "999999"],
     "--sample-tokens 999999 exceeds the run's rows of 16384 tokens (data.seq_length): a packed sample lies within "
     "one row; give at most 16384"),
    (["--config", "examples/grpo/avar_7b.yaml", "--model", "7b", "--sample-tokens", "999999"],
     "--sample-tokens 999999 exceeds the run's rows of 4096 tokens (data.max_prompt_length + rollout.max_new_tokens, "
     "rounded up)"),
    (["--config", "examples/sft/avar_7b.yaml", "--model", "7b", "train.seed=99999999999999999999999"],
     "train.seed must be in [0, 2**63), got 99999999999999999999999"),
])
def test_bad_input_is_a_one_line_error(monkeypatch, capsys, args, message):
    monkeypatch.chdir(REPO)
    assert main(["plan", *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
