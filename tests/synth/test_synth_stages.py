"""Each stage's behaviour through the real client over HTTP, with the stages run in-process
(run.executor=local: the same stage objects Curator runs): malformed teacher output, timeouts, 429/500,
wrong answers, k candidates, dedup, column sources, the manifest's counts, and the SFT-ready output."""

from __future__ import annotations

import json
import logging
import re

import pytest
from datasets import Dataset, Image, List

from megatron_avar.data.conversations import load_conversations, to_chat_messages
from megatron_avar.synth.pipeline import run_synthesis
from synth_fake_teacher import Fault
from synth_helpers import synth_config

RESPONSE_FORMAT = re.compile(r"^<think>(.+)</think><answer>(.+)</answer>$", re.DOTALL)


def statuses(teacher, stage, match):
    return [r["status"] for r in teacher.requests(stage) if match in r["question"]]


def test_faults_in_every_stage_are_retried_or_filtered_and_counted(tmp_path, procedural_source, teacher):
    data, _, records = procedural_source
    teacher.slow_s = 1.0
    teacher.faults += [
        Fault("describe", ["malformed"], match="pink"),                 # fixed by the format retry
        Fault("describe", ["timeout"], match="brown"),                  # retried after the client's timeout
        Fault("describe", ["malformed"], match="largest", always=True),  # records 3, 7: describe.malformed
        Fault("reason", ["429", "500"], match="brown"),                 # retried
        Fault("reason", ["wrong"], match="vertical leg", always=True),  # records 1, 5: wrong answers
        Fault("anchor", ["malformed"], match="tallest", always=True),   # records 2, 6: anchor.malformed
        Fault("anchor", ["500"], match="brown", always=True),           # record 4: anchor.request_failed
    ]
    # Far above the default client.max_failed_share, accepted here: 2 of the describe stage's 8 requests get only
    # malformed answers, and 3 of the anchor stage's 4 end without a usable one (1 failed for good, 2 malformed).
    lossy = ["client.timeout_s=0.5", "client.max_failed_share=1"]
    config = synth_config(tmp_path, data, teacher, *lossy)
    manifest = run_synthesis(config)
    teacher.settle()

    assert manifest["filters"] == {"describe.malformed": 2, "verify.wrong_answer": 2, "anchor.malformed": 2,
                                   "anchor.request_failed": 1}
    assert manifest["read"] == 8 and manifest["kept"] == 1
    assert manifest["sources"]["proc"]["dropped"] == manifest["filters"]
    assert statuses(teacher, "describe", "pink") == ["malformed", "ok"]
    assert sorted(statuses(teacher, "describe", "brown")) == ["ok", "timeout"]
    assert statuses(teacher, "describe", "largest").count("malformed") == 4  # 2 records x (1 + format retry)
    assert statuses(teacher, "reason", "brown") == ["429", "500", "ok"]
    assert statuses(teacher, "anchor", "vertical leg") == []  # wrong chains are not sent for anchoring
    assert statuses(teacher, "anchor", "brown") == ["500"] * 4  # 1 + client.max_retries, then dropped
    stats = manifest["teachers"]
    assert stats["reason"]["retries"] == 2 and stats["anchor"]["failures"] == 1
    assert stats["anchor"]["errors"] == {"gave up after 4 attempts (last: HTTP 500)": 1}
    assert (stats["describe"]["usable"], stats["describe"]["malformed"]) == (6, 2)
    assert (stats["anchor"]["usable"], stats["anchor"]["malformed"]) == (1, 2)
    assert stats["anchor"]["malformed_reasons"] == {"unbalanced <anchor> tags": 2}
    assert manifest["tokens"]["spent"] == sum(s["prompt_tokens"] + s["completion_tokens"] for s in stats.values())

    # The kept record: the right one, in the AVAR format, anchors in the chain with their tags removed.
    dataset = load_conversations(tmp_path / "run" / "data")
    assert dataset["id"] == ["proc/" + records[0]["id"]] and dataset["answer"] == [records[0]["answer"]]
    response = dataset[0]["messages"][1]["content"][0]["text"]
    think, answer = RESPONSE_FORMAT.match(response).groups()
    assert answer == records[0]["answer"] and "Looking at the figure again" in think
    assert "<anchor>" not in response and "Final answer" not in think
    assert dataset[0]["messages"][0]["content"][1]["text"] == records[0]["messages"][0]["content"][1]["text"]
    image = (data.parent / records[0]["messages"][0]["content"][0]["image"]).read_bytes()
    assert dataset.cast_column("images", List(Image(decode=False)))[0]["images"][0]["bytes"] == image  # embedded
    metadata = json.loads(dataset[0]["metadata"])
    assert metadata["source"] == "proc" and metadata["synth"]["num_anchors"] == 1

    # A finished run is not overwritten by accident; with overwrite it is redone from the cache: the only
    # requests are those that failed before (failures are never cached).
    with pytest.raises(ValueError, match="finished run"):
        run_synthesis(config)
    before = len(teacher.requests())
    teacher.faults.clear()
    rerun = run_synthesis(synth_config(tmp_path, data, teacher, *lossy, "output.overwrite=true"))
    new = teacher.requests()[before:]
    assert {(r["stage"], r["question"]) for r in new} == {("anchor", records[4]["messages"][0]["content"][1]["text"])}
    assert rerun["kept"] == 2 and rerun["filters"]["describe.malformed"] == 2


