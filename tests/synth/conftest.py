"""Fixtures for the synthesis tests: a procedural source dataset with known answers, the fake teacher
server that knows those answers by image content, and configs that point every teacher at it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from megatron_avar.data.procedural import ProceduralConfig, write_dataset
from synth_fake_teacher import FakeTeacher

NUM_SAMPLES = 8


@pytest.fixture(scope="session")
def procedural_source(tmp_path_factory) -> tuple[Path, dict[str, str], list[dict]]:
    """(data.jsonl, facts: image sha256 -> answer, records) of an 8-task procedural dataset."""
    root = tmp_path_factory.mktemp("procedural")
    data = write_dataset(ProceduralConfig(num_samples=NUM_SAMPLES, seed=0), root / "src")
    records = [json.loads(line) for line in data.read_text().splitlines()]
    facts = {}
    for record in records:
        image = data.parent / record["messages"][0]["content"][0]["image"]
        facts[hashlib.sha256(image.read_bytes()).hexdigest()] = record["answer"]
    return data, facts, records


@pytest.fixture
def teacher(procedural_source):
    with FakeTeacher(procedural_source[1]) as server:
        yield server
