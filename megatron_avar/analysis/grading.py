"""Grade a generated answer against the ground truth (for `avar intervene`): extract, then compare with the
evaluation's rules (`megatron_avar.eval.answers.math_equal`: numbers with units stripped, math-verify's
symbolic equivalence — ``\\frac{1}{2}`` equals ``0.5`` — and finally case-folded text).

Extraction order: the last `<answer>…</answer>`; else the last `\\boxed{…}`; else the last number in the
text; else the whole text.
"""

from __future__ import annotations

import re

from megatron_avar.eval.answers import last_boxed, math_equal, numbers_in

__all__ = ["extract_answer", "grade_answer"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str:
    """The final answer inside a generated text (see the module docstring for the order)."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = numbers_in(text)
    if numbers:
        return numbers[-1]
    return text.strip()


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def grade_answer(generated: str, truth: str) -> tuple[bool, str]:
    """(correct, extracted answer) for one generated text and its ground-truth answer string."""
    extracted = extract_answer(generated)
    correct = math_equal(truth, extracted) or (bool(_words(extracted)) and _words(extracted) == _words(truth))
    return correct, extracted
