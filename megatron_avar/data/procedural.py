"""Procedural visual-reasoning tasks: small PIL images whose answer can only be read from the picture.

The data source for the toy-scale quickstart, CPU tests and demos. Each task kind draws one image and
asks a question whose text never contains the answer (the same question text gets different answers
from different samples); the answer is a short string math-verify can grade (an integer, a decimal, a
letter or a colour word). Optionally a reference reasoning chain in the AVAR format
``<think>…</think><answer>…</answer>`` describes what is visible, with visual anchors
("Looking at the image again, ...").

Task kinds (``TASK_KINDS``):
  count_colour    flat shapes on a grid of cells; "How many red shapes are in the image?"
  right_triangle  a right triangle drawn to scale with labelled sides; read a leg (difficulty 1),
                  hypotenuse or area (2), the side marked "?" or the perimeter (3)
  bar_chart       bars labelled A, B, C, ...; which bar is the tallest (or, at difficulty 3, shortest)
  largest_shape   shapes of distinct colours; "What colour is the largest shape in the image?"

Determinism: sample ``i`` is drawn from ``numpy.random.default_rng((seed, i))`` and its kind is
``kinds[i % len(kinds)]``, so it depends only on (config, i): generating 10 or 100 samples gives the
same first 10. Shapes are drawn without anti-aliasing (exact colours); text uses Pillow's bundled
font (no system font), so PNG bytes are identical for the same numpy and Pillow versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from megatron_avar import atomic_files
from megatron_avar.data.drawing import (  # noqa: F401  (re-exported: tests and users read the palette and fonts here)
    AXIS_COLOUR,
    BACKGROUND,
    COLOURS,
    GRID_COLOUR,
    LINE_COLOUR,
    draw_label,
    draw_shape,
    grid_cells,
    grid_shape,
    join_words,
    label_box,
    label_font,
    label_font_size,
    place_in_cell,
    position_word,
    shape_area,
    with_article,
    wrap_reasoning,
)

SHAPES = ("circle", "square", "triangle")
TASK_KINDS: tuple[str, ...] = ("count_colour", "right_triangle", "bar_chart", "largest_shape")
_IMAGE_NAME = re.compile(rf"({'|'.join(TASK_KINDS)})-s\d+-\d{{6,}}\.png")  # images/<task id>.png (generate_tasks)
MIN_IMAGE_SIDE = 56
MAX_IMAGE_SIDE = 4096


@dataclasses.dataclass(frozen=True)
class ProceduralConfig:
    """What to generate. Validated once on construction; lists are accepted for the tuple fields
    (YAML) and stored as tuples."""

    num_samples: int = 64
    """Number of tasks generate_tasks yields (>= 1)."""
    seed: int = 0
    """Base seed (>= 0); sample i uses the random stream (seed, i)."""
    image_size: tuple[int, int] = (224, 224)
    """(width, height) in pixels, each in [56, 4096]; need not be a multiple of the patch size."""
    difficulty: int = 1
    """1, 2 or 3: more shapes/bars, more distractor colours, smaller gaps, smaller labels and harder
    questions as it grows."""
    kinds: tuple[str, ...] = TASK_KINDS
    """Task kinds to cycle through (sample i gets kinds[i % len(kinds)]); names from TASK_KINDS, no
    repeats."""
    with_reasoning: bool = True
    """Attach a reference <think>…</think><answer>…</answer> chain to every task."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "seed", "difficulty"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"ProceduralConfig.{name} must be an int, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy ints -> int (JSON)
        if self.num_samples < 1:
            raise ValueError(f"ProceduralConfig.num_samples must be >= 1, got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"ProceduralConfig.seed must be >= 0, got {self.seed}")
        if self.difficulty not in (1, 2, 3):
            raise ValueError(f"ProceduralConfig.difficulty must be one of 1, 2, 3, got {self.difficulty}")
        size = self.image_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_int(s) for s in size)
                or not all(MIN_IMAGE_SIDE <= s <= MAX_IMAGE_SIDE for s in size)):
            raise ValueError(f"ProceduralConfig.image_size must be (width, height) with integers in "
                             f"[{MIN_IMAGE_SIDE}, {MAX_IMAGE_SIDE}], got {size!r}")
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        if isinstance(self.kinds, str) or not isinstance(self.kinds, (tuple, list)) or not self.kinds:
            raise ValueError(f"ProceduralConfig.kinds must be a non-empty tuple of names from "
                             f"{list(TASK_KINDS)}, got {self.kinds!r}")
        unknown = [k for k in self.kinds if k not in TASK_KINDS]
        if unknown:
            raise ValueError(f"ProceduralConfig.kinds has unknown kind(s) {unknown}; known kinds: "
                             f"{list(TASK_KINDS)}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"ProceduralConfig.kinds must not repeat a kind, got {list(self.kinds)}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not isinstance(self.with_reasoning, bool):
            raise ValueError(f"ProceduralConfig.with_reasoning must be True or False, "
                             f"got {self.with_reasoning!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, eq=False)
class ProceduralTask:
    """One generated task. `reasoning` is None unless the config asked for it; when present it is
    `<think>…</think><answer>{answer}</answer>`."""

    id: str
    kind: str
    image: Image.Image  # RGB, config.image_size
    question: str
    answer: str
    reasoning: str | None

    def png_bytes(self) -> bytes:
        """The image as PNG bytes (deterministic: no timestamps or metadata)."""
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


# ------------------------------------------------------------------------------------- task kinds
# Each returns (image, question, answer, think) for one sample.

TaskParts = tuple[Image.Image, str, str, str]


def _count_colour(rng: np.random.Generator, config: ProceduralConfig) -> TaskParts:
    difficulty, image_size = config.difficulty, config.image_size
    cells_per_side = {1: 3, 2: 4, 3: 5}[difficulty]
    num_colours = {1: 2, 2: 4, 3: 6}[difficulty]
    max_target = {1: 4, 2: 6, 3: 9}[difficulty]
    shapes = SHAPES[:2] if difficulty == 1 else SHAPES
    palette = [str(name) for name in rng.choice(list(COLOURS), size=num_colours, replace=False)]
    target = palette[0]

    columns, rows = grid_shape(image_size, cells_per_side)
    num_cells = columns * rows
    num_shapes = int(rng.integers(max(2, num_cells // 3), max(3, round(num_cells * 0.8)) + 1))
    assert num_shapes <= num_cells, (num_shapes, num_cells)
    num_target = int(rng.integers(1, min(max_target, num_shapes - 1) + 1))
    colours = [target] * num_target + [str(c) for c in rng.choice(palette[1:], size=num_shapes - num_target)]
    colours = [colours[i] for i in rng.permutation(num_shapes)]

    image = Image.new("RGB", image_size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    found = []
    for cell, colour in zip(grid_cells(rng, image_size, cells_per_side, num_shapes), colours):
        size = max(4, int(min(cell[2], cell[3]) * rng.uniform(0.45, 0.8)))
        shape = str(rng.choice(shapes))
        cx, cy = place_in_cell(rng, cell, size)
        draw_shape(draw, shape, cx, cy, size, COLOURS[colour])
        if colour == target:
            found.append(f"{with_article(shape)} ({position_word(cx, cy, image_size)})")

    used = [c for c in palette if c in colours]
    answer = str(num_target)
    total = "there is 1" if num_target == 1 else f"there are {answer}"
    think = (f"The question asks for the number of {target} shapes. The image shows {num_shapes} shapes in "
             f"{len(used)} colours: {join_words(used)}. Scanning the image row by row from the top, the {target} "
             f"shapes are: {join_words(found)}. Looking at the image again to check for {target} shapes I might "
             f"have missed, there are no others, so {total} {target} shape{'' if num_target == 1 else 's'}.")
    return image, f"How many {target} shapes are in the image?", answer, think


# Primitive Pythagorean triples with leg ratio <= 2.4, so the drawn triangle stays readable.
_TRIPLES = ((3, 4, 5), (5, 12, 13), (8, 15, 17), (20, 21, 29))
_TRIANGLE_QUESTIONS = {1: ("horizontal_leg", "vertical_leg"), 2: ("hypotenuse", "area"),
                       3: ("marked_side", "perimeter")}


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _draw_right_triangle(image_size: tuple[int, int], horizontal: int, vertical: int, corner: str,
                         labels: dict[str, str | None], font_size: int) -> Image.Image:
    """A right triangle drawn to scale (legs `horizontal` x `vertical` units, right angle at `corner`,
    e.g. "bottom left"), with a right-angle mark and each side's label (None: unlabelled) outside it."""
    width, height = image_size
    line_width = max(1, round(min(image_size) / 112))
    gap, pad = 3 + line_width, 3
    label_w = max(label_box(text, font_size)[0] for text in labels.values() if text)
    label_h = label_box("0", font_size)[1]
    # The leg labels sit outside the legs, on the right angle's side; the hypotenuse label sits in
    # the empty half of the triangle's bounding box, so only the legs' sides need a label margin.
    free_w, free_h = width - label_w - gap - 2 * pad, height - label_h - gap - 2 * pad
    px_per_unit = min(free_w / horizontal, free_h / vertical)
    run_x, run_y = horizontal * px_per_unit, vertical * px_per_unit
    sign_x = 1 if "left" in corner else -1  # direction from the right angle along the horizontal leg
    sign_y = -1 if "bottom" in corner else 1  # direction from the right angle along the vertical leg
    left = pad + (free_w - run_x) / 2 + (label_w + gap if sign_x > 0 else 0)
    top = pad + (free_h - run_y) / 2 + (label_h + gap if sign_y > 0 else 0)
    right_angle = (round(left if sign_x > 0 else left + run_x), round(top + run_y if sign_y < 0 else top))
    end_h = (round(right_angle[0] + sign_x * run_x), right_angle[1])
    end_v = (right_angle[0], round(right_angle[1] + sign_y * run_y))

    image = Image.new("RGB", image_size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.line([right_angle, end_h, end_v, right_angle], fill=LINE_COLOUR, width=line_width, joint="curve")
    mark = max(3, round(min(run_x, run_y) * 0.12))
    draw.line([(right_angle[0] + sign_x * mark, right_angle[1]),
               (right_angle[0] + sign_x * mark, right_angle[1] + sign_y * mark),
               (right_angle[0], right_angle[1] + sign_y * mark)], fill=LINE_COLOUR, width=1)
    if labels["horizontal"]:
        box_w, box_h = label_box(labels["horizontal"], font_size)
        draw_label(draw, labels["horizontal"], ((right_angle[0] + end_h[0]) / 2,
                    right_angle[1] - sign_y * (box_h / 2 + gap)), font_size)
    if labels["vertical"]:
        box_w, box_h = label_box(labels["vertical"], font_size)
        draw_label(draw, labels["vertical"], (right_angle[0] - sign_x * (box_w / 2 + gap),
                    (right_angle[1] + end_v[1]) / 2), font_size)
    if labels["hypotenuse"]:
        box_w, box_h = label_box(labels["hypotenuse"], font_size)
        normal_x, normal_y = sign_x * run_y, sign_y * run_x  # points away from the right angle
        norm = math.hypot(normal_x, normal_y)
        normal_x, normal_y = normal_x / norm, normal_y / norm
        offset = abs(normal_x) * box_w / 2 + abs(normal_y) * box_h / 2 + gap
        draw_label(draw, labels["hypotenuse"], ((end_h[0] + end_v[0]) / 2 + normal_x * offset,
                    (end_h[1] + end_v[1]) / 2 + normal_y * offset), font_size)
    return image


def _right_triangle(rng: np.random.Generator, config: ProceduralConfig) -> TaskParts:
    difficulty, image_size = config.difficulty, config.image_size
    question_type = str(rng.choice(_TRIANGLE_QUESTIONS[difficulty]))
    if question_type in ("hypotenuse", "marked_side", "perimeter"):
        base = _TRIPLES[int(rng.integers(len(_TRIPLES)))]
        scale = int(rng.integers(1, max(1, 60 // base[2]) + 1))
        leg_a, leg_b, hyp = (scale * s for s in base)
    else:
        while True:
            leg_a, leg_b = (int(v) for v in rng.integers(2, 31, size=2))
            if max(leg_a, leg_b) <= 3 * min(leg_a, leg_b):
                break
        hyp = math.hypot(leg_a, leg_b)
    horizontal, vertical = (leg_a, leg_b) if rng.random() < 0.5 else (leg_b, leg_a)
    corner = "bottom left" if difficulty == 1 else str(
        rng.choice(["bottom left", "bottom right", "top left", "top right"]))

    hidden = "vertical" if rng.random() < 0.5 else "horizontal"
    labels = {"horizontal": str(horizontal), "vertical": str(vertical), "hypotenuse": None}
    if question_type == "hypotenuse":
        labels["hypotenuse"] = "?"
    elif question_type == "marked_side":
        labels["hypotenuse"], labels[hidden] = str(hyp), "?"
    image = _draw_right_triangle(image_size, horizontal, vertical, corner, labels,
                                 label_font_size(image_size, difficulty))

    seen = (f"The image shows a right triangle; the small square marks the right angle at the {corner}. ")
    legs = f"The horizontal leg is labelled {horizontal} and the vertical leg is labelled {vertical}. "
    if question_type in ("horizontal_leg", "vertical_leg"):
        side = question_type.split("_")[0]
        answer = str(horizontal if side == "horizontal" else vertical)
        question = f"What is the length of the {side} leg of the right triangle?"
        think = (seen + legs + f"The question asks for the {side} leg. Looking at the image again, the label "
                 f"{answer} sits right next to the {side} side, so its length is {answer}.")
    elif question_type == "hypotenuse":
        answer = str(hyp)
        question = "What is the length of the hypotenuse of the right triangle?"
        think = (seen + legs + f"The hypotenuse, marked ?, is opposite the right angle. By the Pythagorean "
                 f"theorem it is sqrt({horizontal}^2 + {vertical}^2) = sqrt({hyp * hyp}) = {hyp}. Looking at "
                 f"the triangle in the image again, the hypotenuse is drawn as the longest side, consistent "
                 f"with {hyp} > {max(horizontal, vertical)}.")
    elif question_type == "area":
        answer = _format_number(horizontal * vertical / 2)
        question = "What is the area of the right triangle?"
        think = (seen + legs + f"The area of a right triangle is half the product of its legs: "
                 f"{horizontal} * {vertical} / 2 = {answer}. Looking at the image again, both labelled sides "
                 f"meet at the marked right angle, so they are indeed the base and the height.")
    elif question_type == "perimeter":
        answer = str(horizontal + vertical + hyp)
        question = "What is the perimeter of the right triangle?"
        think = (seen + legs + f"The hypotenuse is not labelled; by the Pythagorean theorem it is "
                 f"sqrt({horizontal}^2 + {vertical}^2) = sqrt({hyp * hyp}) = {hyp}. The perimeter is "
                 f"{horizontal} + {vertical} + {hyp} = {answer}. Looking at the triangle in the image again, "
                 f"it has exactly these three sides, and the unlabelled one is the longest.")
    else:  # marked_side
        known = vertical if hidden == "horizontal" else horizontal
        shown = "vertical" if hidden == "horizontal" else "horizontal"
        answer = str(horizontal if hidden == "horizontal" else vertical)
        question = "What is the length of the side marked with a question mark?"
        think = (seen + f"The hypotenuse is labelled {hyp}, the {shown} leg is labelled {known}, and the "
                 f"{hidden} leg is marked ?. By the Pythagorean theorem the missing leg is "
                 f"sqrt({hyp}^2 - {known}^2) = sqrt({hyp * hyp - known * known}) = {answer}. Looking at the "
                 f"image again, the side marked ? is a leg next to the right angle, and {answer} < {hyp} as a "
                 f"leg must be.")
    return image, question, answer, think


def _bar_chart(rng: np.random.Generator, config: ProceduralConfig) -> TaskParts:
    difficulty, image_size = config.difficulty, config.image_size
    width, height = image_size
    font_size = label_font_size(image_size, difficulty)
    margin_left, margin_right = round(0.08 * width) + 2, round(0.06 * width) + 2
    margin_top, margin_bottom = round(0.06 * height) + 2, round(1.5 * font_size) + 6
    chart_w, chart_h = width - margin_left - margin_right, height - margin_top - margin_bottom
    low, high = {1: (3, 4), 2: (4, 6), 3: (5, 8)}[difficulty]
    high = max(3, min(high, chart_w // max(10, round(1.5 * font_size))))  # letters stay apart
    num_bars = int(rng.integers(min(low, high), high + 1))
    tallest = difficulty < 3 or rng.random() < 0.5
    gap_px = max(2, round({1: 0.15, 2: 0.07, 3: 0.03}[difficulty] * chart_h))
    winner = int(rng.integers(num_bars))
    if tallest:
        best = int(rng.integers(round(0.5 * chart_h), chart_h + 1))
        heights = rng.integers(round(0.1 * chart_h), best - gap_px + 1, size=num_bars)
    else:
        best = int(rng.integers(max(2, round(0.1 * chart_h)), round(0.5 * chart_h) + 1))
        heights = rng.integers(best + gap_px, chart_h + 1, size=num_bars)
    heights = [int(h) for h in heights]
    heights[winner] = best
    if difficulty == 1:
        colours = ["blue"] * num_bars
    elif difficulty == 2:
        colours = [str(rng.choice(list(COLOURS)))] * num_bars
    else:
        colours = [str(c) for c in rng.choice(list(COLOURS), size=num_bars)]

    image = Image.new("RGB", image_size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    base_y = margin_top + chart_h
    if difficulty >= 2:
        for quarter in (1, 2, 3, 4):
            y = base_y - round(quarter * chart_h / 4)
            draw.line([(margin_left, y), (margin_left + chart_w, y)], fill=GRID_COLOUR, width=1)
    slot = chart_w / num_bars
    bar_w = max(3, round(slot * 0.6))
    letters = [chr(ord("A") + i) for i in range(num_bars)]
    for i, (bar_height, colour) in enumerate(zip(heights, colours)):
        x0 = round(margin_left + i * slot + (slot - bar_w) / 2)
        draw.rectangle([x0, base_y - bar_height, x0 + bar_w - 1, base_y - 1], fill=COLOURS[colour])
        _, label_h = label_box(letters[i], font_size)
        draw_label(draw, letters[i], (x0 + bar_w / 2, base_y + 3 + label_h / 2), font_size)
    draw.line([(margin_left - 1, margin_top), (margin_left - 1, base_y)], fill=AXIS_COLOUR, width=1)
    draw.line([(margin_left - 1, base_y), (margin_left + chart_w, base_y)], fill=AXIS_COLOUR, width=1)

    extreme = "tallest" if tallest else "shortest"
    answer = letters[winner]
    order = sorted(range(num_bars), key=lambda i: heights[i], reverse=tallest)
    runner_up = order[1]
    percents = ", ".join(f"{letters[i]} about {round(100 * heights[i] / chart_h)}%" for i in range(num_bars))
    gap_share = abs(heights[runner_up] - best) / chart_h
    margin_word = "clearly" if gap_share >= 0.15 else ("visibly" if gap_share >= 0.06 else "only slightly")
    think = (f"The chart shows {num_bars} bars labelled {letters[0]} to {letters[-1]}. Estimating each height "
             f"as a share of the chart's height: {percents}. The {extreme} bar is {answer}. Looking at the "
             f"chart again to compare the closest candidates, bar {letters[runner_up]} is "
             f"{margin_word} {'lower' if tallest else 'higher'} than bar {answer}, so the {extreme} bar is {answer}.")
    question = f"Which bar in the chart is the {extreme}? Answer with its letter."
    return image, question, answer, think


def _largest_shape(rng: np.random.Generator, config: ProceduralConfig) -> TaskParts:
    difficulty, image_size = config.difficulty, config.image_size
    low, high = {1: (2, 3), 2: (3, 4), 3: (4, 6)}[difficulty]
    cells_per_side = 2 if difficulty == 1 else 3
    min_ratio = {1: 1.5, 2: 1.25, 3: 1.12}[difficulty]  # largest area / second largest area
    shapes = {1: SHAPES[:1], 2: SHAPES[:2], 3: SHAPES}[difficulty]
    num_shapes = int(rng.integers(low, high + 1))
    cells = grid_cells(rng, image_size, cells_per_side, num_shapes)
    num_shapes = len(cells)
    colours = [str(c) for c in rng.choice(list(COLOURS), size=num_shapes, replace=False)]
    cell_side = min(cells[0][2], cells[0][3]) - 4
    winner = int(rng.integers(num_shapes))

    kinds = [str(rng.choice(shapes)) for _ in range(num_shapes)]
    sizes = [0] * num_shapes
    sizes[winner] = int(cell_side * rng.uniform(0.8, 1.0))
    limit = shape_area(kinds[winner], sizes[winner]) / min_ratio
    for i in range(num_shapes):
        if i != winner:
            size = int(cell_side * rng.uniform(0.3, 0.95))
            while size > 2 and shape_area(kinds[i], size) > limit:
                size -= 1
            sizes[i] = size

    image = Image.new("RGB", image_size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    described = []
    for cell, shape, size, colour in zip(cells, kinds, sizes, colours):
        cx, cy = place_in_cell(rng, cell, size)
        draw_shape(draw, shape, cx, cy, size, COLOURS[colour])
        described.append(f"{with_article(colour)} {shape} ({position_word(cx, cy, image_size)})")

    areas = [shape_area(k, s) for k, s in zip(kinds, sizes)]
    runner_up = max((i for i in range(num_shapes) if i != winner), key=lambda i: areas[i])
    answer = colours[winner]
    think = (f"The image shows {num_shapes} shapes: {join_words(described)}. Comparing how much area each one "
             f"covers, the {answer} {kinds[winner]} is the largest. Looking at the image again, the next "
             f"largest, the {colours[runner_up]} {kinds[runner_up]}, covers only about "
             f"{round(100 * areas[runner_up] / areas[winner])}% of the {answer} {kinds[winner]}'s area, so the "
             f"largest shape is {answer}.")
    return image, "What colour is the largest shape in the image?", answer, think


_GENERATORS: dict[str, Callable[[np.random.Generator, ProceduralConfig], TaskParts]] = {
    "count_colour": _count_colour,
    "right_triangle": _right_triangle,
    "bar_chart": _bar_chart,
    "largest_shape": _largest_shape,
}
assert tuple(_GENERATORS) == TASK_KINDS


# ------------------------------------------------------------------------------------------- API


def generate_task(kind: str, rng: np.random.Generator, config: ProceduralConfig, *,
                  task_id: str | None = None) -> ProceduralTask:
    """Draw one task of `kind` from `rng` (a numpy Generator). Uses config.image_size, difficulty and
    with_reasoning. Without `task_id` the id is `<kind>-<first 12 hex of the PNG's sha1>`."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {list(TASK_KINDS)}")
    image, question, answer, think = _GENERATORS[kind](rng, config)
    reasoning = wrap_reasoning(think, answer) if config.with_reasoning else None
    task = ProceduralTask(id=task_id or "", kind=kind, image=image, question=question, answer=answer,
                          reasoning=reasoning)
    if task_id is None:
        task = dataclasses.replace(task, id=f"{kind}-{hashlib.sha1(task.png_bytes()).hexdigest()[:12]}")
    return task


def generate_tasks(config: ProceduralConfig) -> Iterator[ProceduralTask]:
    """Yield config.num_samples tasks; sample i (id `<kind>-s<seed>-<i:06d>`) depends only on
    (config, i)."""
    for index in range(config.num_samples):
        kind = config.kinds[index % len(config.kinds)]
        rng = np.random.default_rng((config.seed, index))
        yield generate_task(kind, rng, config, task_id=f"{kind}-s{config.seed}-{index:06d}")


def task_record(task: ProceduralTask, image_path: str, config: ProceduralConfig) -> dict:
    """The task as a record of the project's conversation format (megatron_avar.data.conversations),
    its image referenced by `image_path` (relative to the JSON-lines file). The assistant turn is
    present only when the task has reasoning. The task kind goes into "metadata", the format's place
    for free-form fields (its loader rejects unknown top-level keys)."""
    messages: list[dict] = [{"role": "user", "content": [{"type": "image", "image": image_path},
                                                         {"type": "text", "text": task.question}]}]
    if task.reasoning is not None:
        messages.append({"role": "assistant", "content": task.reasoning})
    metadata = {"source": "procedural", "kind": task.kind, "difficulty": config.difficulty,
                "seed": config.seed}
    return {"id": task.id, "messages": messages, "answer": task.answer, "metadata": metadata}


def write_dataset(config: ProceduralConfig, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write out_dir/images/<id>.png and out_dir/data.jsonl (one task_record per line, loadable with
    megatron_avar.data.conversations.load_conversations); return the path of data.jsonl.

    Atomic: everything is written into a hidden folder next to out_dir and renamed into place, so an
    interrupted run leaves either the old dataset or the new one, never a mix. An existing non-empty
    out_dir is replaced only with overwrite=True, and only if it holds nothing but what this
    function writes (data.jsonl, images/): a mistyped --out never deletes an unrelated folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    atomic_files.remove_stale_siblings(out_dir)  # a killed run's staging folder (or its set-aside dataset)
    existing = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"{out_dir} exists and is not empty; replace it with --overwrite (overwrite=True)")
    foreign = [name for name in existing if name not in ("data.jsonl", "images")]
    if (out_dir / "images").is_dir():
        foreign += [f"images/{entry.name}" for entry in sorted((out_dir / "images").iterdir())
                    if not (_IMAGE_NAME.fullmatch(entry.name) and entry.is_file())]
    if foreign:
        raise ValueError(f"{out_dir} holds {foreign[:5]}, which write_dataset did not write; refusing to "
                         f"replace it even with --overwrite (remove it yourself or pick another folder)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = atomic_files.sibling_folder(out_dir, "tmp")
    shutil.rmtree(staging, ignore_errors=True)  # (this process's own, from an earlier call that was interrupted)
    staging.mkdir()
    try:
        (staging / "images").mkdir()
        with open(staging / "data.jsonl", "w", encoding="utf-8") as jsonl:
            for task in generate_tasks(config):
                relative = f"images/{task.id}.png"
                (staging / relative).write_bytes(task.png_bytes())
                jsonl.write(json.dumps(task_record(task, relative, config), ensure_ascii=False) + "\n")
            jsonl.flush()
            os.fsync(jsonl.fileno())
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "data.jsonl"


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is set aside first and removed only after the
    move succeeded (restored if it failed)."""
    if not target.exists():
        os.replace(new, target)
        return
    backup = atomic_files.sibling_folder(target, "old")
    os.replace(target, backup)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
