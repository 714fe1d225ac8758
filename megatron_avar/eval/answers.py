"""Answer extraction and comparison rules shared by the benchmarks (EVAL_BENCHMARKS.md §0).

Every rule here is rule-based (no GPT judge): where VLMEvalKit would call a judge after its rules fail, we
count an extraction failure and score the item wrong, so a parser bug shows up as a failure rate instead
of hiding in the accuracy.

- :func:`final_answer_text` — the `<think>/<answer>` harness rule.
- :func:`can_infer` — VLMEvalKit's rule-based multiple-choice matcher (HEAD, Aug 2026 behaviour).
- :func:`cue_answer` — the last ``\\boxed{}``, else the text after the last "answer is" / "Answer:".
- :func:`to_number`, :func:`math_equal` — numbers and LaTeX, with math-verify.
"""

from __future__ import annotations

import re
import string
import threading
from dataclasses import dataclass

__all__ = [
    "HarnessAnswer",
    "final_answer_text",
    "can_infer",
    "cue_answer",
    "last_boxed",
    "strip_units",
    "to_number",
    "numbers_in",
    "math_equal",
    "edit_distance",
    "option_letters",
    "free_form_candidate",
    "mcq_letter",
]

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class HarnessAnswer:
    """The text a benchmark's extraction sees. ``text`` is None when the response is a format failure
    (an unclosed ``<think>``); ``source`` says which rule produced it: "answer_tag", "after_think", "raw"
    or "unclosed_think"."""

    text: str | None
    source: str

    @property
    def format_failure(self) -> bool:
        return self.text is None


def final_answer_text(response: str) -> HarnessAnswer:
    """The harness rule for `<think>/<answer>` responses (EVAL_BENCHMARKS.md §0).

    The inner text of the last ``<answer>…</answer>`` block; else the text after the last ``</think>``;
    else, when a ``<think>`` was opened and never closed, no answer at all (a format failure, scored wrong);
    else the raw response (models that answer without tags).
    """
    blocks = _ANSWER_BLOCK.findall(response)
    if blocks:
        return HarnessAnswer(blocks[-1].strip(), "answer_tag")
    if "</think>" in response:
        return HarnessAnswer(response.rsplit("</think>", 1)[1].strip(), "after_think")
    if "<think>" in response:
        return HarnessAnswer(None, "unclosed_think")
    return HarnessAnswer(response.strip(), "raw")


def option_letters(count: int) -> list[str]:
    if not 0 <= count <= 26:
        raise ValueError(f"a multiple-choice question needs 0..26 options, got {count}")
    return list(string.ascii_uppercase[:count])


