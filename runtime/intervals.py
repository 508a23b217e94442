"""Confidence intervals of the drift figures (standard library only).

A drift figure is a count over a finite image set: 98 % agreement on 400 images is 392 of them, and a
second set of 400 images would give another count. These intervals say how far: Wilson's score interval
for a proportion (agreement, top-1), and Newcombe's interval for the difference of two proportions
measured on the same images (the top-1 drop, paired: it uses the images on which only one model is right).
"""

from __future__ import annotations

import math

#: The confidence of every interval edgeship reports, and its normal quantile.
CONFIDENCE = 0.95
Z = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson's score interval of ``successes / n`` (fractions; (0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - half) / scale), min(1.0, (centre + half) / scale)


def paired_difference(both: int, first_only: int, second_only: int, neither: int, z: float = Z) -> tuple[float, float]:
    """Newcombe's (1998, method 10) interval of p1 - p2 for two proportions on the same n items.

    ``first_only``: items only the first is right on; ``second_only``: only the second. With
    ``both`` and ``neither`` unknown to the caller's split (-1), the two are taken as independent
    (phi = 0), which widens the interval.
    """
    n = both + first_only + second_only + neither
    if n <= 0:
        return -1.0, 1.0
    p1, p2 = (both + first_only) / n, (both + second_only) / n
    (l1, u1), (l2, u2) = wilson(both + first_only, n, z), wilson(both + second_only, n, z)
    phi = _phi(both, first_only, second_only, neither)
    d = p1 - p2
    lower = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    upper = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, d - math.sqrt(max(lower, 0.0))), min(1.0, d + math.sqrt(max(upper, 0.0)))


def independent_difference(k1: int, k2: int, n: int, z: float = Z) -> tuple[float, float]:
    """Newcombe's interval of k1/n - k2/n when the pairing is unknown (phi = 0: wider than the paired one)."""
    if n <= 0:
        return -1.0, 1.0
    p1, p2 = k1 / n, k2 / n
    (l1, u1), (l2, u2) = wilson(k1, n, z), wilson(k2, n, z)
    d = p1 - p2
    return max(-1.0, d - math.hypot(p1 - l1, u2 - p2)), min(1.0, d + math.hypot(u1 - p1, p2 - l2))


def _phi(a: int, b: int, c: int, d: int) -> float:
    """The correlation of the two models' right/wrong over the items (0 when undefined)."""
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    return (a * d - b * c) / math.sqrt(denom) if denom > 0 else 0.0


def percent(interval: tuple[float, float], digits: int = 2) -> tuple[float, float]:
    """A fraction interval in percent (points), rounded for reports."""
    return round(100.0 * interval[0], digits), round(100.0 * interval[1], digits)
