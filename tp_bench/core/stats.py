"""Small statistics shared by the summaries, the comparison, the gate and the sweep."""

from __future__ import annotations

import math
from typing import Sequence


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value that ``x`` tends to be larger than ``y`` (Mann-Whitney U test).

    Normal approximation with the tie and continuity corrections, good from about 8 values a
    side; with fewer it is conservative enough for a gate but should not be quoted as exact.
    """
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("mann_whitney_greater needs values on both sides")
    ranked = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(ranked)
    ties = 0.0
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1          # average rank of a tie group
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    rank_sum_x = sum(r for r, (_, side) in zip(ranks, ranked) if side == 0)
    u = rank_sum_x - n * (n + 1) / 2
    total = n + m
    variance = n * m / 12 * ((total + 1) - ties / (total * (total - 1)))
    if variance <= 0:
        return 0.5 if u == n * m / 2 else (0.0 if u > n * m / 2 else 1.0)
    z = (u - n * m / 2 - 0.5) / math.sqrt(variance)
    return _normal_sf(z)
