"""Config validation, the example configs, the CLI's error path, and the text rules of the teacher stages
(answer extraction, anchors, description sections, the response format)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from megatron_avar.cli import main
from megatron_avar.config import load_config
from megatron_avar.grading import SYNTHESIS, extract_answer, math_equal
from megatron_avar.synth.config import SourceConfig, SynthConfig
from megatron_avar.synth.prompts import load_prompts, reason_messages
from megatron_avar.synth.teachers import Malformed, make_anchor_parser, parse_chain, parse_description
from megatron_avar.synth.verify import format_response, select_candidate, strip_anchor_tags

REPO = Path(__file__).resolve().parents[2]
SOURCE = ["sources=[{name: a, path: data.jsonl}]"]


@pytest.mark.parametrize("name", ["procedural_local.yaml", "vard_cluster.yaml"])
def test_example_configs_are_valid(name):
    config = load_config(SynthConfig, REPO / "examples" / "synth" / name)
    assert config.sources and config.work_dir.name.endswith(".work")


@pytest.mark.parametrize("overrides, message", [
    (["sources=[]"], "sources must list at least one source"),
    (["sources=[{name: a, path: x}, {name: a, path: y}]"], r"sources\[\].name must be unique"),
    (SOURCE + ["reason.num_candidate=2"], r"unknown config key\(s\) reason.num_candidate; allowed in reason: "
                                          "num_candidates, teacher"),
    (SOURCE + ["run.executor=spark"], r"run.executor must be one of \['xenna', 'ray_data', 'local'\]"),
    (SOURCE + ["reason.num_candidates=0"], r"reason.num_candidates must be in \[1, 64\]"),
    (SOURCE + ["reason.num_candidates=two"], r'reason.num_candidates="two" \(override reason.num_candidates=two\): '
                                             "expected an integer, got a string"),
    (SOURCE + ["client.max_failed_share=1.5"], r"client.max_failed_share must be in \[0, 1\]"),
    (SOURCE + ["client.max_failed_share=-0.1"], r"client.max_failed_share must be in \[0, 1\]"),
    (SOURCE + ["verify.select=best"], "verify.select must be one of"),
    (SOURCE + ["describe.teacher.base_url=localhost:8000"], "describe.teacher.base_url must start with http"),
    (SOURCE + ["anchor.teacher.api_key_env=SYNTH_UNSET_VARIABLE"], "SYNTH_UNSET_VARIABLE.*not set"),
    (SOURCE + ["run.prompt_version=v0"], "run.prompt_version must name a folder"),
    (["sources=[{name: a, path: x, format: csv}]"], r"sources\[a\].format must be one of"),
    (SOURCE + ["sources.3.path=y"], r"sources is a list of 1 item\(s\), so '3' is not one of its items \(indexes "
                                    r"from 0 to 0\); set the whole list instead \(sources=\[...\]\)"),
    (["sources.0.path=y"], r"sources is not set here .*no item 0; set the whole list"),
    (SOURCE + ["reason"], "not of the form dotted.key=value"),
    (SOURCE + ["verify.keep_only_correct=false"], "verify.keep_only_correct is false .* set anchor.only_correct=false"),
    (SOURCE + ["output.dir=runs/x", "run.work_dir=runs/x/work"], r"run.work_dir \(.*runs/x/work\) lies inside "
                                                                 r"output.dir"),
])
def test_invalid_configs_name_the_field(overrides, message, monkeypatch):
    monkeypatch.delenv("SYNTH_UNSET_VARIABLE", raising=False)
    with pytest.raises(ValueError, match=message):
        load_config(SynthConfig, None, overrides)


@pytest.mark.parametrize("overrides, message", [
    # Found in review: these passed validation and every request was retried like a server that does not answer.
    (SOURCE + ["reason.teacher.base_url=http://"], r"^reason.teacher.base_url names no host: 'http://'"),
    (SOURCE + ["anchor.teacher.base_url=http://localhost:80OO/v1"],
     r"^anchor.teacher.base_url has a port that is not a number from 0 to 65535: 'http://localhost:80OO/v1'"),
    (SOURCE + ["describe.teacher.base_url=http://localhost:8000/v1?key=x"],
     r"^describe.teacher.base_url must not hold a query or fragment"),
    # Found in review: "stream" made every reply a stream of events, each retried: 7 paid generations per question.
    (SOURCE + ["reason.teacher.extra_body={stream: true}"],
     r"^reason.teacher.extra_body.stream is not allowed: the client reads one whole chat completion per request"),
    (SOURCE + ["reason.teacher.extra_body={n: 4}"], r"^reason.teacher.extra_body.n is not allowed"),
    (SOURCE + ["anchor.teacher.extra_body={max_tokens: 10}"],
     r"^anchor.teacher.extra_body.max_tokens is set by the client \(from anchor.teacher.max_tokens\)"),
    # Found in review: "geo" + record "test/1" and "geo/test" + record "1" both wrote the id "geo/test/1".
    (["sources=[{name: geo/test, path: x}]"], r"^sources\[\].name 'geo/test' holds '/', which separates the source "
                                              r"from the record id .*; rename the source, e.g. 'geo_test'$"),
    # Found in review: refused only by the writer, naming a record, after every teacher request was paid for.
    (SOURCE + ["output.system_prompt='Be brief.<|im_end|>'"],
     r"^output.system_prompt contains the literal special token '<\|im_end\|>'"),
])
def test_settings_that_would_fail_every_request_or_record_are_refused_before_any(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(SynthConfig, None, overrides)


@pytest.mark.parametrize("column, value", [("image_column", "img"), ("question_column", "prompt"),
                                           ("answer_column", "gt"), ("id_column", "uid")])
def test_a_column_setting_on_a_conversations_source_is_refused(column, value):
    """Found in review: a conversations source (the default format) accepted sources.0.image_column=img and read
    each record's own image anyway, recording the setting in the manifest as if it applied."""
    with pytest.raises(ValueError, match=re.escape(
            f'sources[a].{column}="{value}" has no effect with sources[a].format=conversations: only '
            f"sources[a].format=columns uses it") + ".*" + re.escape(f"Remove sources[a].{column}")):
        load_config(SynthConfig, None, SOURCE + [f"sources.0.{column}={value}"])
    # on a table source the setting is what it is for
    table = load_config(SynthConfig, None, SOURCE + ["sources.0.format=columns", f"sources.0.{column}={value}"])
    assert getattr(table.sources[0], column) == value
    # its default, written out (as a shared YAML might), changes nothing and stays accepted
    default = {field.name: field.default for field in dataclasses.fields(SourceConfig)}[column]
    assert getattr(SourceConfig(name="a", path="x", **{column: default}), column) == default