def test_candidates_keep_the_best_correct_one(tmp_path, procedural_source, teacher, caplog):
    data, _, records = procedural_source
    caplog.set_level(logging.INFO, logger="megatron_avar.synth")
    teacher.faults.append(Fault("reason", ["wrong"], match="pink", seed=2, always=True))
    # The fake anchor teacher inserts 1 + seed % 3 anchors: candidates 0, 1 get 1, 2 anchors; 2 is wrong.
    overrides = ["sources.0.limit=1", "reason.num_candidates=3"]
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, *overrides, name="best"))
    chosen = json.loads(load_conversations(tmp_path / "best" / "data")[0]["metadata"])["synth"]
    assert manifest["kept"] == 1 and chosen == {"candidate": 1, "num_anchors": 2, "num_candidates": 3, "correct": True}
    assert sorted(r["seed"] for r in teacher.requests("reason")) == [0, 1, 2]
    assert sorted(r["seed"] for r in teacher.requests("anchor")) == [0, 1]  # the wrong candidate is not anchored
    # Progress: records in -> out per stage and the tokens spent (the final line, printed when the run ends).
    spent = manifest["tokens"]["spent"]
    assert re.search(rf"read 1 \| describe 1→1 \| reason 1→1 \| anchor 1→1 \| verify 1→1 \| write 1→1 \| "
                     rf"tokens spent {spent:,} \| ETA", caplog.text)

    requests = len(teacher.requests())
    run_synthesis(synth_config(tmp_path, data, teacher, *overrides, "verify.select=first", name="first"))
    first = json.loads(load_conversations(tmp_path / "first" / "data")[0]["metadata"])["synth"]
    assert first["candidate"] == 0 and len(teacher.requests()) == requests  # all answers came from the cache


def test_disabled_filter_keeps_wrong_answers(tmp_path, procedural_source, teacher):
    data, _, records = procedural_source
    teacher.faults.append(Fault("reason", ["wrong"], match="pink", always=True))
    overrides = ["sources.0.limit=1", "verify.keep_only_correct=false", "anchor.only_correct=false",
                 "anchor.enabled=false"]
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, *overrides))
    row = load_conversations(tmp_path / "run" / "data")[0]
    assert manifest["kept"] == 1 and teacher.requests("anchor") == []
    assert row["messages"][1]["content"][0]["text"].endswith(f"<answer>{int(records[0]['answer']) + 1}</answer>")
    assert json.loads(row["metadata"])["synth"]["correct"] is False


