"""The shared extraction rules against hand-worked examples (docs/evaluation.md, 'Shared rules') and math-verify."""

import threading

import pytest

from megatron_avar.eval.answers import can_infer, free_form_candidate
from megatron_avar.grading import EVAL_HARNESS, cue_answer, edit_distance, extract_answer, math_equal, to_number

ABCD = {"A": "circle", "B": "square", "C": "triangle", "D": "star"}


@pytest.mark.parametrize("response, text, source", [
    ("<think>look</think><answer> 5 </answer>", "5", "answer_tag"),
    ("<answer>1</answer> then <answer>2</answer>", "2", "answer_tag"),  # the last answer block
    ("<think>a</think>B", "B", "after_think"),
    ("<think>a</think><think>b</think> C", "C", "after_think"),  # the text after the LAST </think>
    ("<think>never closed <answer>", None, "unclosed_think"),  # an unclosed <answer> is no answer block
    ("plain answer", "plain answer", "raw"),
])
def test_harness_rule(response, text, source):
    answer = extract_answer(response, EVAL_HARNESS)
    assert (answer.text, answer.source) == (text, source)
    assert answer.format_failure == (text is None)


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("[B]", "B"), ("**B**", "B"),
    ("<answer>B</answer>", None),  # `<` `>` are not separators in VLMEvalKit: the harness rule unwraps first
    ("A or B", None),  # two letters, no option text
    ("The answer is B", "B"),
    # The letter is not in the last 4 tokens (#1175).
    ("B is right because the figure shows four equal sides and right angles", None),
    # found in review: VLMEvalKit checks the letter's first occurrence, not any (splits.index(ch) > len - 5)
    ("B might look right at first glance, so let me check again: B", None),
    ("It must be the square", "B"),  # exactly one option text inside
    ("a square or a circle", None),  # two option texts
    ("Z", None),  # Z only counts when the choices carry a Z option
])
def test_can_infer(answer, expected):
    assert can_infer(answer, ABCD) == expected


def test_can_infer_rules_switchable():
    long = "B is right because the figure shows four equal sides and right angles"
    assert can_infer(long, ABCD, last_tokens=None) == "B"  # VLMEvalKit before #1175
    assert can_infer("None of them: Z", {**ABCD, "Z": "none"}) == "Z"
    assert can_infer("I think the answer is C, not A", ABCD) == "C"  # "answer is X" fallback (#1552)
    assert can_infer("I think the answer is C, not A", ABCD, answer_is_fallback=False) is None


@pytest.mark.parametrize("text, cue", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1} first, then \\boxed{x^{2}}", "x^{2}"),  # the last box, nested braces kept
    ("The answer is 42.", "42"),
    ("Answer: (B)\nbecause ...", "(B)"),
    ("Final answer: $3$", "3"),
    ("no cue here", None),
])
def test_cue_answer(text, cue):
    assert cue_answer(text) == cue


@pytest.mark.parametrize("text, value", [
    ("12 cm", 12.0), ("45°", 45.0), ("60^\\circ", 60.0), ("1,000", 1000.0), ("-2.5", -2.5), ("3/4", 0.75),
    ("\\frac{3}{4}", 0.75), ("$5$", 5.0), ("50\\%", 50.0), ("12\\text{ m}", 12.0), ("abc", None), (None, None),
    # digit groups apart by LaTeX spacing or blanks are one number (math-verify read "1\\,000" as 0)
    ("1\\,000", 1000.0), ("12\\,500", 12500.0), ("1{,}000", 1000.0), ("2 500 000", 2500000.0), ("**12**", 12.0),
    # words: the one number they state, or none (math-verify read the last: "12 because 3 rows of 4" -> 4)
    ("the side is 13 cm long", 13.0), ("12 because 3 rows of 4", None), ("12 (3 rows of 4)", None),
    ("either 3 or 4", None),
])
def test_to_number(text, value):
    result = to_number(text)
    assert (result is None) if value is None else result == pytest.approx(value)


def test_to_number_evaluates_latex_like_sympy():
    import math

    assert to_number("2\\sqrt{2}") == pytest.approx(2 * math.sqrt(2))
    assert to_number("\\frac{\\pi}{4}") == pytest.approx(math.pi / 4)


@pytest.mark.parametrize("gold, predicted, equal", [
    ("0.5", "\\frac{1}{2}", True), ("\\frac{1}{2}", "0.5", True), ("0.75", "3/4", True),
    ("12", "12 cm", True), ("60°", "60", True), ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("x+1", "1+x", True), ("(1,2)", "(1, 2)", True), ("12", "13", False), ("0.5", "0.51", False),
    ("Paris", "paris", True), ("12", "", False), ("12", None, False),
    # units are words after a number; mathematics after a number is not a unit
    ("5", "5 m/s", True), ("12", "12 cm^2", True), ("3", "3 square units", True), ("1000", "1e3", True),
    ("2", "2x", False), ("3", "3x^2", False), ("3x^2", "3", False), ("2", "2 pi", False),
    ("2", "2 sqrt 2", False), ("2", "2 and 3", False),
    # an answer in words is not whichever of its numbers math-verify reads (the last)
    ("4", "12 (3 rows of 4)", False), ("4", "12 because 3 rows of 4", False), ("3", "either 3 or 4", False),
    ("7", "the answer is 7", True), ("Yes", "yes", True), ("ab", "ba", True), ("7", "so \\boxed{7}", True),
    # digit groups and Markdown emphasis
    ("12500", "12\\,500", True), ("0", "1\\,000", False), ("12", "**12**", True),
    # unit words after an expression, as after a number
    ("\\frac{1}{2}", "\\frac{1}{2} units", True), ("3\\pi", "3\\pi square units", True),
    ("2\\sqrt{3}", "2\\sqrt{3} cm", True),
    # found in review: a \\text{} unit was deleted and its exponent left ("12 ^2" = 144), its words too ("2 3" = 5)
    ("12", "12 \\text{ cm}^2", True), ("144", "12 \\text{ cm}^2", False), ("12", "12 \\mathrm{cm}^{2}", True),
    ("12", "12\\ \\text{cm}^2", True), ("5", "2 \\text{ and } 3", False), ("7", "3 4", False),
])
def test_math_equal(gold, predicted, equal):
    assert math_equal(gold, predicted) is equal