def test_overrides_reach_list_items_and_disabled_stages_skip_their_checks(monkeypatch):
    config = load_config(SynthConfig, None, SOURCE + ["sources.0.limit=5", "client.timeout_s=3", "anchor.enabled=false",
                                         "anchor.teacher.api_key_env=SYNTH_UNSET_VARIABLE"])
    assert config.sources[0].limit == 5 and config.client.timeout_s == 3.0 and not config.anchor.enabled


def test_a_wrong_type_names_the_key_the_value_and_where_it_was_set(tmp_path):
    config_file = tmp_path / "synth.yaml"
    config_file.write_text("sources:\n  - name: a\n    path: data.jsonl\n    limit: all\n"
                           "describe:\n  teacher:\n    temperature: warm\n")
    with pytest.raises(ValueError, match=rf'^sources.0.limit="all" \({config_file}:4\): expected an integer or '
                                         "null, got a string$"):
        load_config(SynthConfig, config_file)
    config_file.write_text("sources: [{name: a, path: data.jsonl}]\ndescribe:\n  teacher:\n    temperature: warm\n")
    with pytest.raises(ValueError, match=rf'^describe.teacher.temperature="warm" \({config_file}:4\): expected a '
                                         "number, got a string$"):
        load_config(SynthConfig, config_file)
    with pytest.raises(ValueError, match=r'^reason.teacher.max_tokens=2.5 \(override reason.teacher.max_tokens=2.5\)'
                                         ": expected an integer, got a non-integral number$"):
        load_config(SynthConfig, config_file, ["describe.teacher.temperature=0.1", "reason.teacher.max_tokens=2.5"])


