"""Summary statistics of benchmark rows: means with Student-t intervals over seeds, paired differences, and a
baseline's copy rate at a given quality (its trade-off curve read at that point)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

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


def copy_rate_at_quality(curve: Sequence[tuple[float, float]], quality: float) -> float | None:
    """The lowest copy rate that a method's trade-off curve reaches while keeping at least `quality`.

    `curve` is the method's measured points ``(quality kept, copy rate)`` in the order of the update energy they
    keep (from the base, 0 energy, to the LoRA, all of it); between two neighbouring points the method is taken to
    move along the straight line (a budget between two measured ones). On each segment the copy rate is lowest,
    subject to quality >= `quality`, at an end point or where the segment crosses `quality`. None when no point
    of the curve keeps that much quality (the method cannot be matched there)."""
    candidates = [copy for kept, copy in curve if kept >= quality]
    for (q0, c0), (q1, c1) in pairwise(curve):
        if (q0 - quality) * (q1 - quality) < 0:  # the segment crosses the quality level strictly inside
            candidates.append(c0 + (quality - q0) / (q1 - q0) * (c1 - c0))
    return min(candidates, default=None)
