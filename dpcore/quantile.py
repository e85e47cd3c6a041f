"""Percentiles of samples: the one implementation every report in dpcore uses."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The *q*-quantile (``0 <= q <= 1``) of *values*, interpolating linearly between the
    two nearest samples (numpy's default method); NaN when there are none."""
    if not 0.0 <= q <= 1.0:
        msg = f"quantile must be in [0, 1], got {q!r}"
        raise ValueError(msg)
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