def test_math_equal_outside_the_main_thread():
    # math-verify's SIGALRM timeouts only work in the main thread; we switch them off elsewhere.
    results = []
    thread = threading.Thread(target=lambda: results.append((math_equal("x+1", "1+x"),
                                                             math_equal("\\sqrt{2}", "1.4142136"))))
    thread.start()
    thread.join()
    assert results == [(True, True)]


def test_answers_too_large_to_evaluate_are_graded_at_once_in_any_thread():
    """A power tower or a triple factorial kept sympy busy for hours, holding the GIL (a GRPO step or the
    synthesis thread pool stalled); in a subprocess, so that a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    code = ("import threading; from megatron_avar.grading import math_equal, to_number; "
            "towers = ['10^{10^{10^{10}}}', '10!!!', '2^{10^9}']; "
            "found = []; worker = threading.Thread(target=lambda: found.extend([to_number(t) for t in towers] + "
            "[math_equal('5', t) for t in towers] + [math_equal(towers[0], towers[0])])); "
            "worker.start(); worker.join(); print(found)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[None, None, None, False, False, False, True]", done.stderr[-2000:]
    assert to_number("100!") == pytest.approx(9.332621544394415e157) and to_number("2^{100}") == 2.0 ** 100


def test_numbers_past_a_floats_range_are_compared_as_text():
    """Found in review: 2^{10000} is inf as a float, and inf - inf is nan, so the answer was graded wrong against
    itself (and any two such numbers would be equal if compared as floats)."""
    assert math_equal("2^{10000}", "2^{10000}") and not math_equal("2^{10000}", "3^{10000}")


def test_free_form_candidate():
    assert free_form_candidate("The side is 13 cm long and more words follow", numeric=True) == "13"
    assert free_form_candidate("\\frac{1}{2}", numeric=True) == "\\frac{1}{2}"
    assert free_form_candidate("The answer is about 7 meters", numeric=True) == "7"
    assert free_form_candidate("a long sentence without any number in it", numeric=True) is None
    # a numeric cue: the number it states first, unless every number is part of an expression
    assert free_form_candidate("The answer is 7 because 3 red and 4 green", numeric=True) == "7"
    assert free_form_candidate("The answer is x = 5.", numeric=True) == "5"
    assert free_form_candidate("The answer is 12x", numeric=True) == "12x"
    assert free_form_candidate("\\boxed{x^2 + 3}", numeric=True) == "x^2 + 3"
    assert free_form_candidate("The answer is 12 (3 rows of 4)", numeric=True) == "12"
    # an expression answer is read whole
    assert free_form_candidate("The answer is y = 2x + 1", numeric=False) == "y = 2x + 1"
    # Markdown emphasis is not part of the answer; a power written with ** is
    assert free_form_candidate("The answer is **12**.", numeric=True) == "12"
    assert free_form_candidate("**Yes**", numeric=False) == "Yes"
    assert free_form_candidate("Answer: __12 apples__", numeric=True) == "12 apples"
    assert free_form_candidate("x**2 + y**2", numeric=False) == "x**2 + y**2"


@pytest.mark.parametrize("name", ["mathverse_vo", "mathvision"])
@pytest.mark.parametrize("gold, response, correct", [
    ("y=2x+1", "\\boxed{y=2x+1}", True), ("(1,2)", "\\boxed{(1,2)}", True), ("[-3,3]", "\\boxed{[-3,3]}", True),
    ("x^2+1", "The answer is x^2+1", True), ("y=2x+1", "\\boxed{y=2x+3}", False), ("3", "The answer is 3x", False),
])
def test_free_form_benchmarks_read_expression_answers_whole(name, gold, response, correct):
    from megatron_avar.eval.benchmarks import get_benchmark

    target = {"answer": gold, "question_type": "free-form", "is_mcq": False, "options": []}
    assert get_benchmark(name).judge(response, target).correct is correct


@pytest.mark.parametrize("name, target, response, correct", [
    ("mathvista", {"question_type": "free_form", "answer_type": "integer", "answer": "1000", "precision": None},
     "The answer is $1\\,000$.", True),
    ("mathvista", {"question_type": "free_form", "answer_type": "text", "answer": "Yes", "precision": None},
     "**Yes**", True),
    ("mathvision", {"answer": "12", "is_mcq": False, "options": []}, "The answer is **12**.", True),
    ("mathvision", {"answer": "4", "is_mcq": False, "options": []}, "\\boxed{12 (3 rows of 4)}", False),
    ("mathvision", {"answer": "12", "is_mcq": False, "options": []}, "\\boxed{12 (3 rows of 4)}", True),
])
def test_benchmarks_read_grouped_digits_emphasis_and_answers_in_words(name, target, response, correct):
    """Found in review: "$1\\,000$" was read as 0, a bold answer as "**12**" (wrong, and not an extraction
    failure, so --judge never saw it), and "12 (3 rows of 4)" as 4."""
    from megatron_avar.eval.benchmarks import get_benchmark

    assert get_benchmark(name).judge(response, target).correct is correct


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert edit_distance("5cm", "5 cm") == 1
