"""Candidates of a synthesised sample: anchor tags, choosing among candidates, and the AVAR response format
``<think>…</think><answer>…</answer>``.

A chain ends with a line ``Final answer: <answer>`` (the v1 reasoning prompt asks for it); a trailing
``\\boxed{…}`` is accepted too. Extraction and grading are ``grading.SYNTHESIS`` (docs/grading.md):
``grading.math_equal`` (math-verify equivalence, ``\\frac{1}{2}`` = ``0.5``; else the same normalised text,
which covers option letters and colour words).
"""

from __future__ import annotations

import re

from megatron_avar.data.drawing import wrap_reasoning
from megatron_avar.grading import remove_final_answer_line

ANCHOR_TAG = re.compile(r"</?anchor>", re.IGNORECASE)
_ANCHOR_SPAN = re.compile(r"<anchor>(.+?)</anchor>", re.IGNORECASE | re.DOTALL)


def strip_anchor_tags(text: str) -> tuple[str, int]:
    """``text`` without <anchor> tags (their content stays) and the number of tagged anchors.
    Unbalanced tags count as malformed: (text, -1)."""
    opened, closed = len(re.findall(r"<anchor>", text, re.I)), len(re.findall(r"</anchor>", text, re.I))
    spans = len(_ANCHOR_SPAN.findall(text))
    if opened != closed or spans != opened:
        return text, -1
    return ANCHOR_TAG.sub("", text), spans


def without_anchor_spans(text: str) -> str:
    """``text`` without its <anchor>…</anchor> spans, content included: what an anchor rewrite kept of the chain."""
    return _ANCHOR_SPAN.sub(" ", text)


def select_candidate(candidates: list[dict], rule: str) -> dict | None:
    """The eligible candidate to keep: "first" (lowest index) or "most_anchors" (ties: lowest index)."""
    eligible = [c for c in candidates if c.get("eligible")]
    if not eligible:
        return None
    if rule == "first":
        return min(eligible, key=lambda c: c["index"])
    return min(eligible, key=lambda c: (-(c.get("num_anchors") or 0), c["index"]))


def format_response(chain: str, answer: str) -> str:
    """The AVAR assistant turn: the chain (final-answer line removed) in <think>, the answer in <answer>."""
    return wrap_reasoning(remove_final_answer_line(chain), answer)
