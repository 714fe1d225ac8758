"""Token roles: every token of a rendered conversation gets exactly one role, assigned while the chat
template is rendered segment by segment (docs/method.md, 'Token roles').

The conversation is rendered as a list of segments, each a piece of template text with the role its
tokens take: the system turn, role headers, user text, image placeholders (already expanded to the
number of tokens the vision encoder produces for that image), assistant content. The joined text is
tokenized ONCE, so ``input_ids`` are exactly the ids Hugging Face's ``apply_chat_template`` + Qwen2.5-VL
processor produce, and each token takes the role of the segment its characters come from (tokenizer
offsets). Roles are never guessed by decoding, string search or character ratios.

One case needs a rule: byte-level BPE can merge characters across a segment boundary (a user text that
starts with a newline merges with the newline of ``<|im_start|>user\\n``). Such a token takes the role of
the content segment it covers (USER_TEXT, RESPONSE or SYSTEM), never TEMPLATE: it carries content, and
for RESPONSE it is a token the model must learn to produce.
"""

from __future__ import annotations

import bisect
import enum
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TokenRole",
    "NUM_ROLES",
    "IMAGE_FORMATS",
    "IGNORE_INDEX",
    "GENERATION_PROMPT",
    "literal_special_token",
    "labelled_positions",
    "RenderedConversation",
    "render_conversation",
    "validate_messages",
    "load_image",
    "open_image",
    "to_rgb",
]

IGNORE_INDEX = -100


