"""The benchmarks' own extraction rules, over the answer text the harness policy gives
(docs/evaluation.md, 'Shared rules').

A response first goes through ``grading.EVAL_HARNESS`` (the `<think>/<answer>` harness rule, in
eval/benchmarks/base.py); the rules here read that text. Where they fail, we count an extraction failure and
score the item wrong, so a parser bug shows up as a failure rate instead of hiding in the accuracy; as in
VLMEvalKit, ``--judge`` then lets a chat model read those items (`megatron_avar.eval.judge`). The generic pieces (boxes,
cues, numbers, ``math_equal``) live in ``megatron_avar.grading``.

- :func:`can_infer` — VLMEvalKit's rule-based multiple-choice matcher (HEAD, Aug 2026 behaviour).
- :func:`mcq_letter` — the option letter of a response (cue answer first, then the whole text).
- :func:`free_form_candidate` — the free-form answer of a response (cue, short text or last number).
"""

from __future__ import annotations

import re
import string

from megatron_avar.grading import cue_answer, has_words, numbers_in, standalone_numbers, to_number, without_emphasis

__all__ = ["can_infer", "option_letters", "free_form_candidate", "mcq_letter"]


def option_letters(count: int) -> list[str]:
    """The first ``count`` capital letters, the option labels of a multiple-choice question."""
    if not 0 <= count <= 26:
        raise ValueError(f"a multiple-choice question needs 0..26 options, got {count}")
    return list(string.ascii_uppercase[:count])


# VLMEvalKit's can_infer_option replaces exactly these characters with spaces before splitting;
# `<` and `>` are not among them, so "<answer>B</answer>" is one token (hence the harness rule first).
_CAN_INFER_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i:answer is):?\s*\(?([A-D])\b")


def can_infer(answer: str, choices: dict[str, str], *, last_tokens: int | None = 4,
              answer_is_fallback: bool = True) -> str | None:
    """VLMEvalKit's rule-based MCQ matcher: the option letter ``answer`` names, or None.

    1. Separators ``.()[],:;!*#{}`` become spaces and the text is split. If exactly one option letter is a
       standalone token (and, since VLMEvalKit #1175, its first occurrence is among the last ``last_tokens``
       tokens; None disables that check) it is the answer. With no letter but a ``Z`` token, "Z" (the "none of
       these" option when the choices carry one). Since #1552: "answer is X" (A-D) as a fallback.
    2. Otherwise, if exactly one option's text (lowercased) is a substring of the lowercased answer, that
       option — skipped when the answer is longer than twice the total option text (#1175).
    Both fail: None (an extraction failure; VLMEvalKit, and ``avar eval --judge``, then ask a judge).

    choices: letter -> option text, e.g. {"A": "3 cm", "B": "4 cm"}.
    """
    tokens = answer.translate(_CAN_INFER_SEPARATORS).split()
    letters = [t for t in tokens if t in choices]
    distinct = set(letters)
    if len(distinct) == 1:
        letter = letters[0]
        if last_tokens is None or tokens.index(letter) >= len(tokens) - last_tokens:
            return letter
    elif not distinct and "Z" in tokens and "Z" in choices:
        return "Z"
    if answer_is_fallback:
        match = _ANSWER_IS.findall(answer)
        if match and match[-1] in choices:
            return match[-1]
    lowered = answer.lower()
    total_option_text = sum(len(str(text)) for text in choices.values())
    if len(answer) <= 2 * total_option_text:
        hits = [k for k, text in choices.items() if str(text).strip() and str(text).lower().strip() in lowered]
        if len(hits) == 1:
            return hits[0]
    return None


def free_form_candidate(text: str, *, numeric: bool) -> str | None:
    """The free-form answer in a response: the cue answer (boxed / "answer is"); else the whole text when it
    is short (at most 5 words, e.g. "12 cm", "\\frac{1}{2}"); else, for numeric answers, the last number.
    ``numeric``: the gold answer is a number (``to_number(gold) is not None``); an expression, an interval or a
    word answer is then read whole. For a numeric answer a cue holding words and numbers ("7 because 3 red
    and 4 green") gives its first number standing on its own, the one the cue states; a number that is part
    of an expression ("12x", "x^2") is not one, and such a cue stays whole. Markdown emphasis ("**12**") is
    dropped. None when nothing qualifies (an extraction failure)."""
    candidate = cue_answer(text)
    if candidate is None and len(text.split()) <= 5 and text.strip():
        candidate = without_emphasis(text.strip())
    if numeric:
        if candidate is not None and (has_words(candidate) or to_number(candidate) is None):
            stated = standalone_numbers(candidate)
            return stated[0] if stated else candidate
        if candidate is None and numbers_in(text):
            return numbers_in(text)[-1]
    return candidate


def mcq_letter(text: str, choices: dict[str, str]) -> str | None:
    """The option letter a response names: :func:`can_infer` on the cue answer (boxed / "answer is") when
    there is one, else on the whole text."""
    cue = cue_answer(text)
    if cue is not None:
        letter = can_infer(cue, choices)
        if letter is not None:
            return letter
    return can_infer(text, choices)
