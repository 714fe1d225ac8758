"""The `<think>…</think><answer>…</answer>` response grammar: the one place its tags are matched.

A response of an AVAR model reasons inside ``<think>`` and puts its final answer inside ``<answer>``. The
readers here find the pieces; which of them a command trusts is a policy's choice (policies.py).
:data:`STRICT_FORMAT` is the exact shape GRPO's format reward asks for.
"""

from __future__ import annotations

import re

__all__ = ["ANSWER_BLOCK", "STRICT_FORMAT", "last_answer_block", "text_after_think", "has_unclosed_think",
           "is_strictly_formatted"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
"""An ``<answer>…</answer>`` block; group 1 is its inner text (non-greedy: blocks never nest)."""

_ANY_TAG = r"</?(?:think|answer)>"
# [decision] The strict shape, matched against the WHOLE response (re.fullmatch, DOTALL):
# - optional whitespace before `<think>` and after `</answer>`, any whitespace (newlines included) between
#   `</think>` and `<answer>`, nothing else outside the two blocks;
# - exactly one think block and one answer block: neither block's content may contain another
#   `<think>`, `</think>`, `<answer>` or `</answer>` tag (so "…</answer><answer>…</answer>" fails);
# - both blocks non-empty: at least one non-whitespace character inside each (checked on the two groups by
#   is_strictly_formatted, which keeps the pattern free of backtracking: the tempered `.` cannot step over a tag).
STRICT_FORMAT = re.compile(
    rf"\s*<think>((?:(?!{_ANY_TAG}).)*)</think>\s*<answer>((?:(?!{_ANY_TAG}).)*)</answer>\s*", re.DOTALL)
"""One think block, then one answer block, nothing else but whitespace; groups 1 and 2 are their texts."""


def last_answer_block(response: str) -> str | None:
    """The inner text of the last ``<answer>…</answer>`` block, stripped (may be empty); None without one.
    An ``<answer>`` that is never closed is no block."""
    blocks = ANSWER_BLOCK.findall(response)
    return blocks[-1].strip() if blocks else None


def text_after_think(response: str) -> str | None:
    """The text after the last ``</think>``, stripped (may be empty); None when no think block was closed."""
    if THINK_CLOSE not in response:
        return None
    return response.rsplit(THINK_CLOSE, 1)[1].strip()


def has_unclosed_think(response: str) -> bool:
    """Whether a ``<think>`` was opened and no ``</think>`` follows anywhere: the response was cut off (at
    the generation budget) while reasoning."""
    return THINK_OPEN in response and THINK_CLOSE not in response


def is_strictly_formatted(response: str) -> bool:
    """Whether the whole response matches :data:`STRICT_FORMAT` with both blocks non-empty."""
    match = STRICT_FORMAT.fullmatch(response)
    return bool(match and match.group(1).strip() and match.group(2).strip())
