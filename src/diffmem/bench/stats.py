"""Summary statistics of benchmark rows: means with Student-t intervals over seeds, paired differences."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its Student-t confidence interval (None with fewer than two values)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * spread / math.sqrt(len(values))


def format_interval(values: Sequence[float], digits: int = 2, percent: bool = False) -> str:
    """``mean ± half-width`` (or just the mean for one value), optionally as percentages."""
    mean, half = mean_interval(values)
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    text = f"{mean * scale:.{digits}f}{suffix}"
    return text if half is None else f"{text} ± {half * scale:.{digits}f}{suffix}"
