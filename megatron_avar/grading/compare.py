"""Whether an extracted answer equals the ground truth: numbers, then mathematics, then text.

:func:`math_equal` is the project's one comparison (GRPO's r_acc, synthesis verification, the free-form
benchmarks of `avar eval`, `avar intervene`); :func:`same_words` is the looser text rule `avar intervene`
adds for answers in words. math-verify is imported on first use (it is slow to import).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any, cast

from megatron_avar.grading.spans import standalone_numbers, without_emphasis

__all__ = ["strip_units", "has_words", "to_number", "math_equal", "same_words", "math_equal_or_same_words",
           "edit_distance"]

# Digit groups apart by LaTeX spacing or braces ("1\\,000", "12{,}500", "1\\!000"): one number, before the spacing
# commands become blanks.
_DIGIT_GROUPS = re.compile(r"(?<=\d)(?:\\[,!;:]|\{,\}|\\ )(?=\d{3}(?!\d))")
# LaTeX text ("12 \\text{ cm}^2", "2 \\text{ and } 3"): its words, read as the unit words or the mathematics they are
# (deleted, "12 \\text{ cm}^2" read 12^2 = 144 and "2 \\text{ and } 3" 23)
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|mbox)\{([^}]*)\}")
_UNIT_NOISE = re.compile(r"\^\{?\\circ\}?|°|\\circ|\\%|%|\$|\\,|\\!|\\;|\\ ")


# Words a number may carry as its unit ("12 cm", "5 m/s", "3 square units", "4 apples"). A single letter counts
# only when it is a unit symbol here: "2x", "3 x^2" and "2 pi" are mathematics, not 2 with a unit.
_UNIT_LETTERS = frozenset("mgslLNJWVAKh")
_MATH_WORDS = frozenset({"pi", "sqrt", "and", "or", "to", "ln", "log", "exp", "sin", "cos", "tan", "cot", "csc",
                         "arcsin", "arccos", "arctan", "times", "plus", "minus", "over", "divided", "by", "of",
                         "infty", "infinity", "inf", "not", "than", "i", "e", "sinh", "cosh", "tanh", "mod",
                         "max", "min", "gcd", "lcm", "lim", "deg", "rad", "dx", "dy", "dt"})
_UNIT_WORD = r"[a-zA-Z]+(?:\^\{?[23]\}?|[²³])?"
_WITH_UNIT = re.compile(rf"([-+]?[\d.,/]*\d[\d.,/]*)\s*({_UNIT_WORD}(?:(?:\s+|\s*/\s*){_UNIT_WORD})*)\s*\.?")
# The same words after an expression that ends in a digit, a brace or a LaTeX command ("\frac{1}{2} units",
# "3\pi square units"), apart from it by a blank.
_EXPRESSION_WITH_UNIT = re.compile(
    rf"(.*?(?:\d|\}}|\\[a-zA-Z]+))\s+({_UNIT_WORD}(?:(?:\s+|\s*/\s*){_UNIT_WORD})*)\s*\.?")


def _is_unit(phrase: str) -> bool:
    words = [re.sub(r"\^\{?[23]\}?|[²³]", "", word) for word in re.split(r"\s+|\s*/\s*", phrase.strip())]
    return all(word.lower() not in _MATH_WORDS and (len(word) > 1 or word in _UNIT_LETTERS) for word in words)


def strip_units(text: str) -> str:
    """Remove Markdown emphasis ("**12**"), degree signs, percent signs, ``$``, LaTeX spacing (digit groups
    joined: "1\\,000" -> "1000") and ``\\text{…}`` units, then the unit words
    after a number or an expression ("12 cm" -> "12", "5 m/s" -> "5", "45°" -> "45", "3 square units" -> "3",
    "\\frac{1}{2} units" -> "\\frac{1}{2}"); leaves other text
    as it is. Mathematics after a number is not a unit: "2x", "3x^2", "2 pi", "2 sqrt 2", "2 and 3" and "1e3"
    stay whole (a single letter is a unit only when it is a unit symbol: m, g, s, l, L, N, J, W, V, A, K, h)."""
    cleaned = _LATEX_TEXT.sub(lambda match: " " + match.group(1).strip(), without_emphasis(text))
    cleaned = _UNIT_NOISE.sub(" ", _DIGIT_GROUPS.sub("", cleaned)).strip()
    for pattern in (_WITH_UNIT, _EXPRESSION_WITH_UNIT):
        match = pattern.fullmatch(cleaned)
        if match and _is_unit(match.group(2)):
            return match.group(1).strip()
    return cleaned.strip()


_LATEX_COMMAND = re.compile(r"\\[a-zA-Z]+")
_WORD = re.compile(r"(?<![a-zA-Z])[a-zA-Z]{2,}(?![a-zA-Z])")
# Words of two letters that are English, not a product of two variables ("ab", "xy" are mathematics).
_SHORT_WORDS = frozenset({"is", "in", "on", "at", "it", "so", "an", "as", "be", "we", "if", "no", "am", "are"})


def _is_prose(text: str) -> bool:
    """Whether ``text`` (units stripped) holds a word that is neither mathematics nor a LaTeX command: one of
    three letters or more ("because", "rows", "Paris") or a two-letter English word ("is", "in"). math-verify
    reads such text as one of its numbers ("12 because 3 rows of 4" -> 4). Text holding a ``\\boxed{}`` is not
    prose: math-verify reads the box ("so \\boxed{7}" -> 7)."""
    words = _WORD.findall(_LATEX_COMMAND.sub(" ", text))
    return "\\boxed" not in text and any(
        word.lower() not in _MATH_WORDS and (len(word) > 2 or word.lower() in _SHORT_WORDS) for word in words)


def has_words(text: str) -> bool:
    """Whether ``text`` holds words besides its units and its mathematics ("about 7 meters", "12 (3 rows of
    4)"; not "12 cm", "2 pi", "x = 5"): an answer in a sentence, which is compared as text unless it states a
    single number (:func:`to_number`)."""
    return _is_prose(strip_units(text))


class _TimeoutOffNotice(logging.Filter):
    """Drops math-verify's "Timeout is disabled ..." notice: its timeout is off here on purpose (below), and the
    notice came once per process and module, four times in an `avar synth` run (found in review)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_NOTICE_FILTER = _TimeoutOffNotice()