def test_dedup_and_column_sources(tmp_path, procedural_source, teacher):
    data, _, records = procedural_source
    # A flat table with other column names, its images by relative path; one row has no answer.
    table = tmp_path / "table" / "rows.jsonl"
    table.parent.mkdir()
    (table.parent / "images").symlink_to(data.parent / "images")
    rows = [{"picture": r["messages"][0]["content"][0]["image"], "prompt": r["messages"][0]["content"][1]["text"],
             "gt": r["answer"], "uid": f"t{i}"} for i, r in enumerate(records[:3])]
    rows[2]["gt"] = None
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # An HF dataset saved to disk, its image as an Image feature.
    saved = tmp_path / "saved"
    record = records[3]
    Dataset.from_dict({"image": [str(data.parent / record["messages"][0]["content"][0]["image"])],
                       "question": [record["messages"][0]["content"][1]["text"]], "answer": [record["answer"]]}
                      ).cast_column("image", Image()).save_to_disk(str(saved))
    sources = (f"sources=[{{name: proc, path: '{data}', limit: 2}}, {{name: copy, path: '{data}', limit: 3}}, "
               f"{{name: table, path: '{table}', format: columns, image_column: picture, question_column: prompt, "
               f"answer_column: gt, id_column: uid}}, {{name: hf, path: '{saved}', format: columns}}]")
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, sources))
    assert (manifest["sources"]["proc"]["read"], manifest["sources"]["proc"]["kept"]) == (2, 2)
    assert manifest["sources"]["copy"]["dropped"] == {"read.duplicate": 2} and manifest["sources"]["copy"]["kept"] == 1
    assert manifest["sources"]["table"]["dropped"] == {"read.duplicate": 2, "read.invalid": 1}
    assert manifest["sources"]["copy"]["tokens_spent"] > 0 and manifest["kept"] == 4
    assert len(teacher.requests("describe")) == 4  # duplicates and invalid rows cost nothing
    assert sorted(load_conversations(tmp_path / "run" / "data")["id"]) == sorted(
        ["proc/" + records[0]["id"], "proc/" + records[1]["id"], "copy/" + records[2]["id"], "hf/hf-0"])


def test_output_is_sft_ready(tmp_path, procedural_source, teacher):
    """The written shards load with the SFT data loader and render with exact token roles."""
    import torch

    from megatron_avar.processor import load_processor
    from megatron_avar.roles import TokenRole, render_conversation
    from megatron_avar.training.sft_data import SFTDataConfig, SFTDataLoader

    data, _, records = procedural_source
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, "sources.0.limit=4",
                                          "output.system_prompt='Be careful.'"))
    assert manifest["kept"] == 4
    processor = load_processor(reasoning_tokens=True)
    dataset = load_conversations(tmp_path / "run" / "data")
    think_id = processor.tokenizer.convert_tokens_to_ids("<think>")
    for row in dataset:
        rendered = render_conversation(to_chat_messages(row), processor)
        response_ids = rendered.input_ids[rendered.roles == TokenRole.RESPONSE]
        assert response_ids[0] == think_id and (rendered.roles == TokenRole.SYSTEM).any()
        assert (rendered.roles == TokenRole.IMAGE).sum() > 0
    loader = SFTDataLoader(SFTDataConfig(path=str(tmp_path / "run" / "data"), seq_length=1024), processor,
                           global_batch_size=1)
    step = next(iter(loader))
    batch = step.microbatches[0]
    assert step.num_loss_tokens > 0 and batch.pixel_values is not None
    assert torch.isin(torch.tensor(think_id), batch.input_ids)


