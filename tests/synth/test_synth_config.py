"""Config validation, the example configs, the CLI's error path, and the text rules of the teacher stages
(answer extraction, anchors, description sections, the response format)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.grading import SYNTHESIS, extract_answer, math_equal
from megatron_avar.synth.config import load_config
from megatron_avar.synth.prompts import load_prompts, reason_messages
from megatron_avar.synth.teachers import Malformed, parse_description
from megatron_avar.synth.verify import format_response, select_candidate, strip_anchor_tags

REPO = Path(__file__).resolve().parents[2]
SOURCE = ["sources=[{name: a, path: data.jsonl}]"]


@pytest.mark.parametrize("name", ["procedural_local.yaml", "vard_cluster.yaml"])
def test_example_configs_are_valid(name):
    config = load_config(REPO / "examples" / "synth" / name)
    assert config.sources and config.work_dir.name.endswith(".work")


@pytest.mark.parametrize("overrides, message", [
    (["sources=[]"], "sources must list at least one source"),
    (["sources=[{name: a, path: x}, {name: a, path: y}]"], r"sources\[\].name must be unique"),
    (SOURCE + ["reason.num_candidate=2"], r"unknown key\(s\) \['reason.num_candidate'\]; reason accepts"),
    (SOURCE + ["run.executor=spark"], r"run.executor must be one of \['xenna', 'ray_data', 'local'\]"),
    (SOURCE + ["reason.num_candidates=0"], r"reason.num_candidates must be in \[1, 64\]"),
    (SOURCE + ["reason.num_candidates=two"], "reason.num_candidates must be int"),
    (SOURCE + ["client.max_failed_share=1.5"], r"client.max_failed_share must be in \[0, 1\]"),
    (SOURCE + ["client.max_failed_share=-0.1"], r"client.max_failed_share must be in \[0, 1\]"),
    (SOURCE + ["verify.select=best"], "verify.select must be one of"),
    (SOURCE + ["describe.teacher.base_url=localhost:8000"], "describe.teacher.base_url must start with http"),
    (SOURCE + ["anchor.teacher.api_key_env=SYNTH_UNSET_VARIABLE"], "SYNTH_UNSET_VARIABLE.*not set"),
    (SOURCE + ["run.prompt_version=v0"], "run.prompt_version must name a folder"),
    (["sources=[{name: a, path: x, format: csv}]"], r"sources\[a\].format must be one of"),
    (SOURCE + ["sources.3.path=y"], "sources has 1 items; index '3' is not one"),
    (SOURCE + ["reason"], "must look like dotted.key=value"),
])
def test_invalid_configs_name_the_field(overrides, message, monkeypatch):
    monkeypatch.delenv("SYNTH_UNSET_VARIABLE", raising=False)
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_overrides_reach_list_items_and_disabled_stages_skip_their_checks(monkeypatch):
    config = load_config(None, SOURCE + ["sources.0.limit=5", "client.timeout_s=3", "anchor.enabled=false",
                                         "anchor.teacher.api_key_env=SYNTH_UNSET_VARIABLE"])
    assert config.sources[0].limit == 5 and config.client.timeout_s == 3.0 and not config.anchor.enabled


def test_cli_reports_bad_input_as_usage_error(tmp_path, capsys):
    assert main(["synth", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "avar synth: error: config file not found" in capsys.readouterr().err
    assert main(["synth", "sources=[{name: a, path: x}]", "run.executor=spark"]) == 2
    assert "run.executor must be one of" in capsys.readouterr().err


def test_prompts_are_versioned_templates():
    templates = load_prompts("v1")
    assert set(templates) == {"describe_system", "describe_user", "reason_system", "reason_user", "anchor_system",
                              "anchor_user"}
    # LaTeX braces and dollar signs in a question survive substitution.
    question = r"If $x = \frac{1}{2}$, what is {x}$^2$?"
    assert question in reason_messages("v1", question, None)[1]["content"]


@pytest.mark.parametrize("chain, expected", [
    ("step\nFinal answer: 42", "42"),
    ("step\n**Final Answer:** \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Final answer: 3\nwait, no.\nFinal answer: 4", "4"),
    ("so the result is \\boxed{x^{2}} indeed", "x^{2}"),
    ("no conclusion at all", None),
])
def test_extract_answer(chain, expected):
    assert extract_answer(chain, SYNTHESIS).text == expected


def test_response_format_and_grading():
    response = format_response("Look at the figure.\nIt shows 0.5.\nFinal answer: 0.5", "0.5")
    assert response == "<think>Look at the figure.\nIt shows 0.5.</think><answer>0.5</answer>"
    assert math_equal("\\frac{1}{2}", "0.5") and math_equal("purple", "Purple.")
    assert not math_equal("A", "B") and not math_equal("27", "28") and not math_equal("3", None)


def test_anchor_tags():
    assert strip_anchor_tags("a <anchor>Look again.</anchor> b <ANCHOR>Check.</ANCHOR>") == ("a Look again. b Check.", 2)
    assert strip_anchor_tags("a <anchor>Look again. b")[1] == -1
    assert strip_anchor_tags("a </anchor>x<anchor> b")[1] == -1
    candidates = [{"index": 0, "eligible": True, "num_anchors": 1}, {"index": 1, "eligible": True, "num_anchors": 3},
                  {"index": 2, "eligible": False, "num_anchors": 5}, {"index": 3, "eligible": True, "num_anchors": 3}]
    assert select_candidate(candidates, "most_anchors")["index"] == 1
    assert select_candidate(candidates, "first")["index"] == 0
    assert select_candidate([{"index": 0, "eligible": False}], "first") is None


def test_description_needs_all_sections_in_order():
    good = "## Global scan\nA chart.\n## Elements\nBars.\n## Relations\nB > A.\n## Scene\nSales."
    assert parse_description(good) == good
    for bad, why in [(good.replace("## Relations\nB > A.\n", ""), "Relations"),
                     (good.replace("## Elements\nBars.", "## Elements\n"), "empty"),
                     ("## Elements\nBars.\n## Global scan\nA chart.\n## Relations\nB.\n## Scene\nS.", "order")]:
        with pytest.raises(Malformed, match=why):
            parse_description(bad)
