"""Means and 95% confidence intervals (Student's t), the summary statistics of a results file."""
from __future__ import annotations

import math
from typing import Sequence

# two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; beyond: the normal 1.96
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """t_{0.975, df}: 95% two-sided Student quantile (1.96 for df > 30)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean ± t_{0.975,n-1} · s/√n (s: sample standard deviation); (nan, nan) for n < 2."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    m = mean(values)
    s = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))
    h = t975(n - 1) * s / math.sqrt(n)
    return (m - h, m + h)
