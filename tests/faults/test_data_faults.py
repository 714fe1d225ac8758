"""Fault injection (issue 16) on data files: a byte that is not UTF-8 and a decompression-bomb image are named by
file and line with the fix (before: a UnicodeDecodeError with no line, PIL's error with no file)."""

import json

import pytest
from PIL import Image

from megatron_avar.data.conversations import load_conversations


def _record(image: str, question: str = "How many shapes?") -> dict:
    return {"id": question, "messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": "<think>count</think><answer>3</answer>"}], "answer": "3"}


@pytest.fixture
def image_folder(tmp_path):
    Image.new("RGB", (64, 48), "white").save(tmp_path / "a.png")
    return tmp_path


def test_a_non_utf8_byte_in_a_jsonl_line_is_named_by_line_and_column(image_folder):
    lines = [json.dumps(_record("a.png", f"Question {i}?")).encode() for i in range(4)]
    lines[2] = lines[2].replace(b"Question 2?", b"Qu\xe9stion 2?")  # latin-1 e-acute
    (image_folder / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    column = lines[2].index(b"\xe9") + 1
    with pytest.raises(ValueError, match=rf"data\.jsonl line 3: byte 0xe9 at column {column} is not UTF-8; data "
                                         r"files must be UTF-8 \(re-encode the file"):
        load_conversations(image_folder / "data.jsonl")


def test_a_non_utf8_byte_in_a_json_file_is_named_by_line(image_folder):
    text = json.dumps([_record("a.png"), _record("a.png", "Which colour?")], indent=1).encode()
    text = text.replace(b"Which", b"Wh\xffich")
    (image_folder / "data.json").write_bytes(text)
    line = text[:text.index(b"\xff")].count(b"\n") + 1
    with pytest.raises(ValueError, match=rf"data\.json line {line}: byte 0xff at column \d+ is not UTF-8"):
        load_conversations(image_folder / "data.json")


def test_bad_json_in_a_json_file_is_named_by_line(image_folder):
    (image_folder / "data.json").write_text('[\n{"id": "a",\n "messages": ]\n')
    with pytest.raises(ValueError, match=r"data\.json line 3: not valid JSON"):
        load_conversations(image_folder / "data.json")


def test_a_decompression_bomb_image_is_refused_naming_the_record(image_folder, monkeypatch):
    # PIL refuses images over twice MAX_IMAGE_PIXELS; a small limit makes this 64x48 image one.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (image_folder / "data.jsonl").write_text(json.dumps(_record("a.png")) + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl line 1: image file .*a\.png is refused as a decompression "
                                         r"bomb \(.*\); downscale it"):
        load_conversations(image_folder / "data.jsonl")
