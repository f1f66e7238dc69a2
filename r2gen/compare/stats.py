"""Statistics of the multi-seed comparison, as pure functions: the t distribution, t tests, noise rules.

The t distribution is computed here (regularized incomplete beta by its continued fraction), so
scipy is not needed. Welch's test compares a precision's per-seed values with fp32's (unequal
variances); a ratio computed against fp32 inside each experiment gets a one-sample test against its
no-difference value. With one seed there is no variance estimate: :func:`score_noise` is the rule
of thumb the single-run report states instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

ALPHA = 0.05
# One seed gives no variance estimate. Rules of thumb, stated in the single-run report next to each use:
LOSS_RULE = 0.02  # relative test-loss difference that one seed cannot tell from noise
TIMING_RULE = 0.05  # relative throughput difference within run-to-run timing noise on a shared machine


# ---------------------------------------------------------------------------------------- t distribution
def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (``df`` need not be an integer)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_critical(df: float, alpha: float = ALPHA) -> float:
    """The two-sided critical value: P(|T| >= t) = alpha (bisection on :func:`t_two_sided_p`)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > alpha:
        hi *= 2
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """Per-seed values of one metric for one precision in one group."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n − 1); None for a single value."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


@dataclass(frozen=True)
class Difference:
    """A precision's difference from fp32 and whether it exceeds the seed-to-seed spread."""

    test: str  # "Welch" | "one-sample"
    diff: float  # mean of p − mean of fp32 (ratio metrics: mean − the no-difference value)
    relative: float | None  # diff / |fp32 mean|
    ci: tuple[float, float]  # 95% confidence interval of diff
    p_value: float
    df: float | None  # None when both sides have no spread at all

    @property
    def exceeds(self) -> bool:
        return self.p_value < ALPHA


def welch_test(values: Sequence[float], reference: Sequence[float], alpha: float = ALPHA) -> Difference | None:
    """Two-sided Welch's t-test of mean(values) − mean(reference); None with fewer than 2 values a side.

    Without any spread on either side the difference is exact: p is 0 (or 1 when it is 0).
    """
    a, b = Stat(tuple(values)), Stat(tuple(reference))
    if a.n < 2 or b.n < 2:
        return None
    diff = a.mean - b.mean
    relative = diff / abs(b.mean) if b.mean else None
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference("Welch", diff, relative, (diff, diff), 0.0 if diff else 1.0, None)
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    half = t_critical(df, alpha) * se
    return Difference("Welch", diff, relative, (diff - half, diff + half), t_two_sided_p(diff / se, df), df)


def one_sample_test(values: Sequence[float], null: float, alpha: float = ALPHA) -> Difference | None:
    """Two-sided one-sample t-test of mean(values) against ``null``; None with fewer than 2 values."""
    s = Stat(tuple(values))
    if s.n < 2:
        return None
    diff = s.mean - null
    relative = diff / abs(null) if null else None
    se = s.std / math.sqrt(s.n)
    if se == 0:
        return Difference("one-sample", diff, relative, (diff, diff), 0.0 if diff else 1.0, None)
    df = s.n - 1
    half = t_critical(df, alpha) * se
    return Difference("one-sample", diff, relative, (diff - half, diff + half), t_two_sided_p(diff / se, df), df)


def detectable_difference(n: int, alpha: float = ALPHA) -> float | None:
    """The difference, in seed standard deviations, that Welch's test flags half the time with n seeds a side.

    At equal spreads the test flags when |diff| > t_crit × s × sqrt(2/n); a true difference of exactly
    that size is flagged about half the time.
    """
    if n < 2:
        return None
    return t_critical(2 * (n - 1), alpha) * math.sqrt(2 / n)


def score_noise(test_studies: int | None) -> float | None:
    """1/sqrt(n): about two standard errors of test-set sampling alone for a mean score in [0, 1]."""
    return 1.0 / math.sqrt(test_studies) if test_studies else None
