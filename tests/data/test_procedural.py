"""The procedural task generator: determinism, answers that really are in the pixels, config
validation, and the dataset writer's file format and overwrite safety.

The pixel checks read each image back with numpy only (connected components of exact colours, bar
heights from column counts, labels read by matching rendered glyphs) and recompute the answer from
what they read, never from the generator's bookkeeping.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from megatron_avar.data import procedural
from megatron_avar.data.procedural import (
    COLOURS,
    LINE_COLOUR,
    TASK_KINDS,
    ProceduralConfig,
    generate_task,
    generate_tasks,
    label_font,
    label_font_size,
    write_dataset,
)

REASONING_RE = re.compile(r"^<think>(.+?)</think>\s*<answer>(.+?)</answer>$", re.DOTALL)
IMAGE_SIZES = [(224, 224), (56, 56), (97, 143), (320, 180)]


# ------------------------------------------------------------------------ reading pixels back


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """8-connected components of a boolean mask as (ys, xs) index arrays: min-label propagation
    with pointer jumping, pure numpy."""
    height, width = mask.shape
    none = height * width
    labels = np.where(mask, np.arange(none).reshape(height, width), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        shifted = [padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(shifted), none)
        flat = new.ravel()
        new = np.where(mask, np.minimum(new, flat[np.minimum(new, none - 1)]), none)
        if np.array_equal(new, labels):
            break
        labels = new
    ys, xs = np.nonzero(mask)
    groups = defaultdict(list)
    for y, x, label in zip(ys, xs, labels[ys, xs]):
        groups[label].append((y, x))
    return [tuple(np.array(coords).T) for coords in groups.values()]


def _ink(rgb: np.ndarray) -> np.ndarray:
    """Text pixels: neutral grey to black (everything else drawn is tinted)."""
    rgb = rgb.astype(int)
    return (rgb.max(-1) - rgb.min(-1) <= 12) & (rgb.mean(-1) < 160)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


_TEMPLATES: dict[int, list[tuple[str, np.ndarray]]] = {}


def _templates(font_size: int) -> list[tuple[str, np.ndarray]]:
    """Every label text the generator could draw, rendered alone with the same public font."""
    if font_size not in _TEMPLATES:
        texts = ["?"] + [chr(ord("A") + i) for i in range(26)] + [str(n) for n in range(1, 200)]
        rendered = []
        for text in texts:
            canvas = Image.new("RGB", (8 * font_size, 3 * font_size), (255, 255, 255))
            ImageDraw.Draw(canvas).text((font_size, font_size), text, font=label_font(font_size), fill=(0, 0, 0))
            rendered.append((text, _crop(_ink(np.asarray(canvas)))))
        _TEMPLATES[font_size] = rendered
    return _TEMPLATES[font_size]


def _read_labels(image: Image.Image, font_size: int) -> list[tuple[str, float, float]]:
    """(text, centre x, centre y) of every label in the image that matches a rendered template
    exactly. Ink of one label is merged across the gaps this font leaves inside a number (up to
    ~0.3 x font size wide) and below the hook of "?" (~0.07 x font size high)."""
    ink = _ink(np.asarray(image))
    grouped = ink.copy()
    for shift in range(1, math.ceil(0.15 * font_size) + 1):
        grouped[:, shift:] |= ink[:, :-shift]
        grouped[:, :-shift] |= ink[:, shift:]
    spread = grouped.copy()
    for shift in range(1, math.ceil(0.04 * font_size) + 1):
        grouped[shift:] |= spread[:-shift]
        grouped[:-shift] |= spread[shift:]
    found = []
    for ys, xs in _components(grouped):
        piece = np.zeros_like(ink)
        piece[ys, xs] = True
        piece &= ink
        if not piece.any():
            continue
        glyphs = _crop(piece)
        matches = [text for text, template in _templates(font_size)
                   if template.shape == glyphs.shape and np.array_equal(template, glyphs)]
        if matches:
            assert len(matches) == 1, matches
            found.append((matches[0], float(xs.mean()), float(ys.mean())))
    return found


def _colour_mask(image: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(np.asarray(image) == np.array(colour, dtype=np.uint8), axis=-1)


def _check_count_colour(task, config) -> None:
    target = re.fullmatch(r"How many (\w+) shapes are in the image\?", task.question).group(1)
    num_shapes = len(_components(_colour_mask(task.image, COLOURS[target])))
    assert num_shapes == int(task.answer) >= 1
    others = [name for name in COLOURS if name != target and _colour_mask(task.image, COLOURS[name]).any()]
    assert others, "no distractor colour"


def _check_largest_shape(task, config) -> None:
    areas = {name: int(_colour_mask(task.image, colour).sum()) for name, colour in COLOURS.items()}
    for name, area in areas.items():
        if area:
            assert len(_components(_colour_mask(task.image, COLOURS[name]))) == 1, "colours must be distinct"
    first, second = sorted(areas.values(), reverse=True)[:2]
    assert max(areas, key=areas.get) == task.answer
    assert first >= 1.1 * second


def _check_bar_chart(task, config) -> None:
    bars = np.asarray(task.image).astype(int)
    saturated = (bars.max(-1) - bars.min(-1)) > 40
    counts = saturated.sum(axis=0)
    columns = np.nonzero(counts)[0]
    runs = np.split(columns, np.nonzero(np.diff(columns) > 1)[0] + 1)
    heights = [int(counts[run].max()) for run in runs]
    letters = _read_labels(task.image, label_font_size(config.image_size, config.difficulty))
    assert len(letters) == len(runs) >= 3
    letter_of_bar = []
    for run in runs:
        under = [text for text, x, _ in letters if run[0] <= x <= run[-1]]
        assert len(under) == 1, (under, run)
        letter_of_bar.append(under[0])
    order = sorted(range(len(runs)), key=lambda i: heights[i], reverse="tallest" in task.question)
    assert heights[order[0]] != heights[order[1]], "the extreme bar must be unique"
    assert letter_of_bar[order[0]] == task.answer


def _check_right_triangle(task, config) -> None:
    lines = _colour_mask(task.image, LINE_COLOUR)
    row = int(np.argmax(lines.sum(axis=1)))
    col = int(np.argmax(lines.sum(axis=0)))
    row_xs, col_ys = np.nonzero(lines[row])[0], np.nonzero(lines[:, col])[0]
    end_h = (row_xs.max() if abs(row_xs.max() - col) > abs(row_xs.min() - col) else row_xs.min(), row)
    end_v = (col, col_ys.max() if abs(col_ys.max() - row) > abs(col_ys.min() - row) else col_ys.min())
    run_x, run_y = abs(end_h[0] - col), abs(end_v[1] - row)

    def distance(point, start, end) -> float:
        p, a, b = (np.asarray(v, dtype=float) for v in (point, start, end))
        t = np.clip(np.dot(p - a, b - a) / np.dot(b - a, b - a), 0, 1)
        return float(np.linalg.norm(p - (a + t * (b - a))))

    sides = {"horizontal": ((col, row), end_h), "vertical": ((col, row), end_v), "hypotenuse": (end_h, end_v)}
    read = {}
    for text, x, y in _read_labels(task.image, label_font_size(config.image_size, config.difficulty)):
        side = min(sides, key=lambda s: distance((x, y), *sides[s]))
        assert side not in read, f"two labels next to the {side} side"
        read[side] = text
    numbers = {side: int(text) for side, text in read.items() if text != "?"}
    if "horizontal" in numbers and "vertical" in numbers:  # drawn to scale
        assert run_x / run_y == pytest.approx(numbers["horizontal"] / numbers["vertical"],
                                              rel=0.05 + 4 / min(run_x, run_y))

    question = task.question
    if "horizontal leg" in question or "vertical leg" in question:
        expected = numbers["horizontal" if "horizontal" in question else "vertical"]
    elif "hypotenuse" in question:
        assert read["hypotenuse"] == "?"
        expected = math.hypot(numbers["horizontal"], numbers["vertical"])
    elif "area" in question:
        assert "hypotenuse" not in read
        expected = numbers["horizontal"] * numbers["vertical"] / 2
    elif "perimeter" in question:
        assert "hypotenuse" not in read
        expected = numbers["horizontal"] + numbers["vertical"] + math.hypot(numbers["horizontal"], numbers["vertical"])
    else:
        assert "question mark" in question
        marked = [side for side, text in read.items() if text == "?"]
        assert marked in (["horizontal"], ["vertical"])
        known = numbers["vertical" if marked == ["horizontal"] else "horizontal"]
        expected = math.sqrt(numbers["hypotenuse"] ** 2 - known ** 2)
    assert float(task.answer) == pytest.approx(expected)


CHECKS = {"count_colour": _check_count_colour, "right_triangle": _check_right_triangle,
          "bar_chart": _check_bar_chart, "largest_shape": _check_largest_shape}


def test_every_kind_has_a_pixel_check():
    assert set(CHECKS) == set(TASK_KINDS)


# --------------------------------------------------------------------- the answer is in the image


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_answers_are_read_back_from_pixels(difficulty):
    config = ProceduralConfig(num_samples=24, seed=7, difficulty=difficulty)
    for task in generate_tasks(config):
        assert task.image.mode == "RGB" and task.image.size == config.image_size
        CHECKS[task.kind](task, config)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 10**6), difficulty=st.sampled_from([1, 2, 3]),
       kind=st.sampled_from(TASK_KINDS), image_size=st.sampled_from(IMAGE_SIZES))
def test_property_answer_in_pixels_for_any_seed_and_size(seed, index, difficulty, kind, image_size):
    config = ProceduralConfig(num_samples=1, seed=seed, difficulty=difficulty, image_size=image_size, kinds=(kind,))
    task = generate_task(kind, np.random.default_rng((seed, index)), config)
    assert task.image.size == image_size
    CHECKS[kind](task, config)
    assert not re.search(rf"\b{re.escape(task.answer)}\b", task.question)
    assert REASONING_RE.match(task.reasoning).group(2) == task.answer


def test_question_never_contains_answer_and_same_question_gets_different_answers():
    config = ProceduralConfig(num_samples=240, seed=1, difficulty=2)
    answers_by_question = defaultdict(set)
    for task in generate_tasks(config):
        assert not re.search(rf"\b{re.escape(task.answer)}\b", task.question), (task.question, task.answer)
        answers_by_question[(task.kind, task.question)].add(task.answer)
    for kind in TASK_KINDS:
        most_answers = max(len(answers) for (k, _), answers in answers_by_question.items() if k == kind)
        assert most_answers >= 3, f"{kind}: the same question text should get varied answers"


def test_different_seeds_give_different_answers_for_the_same_question():
    answers = defaultdict(set)
    for seed in range(12):
        for task in generate_tasks(ProceduralConfig(num_samples=4, seed=seed, difficulty=1)):
            answers[task.question].add(task.answer)
    bar_question = "Which bar in the chart is the tallest? Answer with its letter."
    assert len(answers[bar_question]) >= 2
    assert len(answers["What colour is the largest shape in the image?"]) >= 3


# ------------------------------------------------------------------------------------ determinism


def _fingerprint(task) -> tuple:
    return task.id, task.kind, task.question, task.answer, task.reasoning, task.png_bytes()


def test_same_config_gives_byte_identical_tasks():
    config = ProceduralConfig(num_samples=12, seed=3, difficulty=3)
    assert [_fingerprint(t) for t in generate_tasks(config)] == [_fingerprint(t) for t in generate_tasks(config)]


def test_sample_i_depends_only_on_seed_and_index():
    short = [_fingerprint(t) for t in generate_tasks(ProceduralConfig(num_samples=5, seed=9))]
    long = [_fingerprint(t) for t in generate_tasks(ProceduralConfig(num_samples=13, seed=9))]
    assert long[:5] == short
    other_seed = [_fingerprint(t) for t in generate_tasks(ProceduralConfig(num_samples=5, seed=10))]
    assert all(a[5] != b[5] for a, b in zip(short, other_seed))


def test_generate_task_is_a_function_of_the_rng_state():
    config = ProceduralConfig(difficulty=2)
    for kind in TASK_KINDS:
        first = generate_task(kind, np.random.default_rng(42), config)
        second = generate_task(kind, np.random.default_rng(42), config)
        assert _fingerprint(first) == _fingerprint(second)
        assert re.fullmatch(rf"{kind}-[0-9a-f]{{12}}", first.id)


def test_unknown_kind_in_generate_task_lists_known_kinds():
    with pytest.raises(ValueError, match="known kinds.*count_colour"):
        generate_task("pie_chart", np.random.default_rng(0), ProceduralConfig())


# -------------------------------------------------------------------------------------- reasoning


def test_reasoning_format_and_answer():
    tasks = list(generate_tasks(ProceduralConfig(num_samples=24, seed=5, difficulty=3)))
    for task in tasks:
        match = REASONING_RE.match(task.reasoning)
        assert match, task.reasoning
        assert match.group(2) == task.answer
        assert "Looking at the" in match.group(1)
        assert "<think>" not in match.group(1) and "<answer>" not in match.group(1)
    bare = next(generate_tasks(ProceduralConfig(num_samples=1, seed=5, with_reasoning=False)))
    assert bare.reasoning is None


# ---------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"seed": -1}, "seed"),
    ({"difficulty": 4}, r"difficulty must be one of 1, 2, 3"),
    ({"image_size": (55, 224)}, r"image_size .*\[56, 4096\]"),
    ({"image_size": (224,)}, "image_size"),
    ({"image_size": (224.0, 224)}, "image_size"),
    ({"kinds": ()}, "kinds"),
    ({"kinds": "bar_chart"}, "kinds"),
    ({"kinds": ("bar_chart", "pie_chart")}, r"unknown kind\(s\) \['pie_chart'\]; known kinds: \['count_colour'"),
    ({"kinds": ("bar_chart", "bar_chart")}, "repeat"),
    ({"with_reasoning": "yes"}, "with_reasoning"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ProceduralConfig(**overrides)


def test_config_accepts_yaml_lists_and_stores_tuples():
    config = ProceduralConfig(image_size=[100, 60], kinds=["bar_chart"])
    assert config.image_size == (100, 60) and config.kinds == ("bar_chart",)


# --------------------------------------------------------------------------------- write_dataset


def _read_dataset(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def test_write_dataset_records_and_images(tmp_path):
    config = ProceduralConfig(num_samples=6, seed=2, image_size=(128, 96))
    jsonl = write_dataset(config, tmp_path / "toy")
    assert jsonl == tmp_path / "toy" / "data.jsonl"
    records = _read_dataset(jsonl)
    tasks = list(generate_tasks(config))
    assert len(records) == len(tasks)
    for record, task in zip(records, tasks):
        assert set(record) == {"id", "messages", "answer", "metadata"}
        assert (record["id"], record["answer"]) == (task.id, task.answer)
        assert record["metadata"] == {"source": "procedural", "kind": task.kind, "difficulty": 1, "seed": 2}
        user, assistant = record["messages"]
        image_part, text_part = user["content"]
        assert user["role"] == "user" and image_part == {"type": "image", "image": f"images/{task.id}.png"}
        assert text_part == {"type": "text", "text": task.question}
        assert assistant == {"role": "assistant", "content": task.reasoning}
        image_file = jsonl.parent / image_part["image"]
        assert image_file.read_bytes() == task.png_bytes()
        with Image.open(image_file) as image:
            assert image.mode == "RGB" and image.size == (128, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"], "no temporary folders left behind"


def test_written_dataset_loads_with_the_project_loader(tmp_path):
    from megatron_avar.data.conversations import load_conversations

    config = ProceduralConfig(num_samples=4, seed=8)
    write_dataset(config, tmp_path / "ds")
    dataset = load_conversations(tmp_path / "ds")
    tasks = list(generate_tasks(config))
    assert dataset["id"] == [t.id for t in tasks] and dataset["answer"] == [t.answer for t in tasks]
    assert [json.loads(m)["kind"] for m in dataset["metadata"]] == [t.kind for t in tasks]


def test_write_dataset_without_reasoning_has_only_the_user_turn(tmp_path):
    jsonl = write_dataset(ProceduralConfig(num_samples=2, with_reasoning=False), tmp_path / "ds")
    for record in _read_dataset(jsonl):
        assert [m["role"] for m in record["messages"]] == ["user"]


def test_write_dataset_refuses_to_overwrite_and_keeps_old_data(tmp_path):
    out_dir = tmp_path / "ds"
    jsonl = write_dataset(ProceduralConfig(num_samples=3, seed=0), out_dir)
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=rf"{re.escape(str(out_dir))}.*overwrite=True"):
        write_dataset(ProceduralConfig(num_samples=3, seed=1), out_dir)
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before

    write_dataset(ProceduralConfig(num_samples=2, seed=1), out_dir, overwrite=True)
    records = _read_dataset(jsonl)
    assert [r["id"] for r in records] == [t.id for t in generate_tasks(ProceduralConfig(num_samples=2, seed=1))]
    assert len(list((out_dir / "images").iterdir())) == 2, "old images must not linger"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_write_dataset_never_replaces_a_folder_it_did_not_write(tmp_path):
    out_dir = tmp_path / "precious"
    (out_dir / "images").mkdir(parents=True)
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"\['notes.txt'\].*even with --overwrite"):
        write_dataset(ProceduralConfig(num_samples=1), out_dir, overwrite=True)
    assert (out_dir / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_write_dataset_never_replaces_a_file_of_the_users_among_its_images(tmp_path):
    """Found in review: only the top-level names were checked, so --overwrite deleted a user's images/mine.png."""
    out_dir = tmp_path / "ds"
    write_dataset(ProceduralConfig(num_samples=2), out_dir)
    (out_dir / "images" / "mine.png").write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"\['images/mine.png'\].*even with --overwrite"):
        write_dataset(ProceduralConfig(num_samples=2), out_dir, overwrite=True)
    assert (out_dir / "images" / "mine.png").read_bytes() == b"keep me"