def test_read_refuses_what_the_writer_would_refuse_before_any_request(tmp_path, caplog):
    from PIL import Image as PILImage

    from megatron_avar.synth.config import SourceConfig
    from megatron_avar.synth.records import read_sources

    folder = tmp_path / "src"
    folder.mkdir()
    PILImage.new("RGB", (64, 48), (200, 30, 30)).save(folder / "good.png")
    PILImage.new("RGB", (640, 480), (30, 200, 30)).save(folder / "whole.jpg", quality=95)
    jpeg = (folder / "whole.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # PIL's verify() reads only a JPEG's headers
    rows = [{"image": "good.png", "question": "<image>What colour?", "answer": "red", "uid": "a"},
            {"image": "cut.jpg", "question": "What colour?", "answer": "green", "uid": "b"},
            {"image": "good.png", "question": 7, "answer": "red", "uid": "c"}]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = SourceConfig(name="t", path=str(folder / "rows.jsonl"), format="columns", id_column="uid")
    with caplog.at_level(logging.WARNING, logger="megatron_avar.synth"):
        read = read_sources((source,), tmp_path / "images", dedup=True)
    assert [r["drop_reason"] for r in read] == [None, "read.invalid", "read.invalid"]
    assert read[0]["question"] == "What colour?"  # a LLaVA-style placeholder is not question text
    assert "unreadable or corrupt" in json.loads(read[1]["metadata"])["invalid"]
    assert "the question is a int" in json.loads(read[2]["metadata"])["invalid"]
    assert "source t: 2 of 3 records unusable (read.invalid), e.g. t/b: image" in caplog.text
    # the same id twice: the written dataset could not be loaded, so the read stops before any request
    rows[2].update(question="Which shape?", uid="a")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"source t: records 0 and 2 have the same id 'a' \(column 'uid'\)"):
        read_sources((source,), tmp_path / "images", dedup=True)
    # nothing usable: a wrong column or folder, not a dataset to pay teachers for
    (folder / "rows.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="source t: none of its 1 records is usable"):
        read_sources((source,), tmp_path / "images", dedup=True)


def test_ids_repeated_across_sources_are_refused_before_any_request(tmp_path):
    """Found in review: ids are "<source>/<record id>", so "geo" + "test/1" and "geo/test" + "1" collided (one
    record overwrote the other's shard, or the dataset was refused later). A "/" in a source name is refused by the
    config (test_synth_config); the read refuses any id two sources give, naming both."""
    import dataclasses

    from PIL import Image as PILImage

    from megatron_avar.synth.config import SourceConfig
    from megatron_avar.synth.records import read_sources

    PILImage.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    for name, uid in (("one", "test/1"), ("two", "1")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": "a.png", "question": f"Q {name}?", "answer": "1",
                                                            "uid": uid}) + "\n")
    geo = SourceConfig(name="geo", path=str(tmp_path / "one.jsonl"), format="columns", id_column="uid")
    geo_test = dataclasses.replace(geo, name="other", path=str(tmp_path / "two.jsonl"))
    object.__setattr__(geo_test, "name", "geo/test")  # past the config's check: the read's own holds too
    with pytest.raises(ValueError, match=r"^sources geo \(record 0\) and geo/test \(record 0\) both give the id "
                                         r"'geo/test/1'; the written dataset needs unique ids: rename a source$"):
        read_sources((geo, geo_test), tmp_path / "images", dedup=True)


@pytest.mark.parametrize("file_name, content, message", [
    ("rows.csv", "image,question,answer\na.png,q,1\n", r"^source t: .*/rows.csv is not a .jsonl/.json/.parquet file; "
                                                      "format columns reads those"),
    ("rows.jsonl", '{"image": "a.png", "question": "q", "answer": 1}\n{"image": ',
     r"^source t: cannot read .*/rows.jsonl as a table \(ArrowInvalid: JSON parse error: .* in row 1\); check the "
     r"file, or set sources\[\].format$")])
def test_a_column_source_that_is_no_table_is_named_in_one_line(tmp_path, file_name, content, message):
    """Found in review: a .csv file or invalid JSON gave an 85-line traceback of datasets' internals."""
    from megatron_avar.synth.config import SourceConfig
    from megatron_avar.synth.records import read_sources

    (tmp_path / file_name).write_text(content)
    source = SourceConfig(name="t", path=str(tmp_path / file_name), format="columns")
    with pytest.raises(ValueError, match=message) as error:
        read_sources((source,), tmp_path / "images", dedup=True)
    assert "\n" not in str(error.value)


def test_gutted_anchor_rewrites_and_replies_cut_short_are_dropped_and_named(tmp_path, procedural_source, teacher):
    """Found in review: an anchor rewrite cut down to its anchors and answer line was kept (and preferred by
    verify.select=most_anchors), and a description cut at max_tokens with its four headings was used and cached."""
    data, _, records = procedural_source
    teacher.faults += [Fault("anchor", ["gutted"], match="pink", always=True),
                       Fault("describe", ["cut_text"], match="brown", always=True)]
    manifest = run_synthesis(synth_config(tmp_path, data, teacher, "client.max_failed_share=1"))
    assert manifest["filters"] == {"anchor.malformed": 1, "describe.request_failed": 1} and manifest["kept"] == 6
    stats = manifest["teachers"]
    assert stats["anchor"]["malformed_reasons"] == {"outside its <anchor> spans the rewrite is not the original chain "
                                                    "(reasoning dropped or changed, or words added)": 1}
    assert stats["describe"]["errors"] == {
        "the reply was cut at max_tokens=4096 (raise describe.teacher.max_tokens)": 1}
    assert statuses(teacher, "anchor", "pink") == ["gutted"] * 2  # a format retry with another seed, then dropped
    assert statuses(teacher, "describe", "brown") == ["cut_text"]  # the same request would be cut the same way