# VLMEvalKit's can_infer_option replaces exactly these characters with spaces before splitting;
# `<` and `>` are not among them, so "<answer>B</answer>" is one token (hence the harness rule above).
_CAN_INFER_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?i:answer is):?\s*\(?([A-D])\b")


def can_infer(answer: str, choices: dict[str, str], *, last_tokens: int | None = 4,
              answer_is_fallback: bool = True) -> str | None:
    """VLMEvalKit's rule-based MCQ matcher: the option letter ``answer`` names, or None.

    1. Separators ``.()[],:;!*#{}`` become spaces and the text is split. If exactly one option letter is a
       standalone token (and, since VLMEvalKit #1175, among the last ``last_tokens`` tokens; None disables
       that check) it is the answer. With no letter but a ``Z`` token, "Z" (the "none of these" option
       when the choices carry one). Since #1552: "answer is X" (A-D) as a fallback.
    2. Otherwise, if exactly one option's text (lowercased) is a substring of the lowercased answer, that
       option — skipped when the answer is longer than twice the total option text (#1175).
    Both fail: None (VLMEvalKit would ask a judge; we count an extraction failure).

    choices: letter -> option text, e.g. {"A": "3 cm", "B": "4 cm"}.
    """
    tokens = answer.translate(_CAN_INFER_SEPARATORS).split()
    letters = [t for t in tokens if t in choices]
    distinct = set(letters)
    if len(distinct) == 1:
        letter = letters[0]
        if last_tokens is None or letter in tokens[-last_tokens:]:
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


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced; None without one."""
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
    of that line, trailing full stop removed); None when neither is present."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    cues = list(_CUES.finditer(text))
    if not cues:
        return None
    tail = text[cues[-1].end():].strip().split("\n", 1)[0].strip()
    tail = re.sub(r"\.\s*$", "", tail).strip()
    return tail.strip("$ ").strip() or None


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def numbers_in(text: str) -> list[str]:
    """Every number in ``text`` in order of appearance, thousands separators removed ("1,000" -> "1000")."""
    return [n.replace(",", "") for n in _NUMBER.findall(text)]


_UNIT_NOISE = re.compile(r"\\(?:text|mathrm|mbox)\{[^}]*\}|\^\{?\\circ\}?|°|\\circ|\\%|%|\$|\\,|\\!|\\;")


def strip_units(text: str) -> str:
    """Remove degree signs, percent signs, ``$``, LaTeX spacing and ``\\text{…}`` units, then trailing
    alphabetic unit words ("12 cm" -> "12", "45°" -> "45"); leaves other text as it is."""
    cleaned = _UNIT_NOISE.sub(" ", text).strip()
    cleaned = re.sub(r"^([-+]?[\d.,/]+(?:\s*/\s*\d+)?)\s*[a-zA-Z][a-zA-Z\s^23²³]*\.?$", r"\1", cleaned)
    return cleaned.strip()


def _math_verify_kwargs() -> tuple[dict, dict]:
    # math-verify times out with SIGALRM, which only works in the main thread (ENVIRONMENT.md).
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def _parse(text: str):
    from math_verify import parse

    parse_kwargs, _ = _math_verify_kwargs()
    wrapped = text if "$" in text or "\\boxed" in text else f"${text}$"
    parsed = parse(wrapped, **parse_kwargs)
    return parsed or parse(text, **parse_kwargs)


def to_number(text: str | None) -> float | None:
    """The value of a numeric answer: plain ("1,000", "-2.5", "12 cm", "45°"), a fraction ("3/4") or LaTeX
    (``\\frac{3}{4}``, ``2\\sqrt{2}``) evaluated by math-verify; None when it is not a single number."""
    if text is None:
        return None
    cleaned = strip_units(text.strip())
    plain = cleaned.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", cleaned) else cleaned
    try:
        return float(plain)
    except ValueError:
        pass
    fraction = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", plain)
    if fraction and float(fraction.group(2)) != 0:
        return float(fraction.group(1)) / float(fraction.group(2))
    for value in _parse(cleaned)[:1]:
        try:
            number = complex(value.evalf()) if hasattr(value, "evalf") else None
        except (TypeError, ValueError):
            return None
        if number is not None and abs(number.imag) < 1e-12:
            return float(number.real)
    return None


def math_equal(gold: str, predicted: str | None, *, rel_tol: float = 1e-6) -> bool:
    """Whether ``predicted`` equals ``gold`` as mathematics: equal numbers (relative tolerance ``rel_tol``,
    after units/°/$ are stripped), else math-verify's symbolic equivalence (LaTeX vs plain, fractions vs
    decimals, intervals, sets), else the same lowercased text."""
    if predicted is None or not predicted.strip():
        return False
    gold_number, predicted_number = to_number(gold), to_number(predicted)
    if gold_number is not None and predicted_number is not None:
        return abs(gold_number - predicted_number) <= rel_tol * max(1.0, abs(gold_number))
    from math_verify import verify

    _, verify_kwargs = _math_verify_kwargs()
    parsed_gold, parsed_predicted = _parse(strip_units(gold)), _parse(strip_units(predicted))
    if parsed_gold and parsed_predicted and verify(parsed_gold, parsed_predicted, **verify_kwargs):
        return True
    return _plain(gold) == _plain(predicted)


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("$").strip().rstrip(".")).lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def free_form_candidate(text: str, *, numeric: bool) -> str | None:
    """The free-form answer in a response: the cue answer (boxed / "answer is"); else the whole text when it
    is short (at most 5 words, e.g. "12 cm", "\\frac{1}{2}"); else, for numeric answers, the last number.
    For a numeric answer a cue holding words and a number ("it is 12 units long") gives its last number.
    None when nothing qualifies (an extraction failure)."""
    candidate = cue_answer(text)
    if candidate is None and len(text.split()) <= 5 and text.strip():
        candidate = text.strip()
    if numeric:
        if candidate is not None and to_number(candidate) is None and numbers_in(candidate):
            return numbers_in(candidate)[-1]
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
