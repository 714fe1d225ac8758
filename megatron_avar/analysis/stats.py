"""Pearson correlation with its two-sided p-value (scipy when installed, else the same t-test computed here).

Under the null hypothesis of no correlation, t = r * sqrt((n - 2) / (1 - r^2)) follows Student's t with
df = n - 2 degrees of freedom; the two-sided p-value is P(|T| >= |t|) = I_x(df / 2, 1 / 2) with
x = df / (df + t^2), I the regularized incomplete beta function. That is what scipy.stats.pearsonr
returns; here I_x is evaluated with its continued fraction (modified Lentz method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pearson", "student_t_two_sided_p", "regularized_incomplete_beta"]


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1 (relative accuracy ~1e-14)."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0 and 0 <= x <= 1, got x={x}, a={a}, b={b}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the continued fraction converges fast only below this point: use symmetry
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float | None]:
    """(r, two-sided p-value); p is None for n = 2 (r = +-1 by construction). Needs n >= 2 and variance."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"pearson needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    sxx = sum((v - mean_x) ** 2 for v in x)
    syy = sum((v - mean_y) ** 2 for v in y)
    if sxx == 0 or syy == 0:
        raise ValueError("pearson: one of the sequences is constant; the correlation is undefined")
    r = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / math.sqrt(sxx * syy)
    r = max(-1.0, min(1.0, r))
    if n == 2:
        return r, None
    try:
        from scipy import stats
    except ImportError:
        stats = None
    if stats is not None:
        return r, float(stats.pearsonr(x, y).pvalue)
    df = n - 2
    if abs(r) == 1.0:
        return r, 0.0
    return r, student_t_two_sided_p(r * math.sqrt(df / (1.0 - r * r)), df)