def _math_verify_kwargs() -> tuple[dict, dict]:
    # math-verify times out with SIGALRM, which only works in the main thread
    # (docs/installation.md, 'Known dependency quirks').
    if threading.current_thread() is threading.main_thread():
        return {}, {}
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NOTICE_FILTER)  # (a filter added twice is kept once)
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def _parse(text: str):
    from math_verify import parse

    parse_kwargs, _ = _math_verify_kwargs()
    wrapped = text if "$" in text or "\\boxed" in text else f"${text}$"
    parsed = parse(wrapped, **parse_kwargs)
    return parsed or parse(text, **parse_kwargs)


# Numbers apart by blanks ("3 4"; digit groups, "2 500 000", are one number): math-verify's parser reads their sum
_SEVERAL_NUMBERS = re.compile(r"[-+]?\d+(?:\.\d+)?(?:\s+[-+]?\d+(?:\.\d+)?)+")


def to_number(text: str | None) -> float | None:
    """The value of a numeric answer: plain ("1,000", "1\\,000", "2 500 000", "-2.5", "12 cm", "45°"), a fraction
    ("3/4") or LaTeX (``\\frac{3}{4}``, ``2\\sqrt{2}``) evaluated by math-verify; in words, the one number they state
    ("the side is 13 cm long" -> 13). None when it is not a single number: words stating several ("12 because
    3 rows of 4", "either 3 or 4") give None, not one of them."""
    if text is None:
        return None
    cleaned = strip_units(text.strip())
    grouped = re.fullmatch(r"-?\d{1,3}(?:([, ])\d{3})(?:\1\d{3})*(?:\.\d+)?", cleaned)
    plain = cleaned.replace(grouped.group(1), "") if grouped else cleaned
    try:
        return float(plain)
    except ValueError:
        pass
    if _SEVERAL_NUMBERS.fullmatch(plain):
        return None
    fraction = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", plain)
    if fraction and float(fraction.group(2)) != 0:
        return float(fraction.group(1)) / float(fraction.group(2))
    if _is_prose(cleaned):
        stated = standalone_numbers(cleaned)
        return float(stated[0]) if len(stated) == 1 else None
    for value in _parse(cleaned)[:1]:
        if hasattr(value, "evalf") and not _cheap_to_evaluate(value):
            return None  # a number too large to be an answer, and too slow to evaluate
        try:
            number = complex(value.evalf()) if hasattr(value, "evalf") else None
        except (TypeError, ValueError):
            return None
        if number is not None and abs(number.imag) < 1e-12:
            return float(number.real)
    return None


_MAX_EXPONENT = 1e4  # of a power, or argument of a factorial: 2^{100} and 100! evaluate in milliseconds


