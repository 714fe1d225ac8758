"""The conversation record format: loading (jsonl, json, parquet, folders), validation errors, round trips."""

import json

import pytest
import torch
from PIL import Image

from megatron_avar.data.conversations import load_conversations, to_chat_messages, write_conversations
from megatron_avar.processor import load_processor
from megatron_avar.roles import TokenRole, render_conversation


@pytest.fixture(scope="module")
def processor():
    return load_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), "red").save(tmp_path / "images" / "red.png")
    Image.new("RGB", (30, 90), "blue").save(tmp_path / "images" / "blue.png")
    return tmp_path


def _record(**overrides):
    record = {
        "id": "s1",
        "messages": [
            {"role": "user",
             "content": [{"type": "image", "image": "images/red.png"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "<think>It is red.</think><answer>red</answer>"},
        ],
        "answer": "red",
    }
    record.update(overrides)
    return record


def test_jsonl_loads_and_renders_like_the_inline_conversation(folder, processor):
    text_only = {"id": "s2", "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
                 "answer": 2}
    dataset = load_conversations(_write_jsonl(folder / "data.jsonl", [_record(metadata={"source": "toy"}), text_only]))
    assert len(dataset) == 2 and dataset[0]["id"] == "s1" and dataset[1]["answer"] == "2"
    assert json.loads(dataset[0]["metadata"]) == {"source": "toy"} and dataset[1]["images"] == []
    rendered = render_conversation(to_chat_messages(dataset[0]), processor)
    direct = render_conversation(_record()["messages"], processor, image_root=folder)
    assert torch.equal(rendered.input_ids, direct.input_ids) and torch.equal(rendered.pixel_values, direct.pixel_values)
    assert int((rendered.roles == TokenRole.IMAGE).sum()) > 0


def test_parquet_round_trip_embeds_images_and_survives_the_source_files(folder, processor):
    dataset = load_conversations(_write_jsonl(folder / "data.jsonl", [_record()]))
    original_row = dataset[0]
    original = render_conversation(to_chat_messages(original_row), processor)
    out = write_conversations(dataset, folder / "out" / "train.parquet")
    (folder / "images" / "red.png").unlink()  # the parquet must not depend on the original files
    reloaded = load_conversations(out)
    assert reloaded[0]["messages"] == original_row["messages"]
    from_parquet = render_conversation(to_chat_messages(reloaded[0]), processor)
    assert torch.equal(from_parquet.pixel_values, original.pixel_values)
    assert torch.equal(from_parquet.input_ids, original.input_ids)
    with pytest.raises(ValueError, match="overwrite=True"):
        write_conversations(reloaded, out)


def test_llava_style_placeholders_become_image_items(folder):
    record = {"id": "l1", "images": ["images/red.png", "images/blue.png"],
              "messages": [{"role": "user", "content": "<image>Left, <image> right: which is red?"},
                           {"role": "assistant", "content": "left"}]}
    row = load_conversations(_write_jsonl(folder / "d.jsonl", [record]))[0]
    assert [item["type"] for item in row["messages"][0]["content"]] == ["image", "text", "image", "text"]
    assert [image.size for image in row["images"]] == [(64, 48), (30, 90)]


def test_folder_of_files_loads_in_name_order(folder):
    _write_jsonl(folder / "b.jsonl", [_record(id="b")])
    _write_jsonl(folder / "a.jsonl", [_record(id="a")])
    assert load_conversations(folder)["id"] == ["a", "b"]


@pytest.mark.parametrize(
    "record, message",
    [
        (_record(answers="red"), r"unknown keys \['answers'\]"),
        (_record(messages=[{"role": "user", "content": [{"type": "image", "image": "images/none.png"}]}]),
         "image file not found"),
        # found in review: reported as "image file not found: http:/example.com/a.png"
        (_record(messages=[{"role": "user", "content": [{"type": "image", "image": "http://example.com/a.png"}]}]),
         "image http://example.com/a.png is a URL; images are read from files only"),
        (_record(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]),
         "empty assistant turn"),
        (_record(images=["images/red.png"], messages=[{"role": "user", "content": "no placeholder"}]),
         "0 '<image>' placeholders but 1 images"),
        (_record(messages=[{"role": "user", "content": "see <|image_pad|>"}]), "literal special token"),
        # found in review: tokenized as the EOS / pad id and trained on as a response token
        (_record(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|endoftext|>b"}]),
         "literal special token '<\\|endoftext\\|>', which the tokenizer turns into its end-of-text token"),
        ({"id": "x"}, "missing 'messages'"),
    ],
)
def test_bad_records_name_the_line_and_the_problem(folder, record, message):
    with pytest.raises(ValueError, match=message) as error:
        load_conversations(_write_jsonl(folder / "bad.jsonl", [_record(id="ok"), record]))
    assert "bad.jsonl line 2" in str(error.value)


def test_corrupt_image_duplicate_ids_and_bad_json_are_reported(folder):
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    broken = _record(messages=[{"role": "user", "content": [{"type": "image", "image": "images/broken.png"}]}])
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        load_conversations(_write_jsonl(folder / "c.jsonl", [broken]))
    with pytest.raises(ValueError, match="duplicate id 's1'"):
        load_conversations(_write_jsonl(folder / "c.jsonl", [_record(), _record()]))
    (folder / "c.jsonl").write_text(json.dumps(_record()) + "\n{not json\n")
    with pytest.raises(ValueError, match="c.jsonl line 2: not valid JSON"):
        load_conversations(folder / "c.jsonl")
    with pytest.raises(ValueError, match="data path not found"):
        load_conversations(folder / "nope.jsonl")


@pytest.mark.parametrize("suffix", ["jpg", "gif", "bmp", "tif", "webp"])
def test_a_truncated_image_is_caught_when_the_data_load(folder, suffix):
    """PIL's verify() reads only the headers of these formats: the half of a JPEG (found first), and in review of
    a GIF, BMP or TIFF, passed every check and failed at the step that drew it, hours into a run."""
    Image.effect_noise((96, 64), 64).convert("RGB").save(folder / "images" / f"full.{suffix}")
    data = (folder / "images" / f"full.{suffix}").read_bytes()
    (folder / "images" / f"half.{suffix}").write_bytes(data[: len(data) // 2])
    record = lambda path: _record(messages=[  # noqa: E731
        {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "x"}])
    assert len(load_conversations(_write_jsonl(folder / "ok.jsonl", [record(f"images/full.{suffix}")]))) == 1
    with pytest.raises(ValueError, match=rf"t.jsonl line 1: image file .*half.{suffix} is unreadable or corrupt"):
        load_conversations(_write_jsonl(folder / "t.jsonl", [record(f"images/half.{suffix}")]))


def test_the_hugging_face_vision_layout_loads_from_every_file_type(folder):
    """{"type": "image"} items with a top-level "images" list (TRL's vision SFT layout, and this project's canonical
    schema exported as JSON) loaded from parquet but were refused from jsonl as "0 '<image>' placeholders"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    record = {"id": "h1", "images": ["images/red.png"],
              "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    _write_jsonl(folder / "h.jsonl", [record])
    (folder / "h.json").write_text(json.dumps([record]))
    pq.write_table(pa.Table.from_pylist([record]), folder / "h.parquet")
    for name in ("h.jsonl", "h.json", "h.parquet"):
        row = load_conversations(folder / name)[0]
        assert [item["type"] for item in row["messages"][0]["content"]] == ["image", "text"], name
        assert [image.size for image in row["images"]] == [(64, 48)], name
    with pytest.raises(ValueError, match="1 image items but 2 entries in 'images'"):
        load_conversations(_write_jsonl(folder / "two.jsonl", [{**record, "images": ["images/red.png"] * 2}]))


def test_a_text_record_mentioning_the_llava_placeholder_survives_a_round_trip(folder):
    """A text-only record whose text mentions "<image>" loaded from jsonl, but the parquet `write_conversations`
    made of it was refused ("1 '<image>' placeholders but 0 images"): its empty 'images' column read as LLaVA."""
    record = {"id": "t1", "messages": [{"role": "user", "content": "In LLaVA, what does <image> stand for?"},
                                       {"role": "assistant", "content": "The image."}]}
    dataset = load_conversations(_write_jsonl(folder / "t.jsonl", [record]))
    out = write_conversations(dataset, folder / "out" / "t.parquet")
    assert load_conversations(out)[0]["messages"] == dataset[0]["messages"]
    dataset.save_to_disk(str(folder / "saved"))
    assert load_conversations(folder / "saved")[0]["messages"] == dataset[0]["messages"]
    with pytest.raises(ValueError, match="1 '<image>' placeholders but 0 images"):  # a LLaVA record stays checked
        load_conversations(_write_jsonl(folder / "l.jsonl", [{**record, "images": []}]))


@pytest.mark.parametrize("field, value, message", [
    ("answer", True, "'answer' must be a string or a finite number, got True"),
    ("answer", float("nan"), "'answer' must be a string or a finite number, got nan"),
    ("id", False, "'id' must be a string"),
])
def test_booleans_and_nan_are_not_answers_or_ids(folder, field, value, message):
    """Found in review: "answer": true loaded as the ground truth "True" (a bool passed the int check)."""
    with pytest.raises(ValueError, match=message):
        load_conversations(_write_jsonl(folder / "b.jsonl", [_record(**{field: value})]))


def test_an_image_path_too_long_for_the_file_system_is_named(folder):
    record = _record(messages=[{"role": "user", "content": [{"type": "image", "image": "x" * 5000 + ".png"}]},
                               {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match=r"p.jsonl line 1: image path .* cannot be read \(File name too long\)"):
        load_conversations(_write_jsonl(folder / "p.jsonl", [record]))


@pytest.mark.parametrize("messages, message", [
    (None, "messages must be a non-empty list of chat turns, got NoneType"),
    (3, "messages must be a non-empty list of chat turns, got int"),
    ('[{"role": "user", "content": "hi"}]', r"messages must be .* got str \(it is text: store the turns as a list"),
])
def test_messages_of_the_wrong_type_are_named_beside_images(folder, messages, message):
    record = {"id": "x", "messages": messages, "images": ["images/red.png"]}
    with pytest.raises(ValueError, match=rf"m.jsonl line 1: {message}"):
        load_conversations(_write_jsonl(folder / "m.jsonl", [record]))


def test_parquet_with_messages_as_json_text_is_named(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["x"], "messages": [json.dumps([{"role": "user", "content": "hi"}])]})
    pq.write_table(table, folder / "text.parquet")
    with pytest.raises(ValueError, match=r"text.parquet row 0: messages must be a non-empty list .* got str"):
        load_conversations(folder / "text.parquet")


def test_a_saved_dataset_is_validated_like_a_data_file(folder):
    """A `save_to_disk` folder used to be loaded unchecked: a bad image failed later, inside the stats pass."""
    from megatron_avar.data.conversations import undecoded

    dataset = load_conversations(_write_jsonl(folder / "data.jsonl", [_record(), _record(id="s2")]))
    dataset.save_to_disk(str(folder / "saved"))
    assert load_conversations(folder / "saved")["id"] == ["s1", "s2"]
    broken = undecoded(dataset).map(lambda row: {"images": [{"bytes": b"garbage", "path": None}]
                                                 if row["id"] == "s2" else row["images"]})
    broken.cast(dataset.features).save_to_disk(str(folder / "broken"))
    with pytest.raises(ValueError, match=r"broken row 1: embedded image bytes is unreadable or corrupt"):
        load_conversations(folder / "broken")


def test_the_shards_of_an_unfinished_synthesis_are_refused_and_of_a_finished_one_load(folder):
    """`avar synth` keeps OUT/.synth_run.json from before its first shard until after its manifest.json: shards
    beside the record alone are part of a dataset (a killed run loaded as a smaller one, without an error)."""
    from megatron_avar.data.synth_output import MANIFEST, RUN_RECORD

    out = folder / "out"
    shard = write_conversations(load_conversations(_write_jsonl(folder / "data.jsonl", [_record()])),
                                out / "data" / "shard-0.parquet")
    assert len(load_conversations(out / "data")) == 1  # no record: a folder of the user's, like any other
    (out / RUN_RECORD).write_text("{}")
    for path in (out / "data", shard, out):
        with pytest.raises(ValueError) as error:
            load_conversations(path)
        assert str(error.value) == (
            f"{path} is part of an unfinished `avar synth` run (output.dir {out} holds {RUN_RECORD} and no {MANIFEST}: "
            "the run is still going, or it was stopped or failed), so its shards are only part of the dataset; rerun "
            "the same `avar synth` command (same config) to resume and finish it (cached teacher answers are reused), "
            f"then load {out / 'data'}")
    (out / MANIFEST).write_text("{}")  # written last by a finished run, before it removes its record
    assert len(load_conversations(out / "data")) == len(load_conversations(shard)) == 1
