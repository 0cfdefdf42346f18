"""Summary statistics shared by the service's figures and the tools (benchmark, soak, eval):
one percentile and one mean for the whole code base."""

from __future__ import annotations

import math
from collections.abc import Iterable


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; None for no values."""
    xs = list(values)
    return (sum(xs) / len(xs)) if xs else None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The `q`-th percentile (0-100), linear interpolation between closest ranks (numpy's
    default method); None for no values. Sorts a copy: the input need not be sorted."""
    xs = sorted(values)
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
