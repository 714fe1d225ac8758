"""The p-value computed without scipy matches mpmath's incomplete beta / Student t; answer extraction and
grading (math-verify for mathematical answers, words otherwise), in the main thread and in a worker thread."""

import math
import threading

import mpmath
import pytest

from megatron_avar.analysis.stats import pearson, regularized_incomplete_beta, student_t_two_sided_p
from megatron_avar.grading import INTERVENTION, extract_answer, grade
from megatron_avar.models.layer_sets import middle_layers, parse_layers


@pytest.mark.parametrize("df", [1, 2, 3, 8, 30, 500])
@pytest.mark.parametrize("t", [0.05, 1.0, 2.5, 7.0])  # extreme tails: see the incomplete beta test
def test_student_t_p_value_matches_mpmath(df, t):
    # Two-sided tail of Student's t by direct integration of its density (independent of the beta identity).
    density = lambda x: mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2)) \
        * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    with mpmath.workdps(30):
        expected = float(2 * mpmath.quad(density, [t, 10 * t, 100 * t, mpmath.inf]))
    assert student_t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-8, abs=1e-300)


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (15.0, 0.5, 0.2), (250.0, 0.5, 0.999),
                                   (250.0, 0.5, 500 / (500 + 40.0**2)), (15.0, 0.5, 30 / (30 + 40.0**2))])
def test_incomplete_beta_matches_mpmath(a, b, x):
    with mpmath.workdps(50):  # the last two are p-values of t = 40 (~1e-158, ~1e-27)
        expected = float(mpmath.betainc(a, b, 0, x, regularized=True))
    assert regularized_incomplete_beta(x, a, b) == pytest.approx(expected, rel=1e-10)


def test_pearson():
    x = [7.5, 10.1, 13.8, 18.9, 9.0]
    y = [49.1, 51.0, 52.6, 56.1, 50.2]
    r, p = pearson(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    expected_r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert r == pytest.approx(expected_r, rel=1e-12) and 0 < p < 0.01
    assert pearson([1, 2], [3, 1]) == (pytest.approx(-1.0), None)
    with pytest.raises(ValueError, match="constant"):
        pearson([1, 1, 1], [1, 2, 3])


CASES = [
    ("<think>the legs are 3 and 4</think><answer>\\frac{1}{2}</answer>", "0.5", True, "\\frac{1}{2}"),
    ("so the result is \\boxed{\\frac{3}{4}} indeed", "0.75", True, "\\frac{3}{4}"),
    ("I count 7 red shapes, maybe 8", "8", True, "8"),
    ("<answer>Red</answer>", "red", True, "Red"),
    ("<answer>blue</answer>", "red", False, "blue"),
    ("<answer>12</answer> and later <answer>13</answer>", "13", True, "13"),
    ("no answer at all", "5", False, "no answer at all"),
]


@pytest.mark.parametrize("generated,truth,correct,extracted", CASES)
def test_grade_answer(generated, truth, correct, extracted):
    assert extract_answer(generated, INTERVENTION).text == extracted
    graded = grade(generated, truth, INTERVENTION)
    assert (graded.correct, graded.answer) == (correct, extracted)


def test_grade_answer_in_a_worker_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(grade("<answer>0.5</answer>", "\\frac{1}{2}",
                                                                  INTERVENTION)))
    worker.start()
    worker.join()
    assert [(graded.correct, graded.answer) for graded in results] == [(True, "0.5")]


def test_layer_sets():
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("0-2, 5", 28) == (0, 1, 2, 5)
    assert middle_layers(28) == tuple(range(8, 14)) and parse_layers("middle", 2) == (1,)
    for bad, message in (("3-1", "cannot read"), ("x", "cannot read"), ("28", "out of range"), ("-1", "out of range")):
        with pytest.raises(ValueError, match=message):
            parse_layers(bad, 28)
