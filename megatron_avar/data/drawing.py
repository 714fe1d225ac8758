"""Drawing primitives for the procedural visual-reasoning tasks (procedural.py): the palette, labels,
flat shapes with exact pixel areas, grid layout, and small text helpers for reasoning chains.

Shapes are drawn without anti-aliasing (exact colours, so tests can read answers back from pixels);
text uses Pillow's bundled font (no system font), so PNG bytes are identical for the same numpy and
Pillow versions.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]

BACKGROUND: Colour = (255, 255, 255)
# Text is pure black (anti-aliased onto a white box, so always neutral grey); every other drawn thing
# has a tinted colour, which lets tests separate text ink from lines, axes and shapes.
TEXT_COLOUR: Colour = (0, 0, 0)
LINE_COLOUR: Colour = (30, 60, 160)
AXIS_COLOUR: Colour = (70, 70, 90)
GRID_COLOUR: Colour = (225, 225, 225)

# Named, clearly distinct, saturated fill colours (max - min channel > 40); the name is the answer
# word of `largest_shape` and the question word of `count_colour`.
COLOURS: dict[str, Colour] = {
    "red": (220, 38, 38),
    "blue": (37, 99, 235),
    "green": (22, 163, 74),
    "yellow": (234, 179, 8),
    "purple": (147, 51, 234),
    "orange": (249, 115, 22),
    "pink": (236, 72, 153),
    "brown": (146, 84, 38),
    "cyan": (6, 182, 212),
}



@functools.cache
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` pixels: identical on every machine with the same
    Pillow, unlike a system font."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType: a fixed-size bitmap font
        raise RuntimeError("the procedural data needs Pillow with FreeType support (its scalable default font)")
    return font


def label_font_size(image_size: tuple[int, int], difficulty: int) -> int:
    """Pixel size of the label text: smaller labels at higher difficulty, never below 9 px."""
    fraction = {1: 0.09, 2: 0.075, 3: 0.06}[difficulty]
    return max(9, round(min(image_size) * fraction))


def draw_label(draw: ImageDraw.ImageDraw, text: str, centre: tuple[float, float], size: int) -> None:
    """Black `text` on a white box centred at `centre` (clamped inside the image). The text origin is
    an integer pixel, so the glyphs' pixels do not depend on where the label lands."""
    font = label_font(size)
    left, top, right, bottom = font.getbbox(text)
    width, height = draw.im.size
    pad = 2
    x = min(max(round(centre[0] - (right - left) / 2), pad), width - pad - (right - left))
    y = min(max(round(centre[1] - (bottom - top) / 2), pad), height - pad - (bottom - top))
    draw.rectangle([x - pad, y - pad, x + right - left + pad - 1, y + bottom - top + pad - 1],
                   fill=BACKGROUND)
    draw.text((x - left, y - top), text, font=font, fill=TEXT_COLOUR)


def label_box(text: str, size: int) -> tuple[int, int]:
    """(width, height) of the white box draw_label draws for `text`."""
    left, top, right, bottom = label_font(size).getbbox(text)  # whole pixels (typed float by Pillow)
    return int(right - left) + 4, int(bottom - top) + 4


def shape_box(cx: int, cy: int, size: int) -> list[int]:
    x0, y0 = cx - size // 2, cy - size // 2
    return [x0, y0, x0 + size - 1, y0 + size - 1]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, size: int,
                colour: Colour | int) -> None:
    """A flat, not anti-aliased shape filling the size x size pixel box centred at integer (cx, cy);
    its pixels are the same up to translation wherever it is drawn."""
    x0, y0, x1, y1 = shape_box(cx, cy, size)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    else:  # triangle pointing up
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


@functools.lru_cache(maxsize=4096)
def shape_area(shape: str, size: int) -> int:
    """Exact number of pixels draw_shape paints for this shape and size, wherever it is drawn."""
    side = size + 4
    mask = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(mask), shape, side // 2, side // 2, size, 255)
    return int((np.asarray(mask) > 0).sum())


def position_word(cx: float, cy: float, image_size: tuple[int, int]) -> str:
    """A coarse position word for reasoning chains: "top left", "centre", "bottom right", ..."""
    col = ("left", "centre", "right")[min(int(3 * cx / image_size[0]), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * cy / image_size[1]), 2)]
    if row == "middle":
        return "centre" if col == "centre" else f"middle {col}"
    return row if col == "centre" else f"{row} {col}"


def grid_shape(image_size: tuple[int, int], cells_per_side: int) -> tuple[int, int]:
    """(columns, rows) of about cells_per_side**2 roughly square cells, each at least 16 px wide and
    high, so wide and tall images get wide and tall grids."""
    width, height = image_size
    target = cells_per_side**2
    columns = max(1, round(math.sqrt(target * width / height)))
    rows = max(1, round(target / columns))
    return max(1, min(columns, width // 16)), max(1, min(rows, height // 16))


def grid_cells(rng: np.random.Generator, image_size: tuple[int, int], cells_per_side: int,
                count: int) -> list[tuple[float, float, float, float]]:
    """`count` distinct random cells of the grid_shape grid as (x0, y0, width, height), in reading
    order. Shapes kept inside their cells never touch."""
    columns, rows = grid_shape(image_size, cells_per_side)
    width, height = image_size[0] / columns, image_size[1] / rows
    chosen = sorted(rng.choice(columns * rows, size=min(count, columns * rows), replace=False).tolist())
    return [((c % columns) * width, (c // columns) * height, width, height) for c in chosen]


def place_in_cell(rng: np.random.Generator, cell: tuple[float, float, float, float],
                   size: int) -> tuple[int, int]:
    """A random integer centre that keeps a size x size box at least 1.5 px inside the cell, so
    shapes in neighbouring cells are at least 3 px apart."""
    x0, y0, width, height = cell
    slack_x = max(width - size - 4, 0.0)
    slack_y = max(height - size - 4, 0.0)
    cx = round(x0 + 2 + size / 2 + rng.uniform(0, slack_x))
    cy = round(y0 + 2 + size / 2 + rng.uniform(0, slack_y))
    return cx, cy


def wrap_reasoning(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def join_words(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