def test_what_a_killed_write_left_is_cleaned_up_by_the_next(tmp_path):
    """Found in review: a `data generate` killed by SIGTERM left its staging folder (images of a partial dataset)
    beside --out for good; one killed between setting the old dataset aside and renaming the new one into place
    left no dataset at --out at all. The next write cleans the first up and puts the second back."""
    import subprocess
    import sys

    from megatron_avar import atomic_files

    out_dir = tmp_path / "ds"
    write_dataset(ProceduralConfig(num_samples=2), out_dir)
    before = {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()  # a process that has exited
    staging = Path(str(atomic_files.sibling_folder(out_dir, "tmp")).replace(f"-{os.getpid()}", f"-{pid}"))
    (staging / "images").mkdir(parents=True)
    aside = Path(str(atomic_files.sibling_folder(out_dir, "old")).replace(f"-{os.getpid()}", f"-{pid}"))
    out_dir.rename(aside)  # killed after setting the dataset aside, before the new one took its place
    with pytest.raises(ValueError, match="not empty"):
        write_dataset(ProceduralConfig(num_samples=3), out_dir)  # the dataset is back first: not replaced
    assert {p.relative_to(out_dir): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_written_dataset_has_default_permissions(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    write_dataset(ProceduralConfig(num_samples=1), tmp_path / "ds")
    assert (tmp_path / "ds").stat().st_mode == reference.stat().st_mode


def test_write_dataset_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    assert len(_read_dataset(write_dataset(ProceduralConfig(num_samples=2), tmp_path / "ds"))) == 2


def test_write_dataset_failure_midway_leaves_old_dataset_intact(tmp_path, monkeypatch):
    out_dir = tmp_path / "ds"
    write_dataset(ProceduralConfig(num_samples=3), out_dir)
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    real = procedural.generate_tasks

    def failing(config):
        for index, task in enumerate(real(config)):
            if index == 2:
                raise RuntimeError("disk full")
            yield task

    monkeypatch.setattr(procedural, "generate_tasks", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(ProceduralConfig(num_samples=5, seed=4), out_dir, overwrite=True)
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_write_dataset_rejects_a_file_as_out_dir(tmp_path):
    (tmp_path / "ds").write_text("not a folder")
    with pytest.raises(ValueError, match="not a directory"):
        write_dataset(ProceduralConfig(num_samples=1), tmp_path / "ds", overwrite=True)