def _cheap_to_evaluate(expression) -> bool:
    """Whether sympy's ``evalf`` of a parsed answer ends quickly: every power's exponent and every factorial's
    argument is at most :data:`_MAX_EXPONENT` in size. A tower such as ``10^{10^{10^{10}}}`` or ``10!!!`` (a
    factorial of a factorial of a factorial) keeps sympy busy for hours; math-verify's own timeouts do not cover
    ``evalf``, and a policy may well write one into an answer, which would stall its GRPO step."""
    import sympy

    for node in sympy.preorder_traversal(expression):
        if isinstance(node, sympy.Pow):
            argument = node.exp
        elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)):
            argument = node.args[0]
        else:
            continue
        if not argument.is_Number and not _cheap_to_evaluate(argument):
            return False
        try:
            size = abs(complex(cast(Any, argument) if argument.is_Number else cast(Any, argument).evalf()))
        except (TypeError, ValueError):
            continue  # not a number (a free symbol): evalf stays symbolic, and to_number gives None
        if size > _MAX_EXPONENT:
            return False
    return True


def math_equal(gold: str, predicted: str | None, *, rel_tol: float = 1e-6) -> bool:
    """Whether ``predicted`` equals ``gold`` as mathematics: equal numbers (relative tolerance ``rel_tol``,
    after units/°/$ are stripped), else math-verify's symbolic equivalence (LaTeX vs plain, fractions vs
    decimals, intervals, sets), else the same lowercased text (trailing full stop and ``$`` ignored). Words
    that are neither units nor mathematics ("12 (3 rows of 4)", "Paris") are compared as text only, unless both
    sides are single numbers. None or blank ``predicted`` is never equal. An expression too large to evaluate
    (``10!!!``, a power tower) is compared as text only: sympy would run for hours on it, holding the GIL, in any
    thread."""
    if predicted is None or not predicted.strip():
        return False
    gold_number, predicted_number = to_number(gold), to_number(predicted)
    if gold_number is not None and predicted_number is not None and math.isfinite(gold_number) \
            and math.isfinite(predicted_number):  # (past a float's range, 2^{10000} and 3^{10000} are both inf)
        return abs(gold_number - predicted_number) <= rel_tol * max(1.0, abs(gold_number))
    if has_words(gold) or has_words(predicted) or any(_SEVERAL_NUMBERS.fullmatch(strip_units(side))
                                                      for side in (gold, predicted)):
        return _plain(gold) == _plain(predicted)  # words, several numbers: math-verify would compare one of them
    from math_verify import verify

    _, verify_kwargs = _math_verify_kwargs()
    parsed_gold, parsed_predicted = _parse(strip_units(gold)), _parse(strip_units(predicted))
    comparable = all(_cheap_to_evaluate(v) for v in (*parsed_gold, *parsed_predicted) if hasattr(v, "evalf"))
    if comparable and parsed_gold and parsed_predicted and verify(parsed_gold, parsed_predicted, **verify_kwargs):
        return True
    return _plain(gold) == _plain(predicted)


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("$").strip().rstrip(".")).lower()


# A number with its decimal point or thousands separators ("3.5", "2,000"), a word, or a sign that changes what
# text means ("-3" is not "3", "x>1" not "x<1", "1/2" not "1 2"). Everything else is punctuation: ".!?,;:'\"()[]{}$\\",
# a hyphen joining two words, and "*" (Markdown's emphasis far more often than a product).
_WORD_OR_SIGN = re.compile(r"\d+(?:[.,]\d+)*|\w+|[-+/^<>=%±×÷≤≥≠√°]")
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")


def _words(text: str) -> list[str]:
    return _WORD_OR_SIGN.findall(_WORD_HYPHEN.sub(" ", text.casefold().replace("\u2212", "-")))  # (U+2212 minus)


def same_words(gold: str, predicted: str | None) -> bool:
    """Whether both hold the same words, numbers and mathematical signs, ignoring case, spacing and punctuation
    ("Red!" = "red", "dark-red" = "dark red", "(A)" = "A"; but "-3" != "3", "x>1" != "x<1", "3.5" != "3 5");
    blank or punctuation-only text is never equal."""
    if predicted is None:
        return False
    words = _words(predicted)
    return bool(words) and words == _words(gold)


def math_equal_or_same_words(gold: str, predicted: str | None) -> bool:
    """:func:`math_equal`, else :func:`same_words`: the comparison of `avar intervene`."""
    return math_equal(gold, predicted) or same_words(gold, predicted)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]
