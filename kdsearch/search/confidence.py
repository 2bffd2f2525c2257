"""How sure a mean over seeds is: Student's t interval of the mean, and Welch's t-test of whether a row's mean
differs from the best row's. With 3 seeds an interval is wide; that width is the honest answer. No Ray or MLflow."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

LEVEL = 0.95
"""Two-sided confidence of the intervals and of the test (alpha = 1 - LEVEL)."""


def t_interval(scores: Sequence[float], level: float = LEVEL) -> float | None:
    """Half-width of the two-sided `level` t interval of the mean of `scores`; None below two scores."""
    from scipy import stats

    if len(scores) < 2:
        return None
    return float(stats.t.ppf(0.5 + level / 2, len(scores) - 1) * statistics.stdev(scores) / math.sqrt(len(scores)))


def within_noise(best: Sequence[float], other: Sequence[float], level: float = LEVEL) -> bool | None:
    """True when Welch's two-sided t-test cannot tell `other`'s mean from `best`'s at 1 - `level`; None when
    either has fewer than two scores. Identical constant scores are within noise of each other."""
    from scipy import stats

    if len(best) < 2 or len(other) < 2:
        return None
    if statistics.pstdev(best) == 0 and statistics.pstdev(other) == 0:
        return statistics.fmean(best) == statistics.fmean(other)
    return bool(stats.ttest_ind(best, other, equal_var=False).pvalue >= 1 - level)