def test_list_items_are_overridden_by_index_and_named_by_index(tmp_path):
    config_file = tmp_path / "synth.yaml"
    config_file.write_text("sources:\n  - {name: a, path: a.jsonl}\n  - {name: b, path: b.jsonl}\n")
    config = load_config(SynthConfig, config_file, ["sources.1.limit=7", "sources.0.format=columns"])
    assert [(s.name, s.format, s.limit) for s in config.sources] == [("a", "columns", None), ("b", "conversations", 7)]
    assert isinstance(config.sources, tuple)
    with pytest.raises(ValueError, match=r'^sources.1.limit="x" \(override sources.1.limit=x\): expected an integer'):
        load_config(SynthConfig, config_file, ["sources.1.limit=x"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) sources.0.pth; allowed in sources.0: answer_column"):
        load_config(SynthConfig, config_file, ["sources.0.pth=x"])
    with pytest.raises(ValueError, match=r"config key\(s\) sources.1.path must be set"):
        load_config(SynthConfig, config_file, ["sources.1={name: b}"])


def test_a_partial_teacher_section_keeps_the_stage_defaults_of_the_other_fields(tmp_path):
    config_file = tmp_path / "synth.yaml"
    config_file.write_text("sources: [{name: a, path: data.jsonl}]\n"
                           "describe:\n  teacher: {model: m}\nanchor:\n  teacher:\n    max_tokens: 64\n")
    config = load_config(SynthConfig, config_file, ["reason.teacher.top_p=0.9"])
    defaults = SynthConfig(sources=config.sources)
    assert config.describe.teacher == dataclasses.replace(defaults.describe.teacher, model="m")
    assert config.describe.teacher.temperature == 0.2  # DescribeConfig's default teacher, not TeacherConfig's 0.7
    assert config.anchor.teacher == dataclasses.replace(defaults.anchor.teacher, max_tokens=64)
    assert config.anchor.teacher.model == "Qwen/Qwen3-32B" and config.anchor.teacher.temperature == 0.3
    assert config.reason.teacher == dataclasses.replace(defaults.reason.teacher, top_p=0.9)
    assert config.reason.teacher.model == "Qwen/Qwen3-235B-A22B"
    empty = load_config(SynthConfig, None, SOURCE + ["describe.teacher={}"])
    assert empty.describe.teacher == defaults.describe.teacher


def test_cli_reports_bad_input_as_usage_error(tmp_path, capsys):
    assert main(["synth", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"avar synth: error: config file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err
    assert main(["synth", "sources=[{name: a, path: x}]", "run.executor=spark"]) == 2
    assert "run.executor must be one of" in capsys.readouterr().err


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["synth", "--print-config", "sources=[{name: a, path: x}]", "sources.0.limit=3",
                 "anchor.teacher.max_tokens=64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sources"][0] | {"limit": None} == {"name": "a", "path": "x", "format": "conversations",
                                                       "image_column": "image", "question_column": "question",
                                                       "answer_column": "answer", "id_column": None, "limit": None}
    assert printed["sources"][0]["limit"] == 3 and printed["anchor"]["teacher"]["temperature"] == 0.3


def test_prompts_are_versioned_templates():
    templates = load_prompts("v1")
    assert set(templates) == {"describe_system", "describe_user", "reason_system", "reason_user", "reason_description",
                              "anchor_system", "anchor_user"}
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
    assert strip_anchor_tags("a <anchor>Look again.</anchor> b <ANCHOR>Check.</ANCHOR>") == (
        "a Look again. b Check.", 2)
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


def test_a_manifest_left_half_written_by_a_kill_does_not_block_the_rerun(tmp_path):
    from megatron_avar import atomic_files
    from megatron_avar.synth.pipeline import MANIFEST, RUN_RECORD, prepare_output

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    atomic_files.replacing(out / MANIFEST).__enter__().write_text('{"kept": ')  # killed before the rename
    assert [p.name for p in out.iterdir() if p.name.startswith(f".{MANIFEST}.")]
    config = load_config(SynthConfig, None, SOURCE + [f"output.dir={out}", f"run.work_dir={tmp_path / 'work'}"])
    prepare_output(config)
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD]  # data of an unfinished run is redone
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\], which avar synth did not write"):
        prepare_output(config)
    assert (out / "notes.txt").read_text() == "the user's"
    # a dataset in the Hub's data/ layout is not an earlier run's shards, even without a manifest
    (out / "notes.txt").unlink()
    (out / "data").mkdir()
    (out / "data" / "train-00000-of-00001.parquet").write_bytes(b"the user's dataset")
    with pytest.raises(ValueError, match=r"holds \['data/train-00000-of-00001.parquet'\], which avar synth did not"):
        prepare_output(config)
    sourced = load_config(SynthConfig, None, [f"sources=[{{name: vqa, path: {out / 'data'}}}]", f"output.dir={out}",
                                              f"run.work_dir={tmp_path / 'work'}"])
    (out / "data" / "shard-0123456789abcdef.parquet").write_bytes(b"an earlier run's")
    (out / "data" / "train-00000-of-00001.parquet").rename(tmp_path / "kept.parquet")
    with pytest.raises(ValueError, match=r"source\(s\) \['vqa'\] lies inside output.dir"):
        prepare_output(sourced)
    assert (out / "data" / "shard-0123456789abcdef.parquet").is_file()
    prepare_output(config)  # an unfinished run's shards alone (of the settings it recorded): redone
    assert sorted(p.name for p in out.iterdir()) == [RUN_RECORD]


def test_teacher_replies_lose_their_thinking_and_wrappers_and_never_nest_the_response_tags():
    # a reasoning model behind a server without a reasoning parser: its <think> block is not the chain
    chain, predicted = parse_chain("<think>Let me see.\nMaybe 3?</think>\nThe bars are 2 and 2.\nFinal answer: 4")
    assert chain == "The bars are 2 and 2.\nFinal answer: 4" and predicted == "4"
    assert format_response(chain, predicted).count("<think>") == 1
    with pytest.raises(Malformed, match="ends inside its <think> block"):
        parse_chain("<think>Let me see, the bars are")
    with pytest.raises(Malformed, match="holds the tag <answer>"):
        parse_chain("The bars are 2 and 2.\nFinal answer: <answer>4</answer>")
    # a literal special token: the record would be refused by the dataset, failing the whole task at the writer
    for token in ("<|endoftext|>", "<|im_end|>"):
        with pytest.raises(Malformed, match=rf"holds the special token {re.escape(token)}"):
            parse_chain(f"The bars are 2 and 2.{token}\nFinal answer: 4")
        with pytest.raises(Malformed, match=rf"holds the special token {re.escape(token)}"):
            make_anchor_parser(1, "Two.\nFinal answer: 4")(
                f"<chain>Two. <anchor>Both 2.</anchor>{token}\nFinal answer: 4</chain>")
    parse = make_anchor_parser(1, "Two bars.\nFinal answer: 4")
    text, anchors = parse("Here is the rewritten chain:\n<chain>\nTwo bars. <anchor>Looking again, both are 2."
                          "</anchor>\nFinal answer: 4\n</chain>\nI hope this helps.")
    assert text == "Two bars. Looking again, both are 2.\nFinal answer: 4" and anchors == 1
    with pytest.raises(Malformed, match="2 <chain> blocks"):
        parse("<chain>a <anchor>b</anchor> Final answer: 1</chain><chain>c</chain>")
    assert parse_description("<think>hm</think>\n## Global scan\nA.\n## Elements\nB.\n## Relations\nC.\n"
                             "## Scene\nD.").startswith("## Global scan")


def test_a_kill_while_a_finished_run_is_moved_aside_is_completed_on_the_next_start(tmp_path):
    import json

    from megatron_avar.synth.output_dir import RUN_RECORD, run_identity
    from megatron_avar.synth.pipeline import MANIFEST, REPLACED, prepare_output

    out = tmp_path / "out"
    (out / REPLACED / "data").mkdir(parents=True)
    (out / "data").mkdir()
    listed = [{"file": f"data/shard-{name}.parquet", "records": 1} for name in ("a", "b", "c")]
    # killed after the manifest and shard a were moved: b and c are still in out/data, beside a shard d of nobody
    (out / REPLACED / MANIFEST).write_text(json.dumps({"shards": listed}))
    (out / REPLACED / "data" / "shard-a.parquet").write_bytes(b"a")
    for name in ("b", "c", "d"):
        (out / "data" / f"shard-{name}.parquet").write_bytes(name.encode())
    config = load_config(SynthConfig, None, SOURCE + [f"output.dir={out}", f"run.work_dir={tmp_path / 'work'}"])
    (out / RUN_RECORD).write_text(json.dumps({"identity": run_identity(config)}))  # (recorded before the move)
    prepare_output(config)  # (no overwrite needed: the run out/ holds is unfinished, and of these settings)
    assert sorted(p.name for p in (out / REPLACED / "data").iterdir()) == [f"shard-{x}.parquet" for x in "abc"]
    assert (out / REPLACED / "data" / "shard-b.parquet").read_bytes() == b"b"
    # the unlisted shard went with the unfinished run
    assert sorted(p.name for p in out.iterdir()) == [REPLACED, RUN_RECORD]
    # a finished replacement killed before it removed what it replaced: the leftover goes, the run stays
    (out / MANIFEST).write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="holds a finished run"):
        prepare_output(config)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


