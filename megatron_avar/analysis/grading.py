"""Grade a generated answer against the ground truth: extract the final answer, then math-verify.

Extraction order: the last `<answer>…</answer>`; else the last `\\boxed{…}`; else the last number in the
text; else the whole text. Grading: math-verify's parse + verify (``\\frac{1}{2}`` equals ``0.5``); where
the ground truth is not mathematical (a colour word, an option letter) math-verify parses nothing and the
answers are compared as case-folded words. math-verify's timeouts use signals, which exist only in the main
thread: elsewhere they are turned off (parsing_timeout / timeout_seconds = None).
"""

from __future__ import annotations

import re
import threading

__all__ = ["extract_answer", "grade_answer"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None  # unbalanced: the generation was cut off inside the box


def extract_answer(text: str) -> str:
    """The final answer inside a generated text (see the module docstring for the order)."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return text.strip()


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def grade_answer(generated: str, truth: str) -> tuple[bool, str]:
    """(correct, extracted answer) for one generated text and its ground-truth answer string."""
    from math_verify import parse, verify

    extracted = extract_answer(generated)
    main = threading.current_thread() is threading.main_thread()
    timeouts = {} if main else {"parsing_timeout": None}
    gold = parse(f"${truth}$" if "$" not in truth else truth, **timeouts)
    if not gold:
        gold = parse(truth, **timeouts)
    if gold:
        prediction = parse(f"${extracted}$" if "$" not in extracted else extracted, **timeouts) or parse(extracted, **timeouts)
        if prediction and verify(gold, prediction, **({} if main else {"timeout_seconds": None})):
            return True, extracted
    return bool(_words(extracted)) and _words(extracted) == _words(truth), extracted
