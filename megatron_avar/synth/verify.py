"""Final answers: extraction from a chain, grading against the ground truth, choosing among candidates,
and the AVAR response format ``<think>…</think><answer>…</answer>``.

A chain ends with a line ``Final answer: <answer>`` (the v1 reasoning prompt asks for it); a trailing
``\\boxed{…}`` is accepted too. Grading: `megatron_avar.eval.answers.math_equal` (math-verify equivalence,
``\\frac{1}{2}`` = ``0.5``; else the same normalised text, which covers option letters and colour words).
"""

from __future__ import annotations

import re

from megatron_avar.data.drawing import wrap_reasoning

_FINAL_LINE = re.compile(r"^\s*\**\s*final answer\s*\**\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_BOXED = re.compile(r"\\boxed\{")
ANCHOR_TAG = re.compile(r"</?anchor>", re.IGNORECASE)
_ANCHOR_SPAN = re.compile(r"<anchor>(.+?)</anchor>", re.IGNORECASE | re.DOTALL)


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start:position].strip() or None
    return None


def extract_answer(chain: str) -> str | None:
    """The chain's final answer: the text after its last "Final answer:" line, else its last \\boxed{}."""
    matches = _FINAL_LINE.findall(chain)
    if matches:
        answer = matches[-1].strip()
        boxed = _last_boxed(answer)
        answer = boxed if boxed is not None else answer.strip("*").strip()
        return answer or None
    return _last_boxed(chain)


def strip_final_line(chain: str) -> str:
    """The chain without its last "Final answer:" line (the answer goes into <answer>)."""
    matches = list(_FINAL_LINE.finditer(chain))
    if not matches:
        return chain.strip()
    last = matches[-1]
    return (chain[:last.start()] + chain[last.end():]).strip()


def answers_match(gold: str, predicted: str | None) -> bool:
    """Whether ``predicted`` is the ground truth ``gold``: the project's one grading rule,
    `megatron_avar.eval.answers.math_equal` (numbers with units stripped, math-verify equivalence,
    else the same lowercased text)."""
    from megatron_avar.eval.answers import math_equal

    return math_equal(gold, predicted)


def strip_anchor_tags(text: str) -> tuple[str, int]:
    """``text`` without <anchor> tags (their content stays) and the number of tagged anchors.
    Unbalanced tags count as malformed: (text, -1)."""
    opened, closed = len(re.findall(r"<anchor>", text, re.I)), len(re.findall(r"</anchor>", text, re.I))
    spans = len(_ANCHOR_SPAN.findall(text))
    if opened != closed or spans != opened:
        return text, -1
    return ANCHOR_TAG.sub("", text), spans


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
    return wrap_reasoning(strip_final_line(chain), answer)
