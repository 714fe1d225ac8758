"""Where an answer sits inside free text: ``\\boxed{…}``, an "answer is" cue, a "Final answer:" line, a number.

Each reader returns the answer's text (stripped) or None when its marker is absent; none of them looks at the
`<think>/<answer>` tags (tags.py) — a policy decides which part of a response each one reads.
"""

from __future__ import annotations

import re

__all__ = ["last_boxed", "cue_answer", "final_answer_line", "remove_final_answer_line", "numbers_in",
           "standalone_numbers", "without_emphasis"]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced, stripped (may be empty);
    None without one or when its braces never close."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    position = text.index("{", start) + 1
    depth, begin = 1, position
    while position < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        position += 1
    return text[begin:position - 1].strip() if depth == 0 else None


_CUES = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:)\s*:?", re.IGNORECASE)


def cue_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` content; else the text after the last "answer is" / "Answer:" cue (to the end
    of that line, trailing full stop and ``$`` removed); None when neither is present."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    cues = list(_CUES.finditer(text))
    if not cues:
        return None
    tail = text[cues[-1].end():].strip().split("\n", 1)[0].strip()
    tail = re.sub(r"\.\s*$", "", without_emphasis(tail)).strip()
    return tail.strip("$ ").strip() or None


# A whole line "Final answer: …", optionally in Markdown bold ("**Final Answer:** …"), full-width colon too.
_FINAL_ANSWER_LINE = re.compile(r"^\s*\**\s*final answer\s*\**\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def final_answer_line(text: str) -> str | None:
    """The answer on the last "Final answer: …" line: the content of its ``\\boxed{}`` when it holds one,
    else the rest of the line without Markdown ``*``; None without such a line. Unlike :func:`cue_answer`,
    the cue must start its own line, so "the final answer: maybe 3" inside a sentence does not count."""
    lines = _FINAL_ANSWER_LINE.findall(text)
    if not lines:
        return None
    answer = lines[-1].strip()
    boxed = last_boxed(answer)
    return boxed if boxed is not None else answer.strip("*").strip()


def remove_final_answer_line(text: str) -> str:
    """``text`` without its last "Final answer: …" line, stripped (the whole text, stripped, without one)."""
    lines = list(_FINAL_ANSWER_LINE.finditer(text))
    if not lines:
        return text.strip()
    last = lines[-1]
    return (text[:last.start()] + text[last.end():]).strip()


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def numbers_in(text: str) -> list[str]:
    """Every number in ``text`` in order of appearance, thousands separators removed ("1,000" -> "1000")."""
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


# A number standing on its own: not glued to a letter, a power, a LaTeX command or a brace, and not a term of a
# sum or product ("x^2 + 3", "2 * 4").
_STANDALONE_NUMBER = re.compile(r"(?<![\w^\\{.+*/])(?<![+*/] )-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w^{]|\.\d|\s?[-+*/^])")


def standalone_numbers(text: str) -> list[str]:
    """The numbers of ``text`` that stand on their own, in order, thousands separators removed ("12 because 3
    rows of 4" -> ["12", "3", "4"]; the 2 of "2x", "x^2" or "2 * 4" is not one)."""
    return [n.replace(",", "") for n in _STANDALONE_NUMBER.findall(text)]


# Markdown emphasis around words ("**12**", "__Yes__", "*B*"); not the ``**`` of a power ("x**2").
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*|__|\*)(?=[^\s*])(.+?)(?<=[^\s*])\1(?![\w*])")


def without_emphasis(text: str) -> str:
    """``text`` with Markdown bold / italic markers around words removed ("The answer is **12**" -> "The
    answer is 12"); a model that bolds its answer states the same answer."""
    return _EMPHASIS.sub(r"\2", text)
