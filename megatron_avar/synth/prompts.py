"""Versioned teacher prompts: the text lives in megatron_avar/synth/prompts/<version>/*.txt.

A prompt file is a `string.Template` (``$question``, ``$description_block``, ``$description``, ``$chain``,
``$min_anchors``), so LaTeX braces in questions need no escaping. The version is part of every request's
cache key: edit prompts by adding a new version folder, never by changing a released one, or cached
answers to the old prompt would be reused for the new one.

The reasoning prompt's ``$description_block`` is ``reason_description`` (the description and the sentence that
points at it) after a space, or nothing without a description (describe.enabled=false).
"""

from __future__ import annotations

import base64
import functools
import string
from pathlib import Path

PROMPT_ROOT = Path(__file__).parent / "prompts"
PROMPT_FILES = ("describe_system", "describe_user", "reason_system", "reason_user", "reason_description",
                "anchor_system", "anchor_user")


@functools.cache
def load_prompts(version: str) -> dict[str, string.Template]:
    """All templates of one version, by file stem; ValueError when the folder or a file is missing."""
    folder = PROMPT_ROOT / version
    missing = [name for name in PROMPT_FILES if not (folder / f"{name}.txt").is_file()]
    if missing:
        raise ValueError(f"prompt version {version!r} ({folder}) lacks {[f'{m}.txt' for m in missing]}")
    return {name: string.Template((folder / f"{name}.txt").read_text(encoding="utf-8").strip())
            for name in PROMPT_FILES}


def _description_block(description: str | None) -> str:
    return f"Image description:\n{description}\n" if description else ""


def image_data_url(image_bytes: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(image_bytes).decode('ascii')}"


def describe_messages(version: str, question: str, image_bytes: bytes, mime: str) -> list[dict]:
    """OpenAI chat messages asking the vision teacher for the four-section description."""
    prompts = load_prompts(version)
    return [
        {"role": "system", "content": prompts["describe_system"].substitute()},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(image_bytes, mime)}},
            {"type": "text", "text": prompts["describe_user"].substitute(question=question)},
        ]},
    ]


def reason_messages(version: str, question: str, description: str | None) -> list[dict]:
    """Messages asking the text teacher for a reflective chain ending in "Final answer: ..."."""
    prompts = load_prompts(version)
    return [
        {"role": "system", "content": prompts["reason_system"].substitute()},
        {"role": "user", "content": prompts["reason_user"].substitute(
            question=question, description_block=_reason_description_block(prompts, description))},
    ]


def _reason_description_block(prompts: dict[str, string.Template], description: str | None) -> str:
    # It follows the task's first sentence: v1 rendered "...about an image. You cannot see the image; rely on the
    # description below..." before it was a block, and a prompt with a description still renders byte for byte so.
    return " " + prompts["reason_description"].substitute(description=description) if description else ""


def anchor_messages(version: str, question: str, description: str | None, chain: str, min_anchors: int) -> list[dict]:
    """Messages asking the anchoring LLM to insert <anchor>-tagged visual re-inspections into ``chain``."""
    prompts = load_prompts(version)
    return [
        {"role": "system", "content": prompts["anchor_system"].substitute()},
        {"role": "user", "content": prompts["anchor_user"].substitute(
            question=question, description_block=_description_block(description), chain=chain,
            min_anchors=max(1, min_anchors))},
    ]