def labelled_positions(labels: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [N]: the flat positions (b·S' + i) of the labelled tokens (not IGNORE_INDEX) of ``labels`` [B, S], or
    of its columns ``held`` only (a context-parallel rank's part of the rows, ``context_parallel.local_positions``):
    where the model computes logits and losses (its ``output_rows``). Meant for host tensors (``nonzero`` reads
    its result's size)."""
    mine = labels if held is None else labels[:, held]
    return torch.nonzero(mine.reshape(-1) != IGNORE_INDEX, as_tuple=True)[0]


class TokenRole(enum.IntEnum):
    """Role of a token; ids can be passed straight to `role_attention` as ``key_roles`` (PAD = -1)."""

    SYSTEM = 0  # the whole system turn `<|im_start|>system\n … <|im_end|>\n` (position 0: the attention sink)
    IMAGE = 1  # `<|image_pad|>` tokens, one per merged 2x2 patch
    USER_TEXT = 2  # the user's own text
    RESPONSE = 3  # assistant content and its closing `<|im_end|>`
    # role headers, the user's `<|im_end|>\n`, `<|vision_start|>`, `<|vision_end|>`, the `\n` after an assistant
    # `<|im_end|>`
    TEMPLATE = 4
    PAD = -1  # padding; never attended to


NUM_ROLES = 5  # roles with a non-negative id

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what the Qwen2.5-VL template renders when none is given
GENERATION_PROMPT = "<|im_start|>assistant\n"  # what ends a prompt for generation (add_generation_prompt)

# Tokens whose literal text inside a message would change the conversation's structure or its image count.
_STRUCTURAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_pad|>",
)

# The tokenizer's end-of-text token: EOS and pad id of Qwen2.5-VL checkpoints (a stop token in generation).
_END_OF_TEXT = "<|endoftext|>"

_CONTENT_ROLE = {"system": TokenRole.SYSTEM, "user": TokenRole.USER_TEXT, "assistant": TokenRole.RESPONSE}

# The formats images are decoded from (PIL's names; JPEG includes MPO, the JPEG of many phones). PIL's other
# decoders stay shut: EPS, for one, runs the Ghostscript interpreter on the file's contents.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class RenderedConversation:
    """A tokenized conversation with one role per token.

    input_ids: int64 [S]; roles: int64 [S] (TokenRole values); labels: int64 [S], the token id on RESPONSE
    tokens and IGNORE_INDEX (-100) elsewhere (unshifted: position i holds token i); pixel_values: float32
    [num_patches, 3*2*14*14] or None; image_grid_thw: int64 [num_images, 3] or None. The number of IMAGE
    tokens of image k is prod(image_grid_thw[k]) // merge_size**2. text: the rendered template text
    (image placeholders expanded).
    """

    input_ids: torch.Tensor
    roles: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    text: str

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_images(self) -> int:
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.shape[0])


def to_rgb(image):
    """RGB with any transparency composited onto white, as Qwen2.5-VL's own preprocessing (and transformers'
    ``convert_to_rgb``) does: a plain ``convert("RGB")`` keeps the colour hidden under transparent pixels, often
    black, and a diagram drawn on a transparent background turns black."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def open_image(source: str | Path | bytes | bytearray):
    """A PIL RGB image decoded from a file or from encoded bytes, turned upright by its EXIF orientation (as
    Hugging Face's ``load_image`` and `datasets.Image` do: a phone photo is stored sideways with a tag saying so)
    and with transparent pixels on white (:func:`to_rgb`). Only :data:`IMAGE_FORMATS` are decoded; PIL's errors
    propagate."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                    formats=IMAGE_FORMATS) as opened:
        opened.load()
        return to_rgb(ImageOps.exif_transpose(opened))


def load_image(image: Any, image_root: str | Path | None = None):
    """A PIL RGB image from a PIL image (taken as it is) or a path (relative paths resolve against
    ``image_root``; decoded by :func:`open_image`); transparent pixels become white (:func:`to_rgb`).
    ValueError naming the fix for anything else, a URL, a missing or an unreadable file."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if not isinstance(image, (str, Path)):
        raise ValueError(f"an image must be a PIL image or a file path, got {type(image).__name__}; decode it "
                         "(PIL.Image.open) or write it to a file and give the path")
    if isinstance(image, str) and "://" in image:
        raise ValueError(f"image {image!r} is a URL; images are not downloaded: fetch it and give the file's path")
    path = Path(image)
    if not path.is_absolute() and image_root is not None:
        path = Path(image_root) / path
    if not path.is_file():
        raise ValueError(f"image file not found: {path} (image paths are relative to the data file's folder)")
    return read_image(path, f"image file {path}")


def read_image(source: str | Path | bytes | bytearray, what: str):
    """:func:`open_image` of ``source``; ValueError naming ``what`` (e.g. "image file x.png") and the fix when it
    is unreadable, corrupt or of a format outside :data:`IMAGE_FORMATS`."""
    from PIL import UnidentifiedImageError

    try:
        return open_image(source)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        detail = "no decoder of these formats recognises it" if isinstance(error, UnidentifiedImageError) else error
        raise ValueError(f"{what} is unreadable, corrupt or not one of {', '.join(IMAGE_FORMATS)} ({detail}); "
                         "re-export it as PNG/JPEG") from error


def _content_items(message: dict, index: int) -> list[dict]:
    """The message content as a list of {"type": "text"|"image", ...} items, validated."""
    content = message["content"]
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"messages[{index}].content must be a string or a list of items, got {type(content).__name__}")
    items = []
    for item_index, item in enumerate(content):
        where = f"messages[{index}].content[{item_index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be a dict like {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
        kind = item.get("type")
        if kind is None:  # the HF template also accepts {"image": ...} / {"text": ...} without a type
            kind = "image" if "image" in item else "text" if "text" in item else None
        if kind == "image":
            if item.get("image") is None:
                raise ValueError(f"{where} is an image item without an 'image' (PIL image or path)")
            items.append({"type": "image", "image": item["image"]})
        elif kind == "text":
            if not isinstance(item.get("text"), str):
                raise ValueError(f"{where} is a text item without a string 'text'")
            items.append({"type": "text", "text": item["text"]})
        else:
            raise ValueError(f"{where} has type {kind!r}; supported item types are 'text' and 'image' (no video)")
    return items


def literal_special_token(text: str) -> str | None:
    """The first special token whose literal text ``text`` holds that a message may not hold (the structural
    tokens and the end-of-text token), or None."""
    return next((token for token in (_END_OF_TEXT, *_STRUCTURAL_TOKENS) if token in text), None)


def _check_text(text: str, where: str) -> None:
    if _END_OF_TEXT in text:
        raise ValueError(f"{where} contains the literal special token {_END_OF_TEXT!r}, which the tokenizer turns into "
                         "its end-of-text token (Qwen's EOS and pad id): a model trained on it learns to stop there, "
                         "and generation stops at it. Remove it, or write it so it is not one token (e.g. "
                         "'<|endoftext |>')")
    for token in _STRUCTURAL_TOKENS:
        if token in text:
            raise ValueError(
                f"{where} contains the literal special token {token!r}: images must be given as "
                "{'type': 'image', 'image': ...} items and turns as separate messages, never as special-token text"
            )


def _text_runs(items: list[dict]) -> list[str]:
    """The texts of each run of adjacent text items, joined as the template renders them (with nothing between:
    "<|im_" and "end|>" in two items render as one special token)."""
    runs, current = [], []
    for item in items:
        if item["type"] == "text":
            current.append(item["text"])
        else:
            runs.append("".join(current))
            current = []
    return runs + ["".join(current)]


def validate_messages(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[tuple[str, list[dict]]]:
    """Check a conversation against the chat format; return it as (role, content items) turns.

    Content strings become one text item (the template renders both forms identically).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content'")
        role = message["role"]
        if not isinstance(role, str) or role not in _CONTENT_ROLE:
            raise ValueError(f"messages[{index}].role is {role!r}; allowed: 'system', 'user', 'assistant'")
        if role == "system" and index != 0:
            raise ValueError(f"messages[{index}] is a system message; only the first message may be a system turn")
        items = _content_items(message, index)
        for text in _text_runs(items):
            _check_text(text, f"messages[{index}]")
        if role == "assistant" and not any(item["type"] == "text" and item["text"].strip() for item in items):
            raise ValueError(f"messages[{index}] is an empty assistant turn; drop the sample or give the response")
        turns.append((role, items))
    if add_generation_prompt and turns[-1][0] == "assistant":
        raise ValueError("add_generation_prompt=True needs a conversation that ends with a user turn")
    return turns


def _segments(turns, image_token_counts: list[int], image_pad: str) -> list[tuple[str, TokenRole]]:
    """The chat template of Qwen2.5-VL, as (text, role) segments. Joined, the texts equal the template's
    output with each `<|image_pad|>` expanded to its token count."""
    segments: list[tuple[str, TokenRole]] = []
    if turns[0][0] != "system":
        segments.append((f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n", TokenRole.SYSTEM))
    image_index = 0
    for role, items in turns:
        in_system = role == "system"
        frame_role = TokenRole.SYSTEM if in_system else TokenRole.TEMPLATE
        segments.append((f"<|im_start|>{role}\n", frame_role))
        for item in items:
            if item["type"] == "image":
                segments.append(("<|vision_start|>", frame_role))
                segments.append((image_pad * image_token_counts[image_index], TokenRole.IMAGE))
                segments.append(("<|vision_end|>", frame_role))
                image_index += 1
            elif item["text"]:
                segments.append((item["text"], _CONTENT_ROLE[role]))
        if role == "assistant":
            segments.append(("<|im_end|>", TokenRole.RESPONSE))
            segments.append(("\n", TokenRole.TEMPLATE))
        else:
            segments.append(("<|im_end|>\n", frame_role))
    return segments


def _roles_from_offsets(segments, offsets) -> list[int]:
    starts, position = [], 0
    for text, _ in segments:
        starts.append(position)
        position += len(text)
    roles = []
    for token_index, (begin, end) in enumerate(offsets):
        if end <= begin:
            raise RuntimeError(f"token {token_index} has an empty character span; cannot assign its role")
        first = bisect.bisect_right(starts, begin) - 1
        last = bisect.bisect_right(starts, end - 1) - 1
        covered = {segments[k][1] for k in range(first, last + 1) if segments[k][0]}
        content = covered - {TokenRole.TEMPLATE}
        if len(content) > 1:
            raise RuntimeError(f"token {token_index} spans segments of roles {sorted(content)}; this template is not "
                               "supported")
        roles.append(int(next(iter(content)) if content else TokenRole.TEMPLATE))
    return roles


def render_conversation(
    messages: Sequence[dict],
    processor,
    *,
    add_generation_prompt: bool = False,
    image_root: str | Path | None = None,
) -> RenderedConversation:
    """Render a conversation with the Qwen2.5-VL chat template and return ids, roles, labels and images.

    Args:
        messages: the Hugging Face chat format, a list of {"role": "system"|"user"|"assistant", "content":
            str or a list of {"type": "text", "text": str} / {"type": "image", "image": PIL image or path}}.
            Any number of images. The system turn, if any, comes first; without one the template's default
            system prompt is rendered (as Qwen2.5-VL does).
        processor: a Qwen2.5-VL processor (see `megatron_avar.processor.load_processor`).
        add_generation_prompt: end with `<|im_start|>assistant\\n` (a prompt for generation).
        image_root: the folder relative image paths are resolved against.

    Raises ValueError naming the message and the fix for: unknown roles, a system turn not first, literal
    special tokens in text, an empty assistant turn, missing or unreadable image files.
    """
    turns = validate_messages(messages, add_generation_prompt)
    images = [load_image(item["image"], image_root) for _, items in turns for item in items if item["type"] == "image"]
    pixel_values = image_grid_thw = None
    image_token_counts: list[int] = []
    if images:
        try:  # transformers' resize refuses e.g. an aspect ratio over 200, naming no image
            vision = processor.image_processor(images=images, return_tensors="pt")
        except ValueError as error:
            sizes = ", ".join(f"{image.width}x{image.height}" for image in images)
            raise ValueError(f"the image processor refuses an image of this conversation ({error}); image sizes "
                             f"(width x height, in order): {sizes}: crop or pad that image, or drop the "
                             "sample") from None
        pixel_values, image_grid_thw = vision["pixel_values"], vision["image_grid_thw"].long()
        merge_length = processor.image_processor.merge_size**2
        image_token_counts = [int(thw.prod()) // merge_length for thw in image_grid_thw]

    segments = _segments(turns, image_token_counts, processor.image_token)
    if add_generation_prompt:
        segments.append((GENERATION_PROMPT, TokenRole.TEMPLATE))
    text = "".join(segment for segment, _ in segments)
    encoding = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    roles = torch.tensor(_roles_from_offsets(segments, encoding["offset_mapping"]), dtype=torch.long)

    num_image_tokens = int((input_ids == processor.image_token_id).sum())
    if num_image_tokens != sum(image_token_counts) or int((roles == TokenRole.IMAGE).sum()) != num_image_tokens:
        raise RuntimeError(
            f"rendered {num_image_tokens} image tokens for {sum(image_token_counts)} vision-encoder features"
        )
    labels = torch.where(roles == TokenRole.RESPONSE, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return RenderedConversation(input_ids, roles, labels, pixel_values, image_grid_thw, text)