CHAIN = ("AB and BC are the legs: 3 and 4. By Pythagoras AC = sqrt(9+16) = 5.\n"
         "Wait, let me double-check: 9+16=25, sqrt 25 = 5. Correct.\nFinal answer: 5")
ANCHOR = "<anchor>Looking at the figure again, the legs are marked 3 and 4.</anchor>"


def test_an_anchor_rewrite_must_keep_the_chain_it_rewrites():
    """Found in review: a rewrite was never compared with its chain, so a reply cut down to two anchors and the answer
    line was kept (and verify.select=most_anchors preferred it to a faithful one), and a preamble before an unwrapped
    chain ("Sure! Here is the rewritten chain…") stayed in the training data. Outside its anchor spans a rewrite must
    have the chain's words, case, punctuation and whitespace aside."""
    parse = make_anchor_parser(1, CHAIN)
    inline = CHAIN.replace("3 and 4. By", f"3 and 4. {ANCHOR} By")
    assert parse(inline) == (inline.replace("<anchor>", "").replace("</anchor>", ""), 1)
    own_line = CHAIN.replace("\nFinal answer", f"\n{ANCHOR}\n{ANCHOR}\nFinal answer")
    assert parse(f"Here it is:\n<chain>\n{own_line}\n</chain>\nDone.")[1] == 2  # words around <chain> are dropped
    assert parse(own_line.replace("\n", "\n\n  "))[1] == 2  # whitespace is not text
    assert parse(inline.replace("Correct.", "**correct**"))[1] == 1  # nor are case, punctuation and emphasis
    for bad in [f"{ANCHOR} {ANCHOR}\nFinal answer: 5",                                 # the reasoning dropped
                f"Sure! Here is the rewritten chain with visual anchors:\n\n{inline}",  # a preamble
                inline.replace("Correct.", "Correct, as expected."),                     # words changed
                inline.replace("sqrt(9+16) = 5", "sqrt(9+16) = 6"),                     # a number changed
                inline.replace("sqrt(9+16)", "sqrt(9-16)"),                             # a sign changed
                CHAIN.replace("AB and BC are the legs: 3 and 4.",                       # a sentence of the chain
                              "<anchor>AB and BC are the legs: 3 and 4.</anchor>")]:    # tagged as an anchor
        with pytest.raises(Malformed, match="outside its <anchor> spans the rewrite is not the original chain"):
            parse(bad)


