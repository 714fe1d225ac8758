"""Fixtures for the synthesis tests: a procedural source dataset with known answers, the fake teacher server
that knows those answers by image content (configs that point every teacher at it: synth_helpers), and a Ray
folder of a test's own."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from synth_fake_teacher import FakeTeacher
from synth_helpers import write_procedural_source


@pytest.fixture(scope="session")
def procedural_source(tmp_path_factory) -> tuple[Path, dict[str, str], list[dict]]:
    """(data.jsonl, facts: image sha256 -> answer, records) of an 8-task procedural dataset."""
    return write_procedural_source(tmp_path_factory.mktemp("procedural"))


@pytest.fixture
def teacher(procedural_source):
    with FakeTeacher(procedural_source[1]) as server:
        yield server


@pytest.fixture
def own_ray_tmpdir(monkeypatch) -> Path:
    """A Ray folder of the test's own (RAY_TMPDIR, for every Ray the test starts), so that synth_helpers.ray_processes
    finds what is left of the test's Ray and nothing of another test's. Short: Ray's unix sockets live under it."""
    path = Path(tempfile.mkdtemp(prefix="avar-ray-"))
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)