def test_the_reasoning_prompt_points_at_a_description_only_when_there_is_one():
    """Found in review: with describe.enabled=false the prompt still said "rely on the description below", followed
    by nothing. With a description the prompt is byte for byte v1's as released (its cache keys and resumed runs
    stay valid): the template below is v1's reason_user.txt before the sentence moved into the description block."""
    import string

    released = string.Template(
        "Solve the problem about an image. You cannot see the image; rely on the description below, which was written "
        "by a careful observer.\n\n$description_block\nQuestion:\n$question\n\nReason step by step. Along the way, "
        "question your own steps (\"wait, let me double-check ...\"), verify intermediate results, and fix any error "
        "you find. End with one final line of the form\nFinal answer: <answer>\nwhere <answer> is only the answer (a "
        "number, an expression, a word or an option letter), with nothing after it.")
    question, description = r"If $x = \frac{1}{2}$, what is {x}?", "## Global scan\nA chart.\n## Elements\n$5 bars."
    with_description = reason_messages("v1", question, description)[1]["content"]
    assert with_description == released.substitute(question=question,
                                                   description_block=f"Image description:\n{description}\n")
    without = reason_messages("v1", question, None)[1]["content"]
    assert "description" not in without and "cannot see" not in without
    assert without.startswith(f"Solve the problem about an image.\n\nQuestion:\n{question}\n\nReason step by step.")
