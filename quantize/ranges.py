"""Activation range methods: min-max, percentile clipping, MSE-optimal clipping.

Histograms of every calibrated activation are collected by running the calibrated
float model with all intermediate tensors preserved. Each method maps a histogram and
the observed range to the range handed to TFLite's quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from edgeship.quantize.options import CalibrationMethod

BINS = 2048
QUANT_LEVELS = 255


@dataclass
class Histogram:
    """Counts of one tensor's values over fixed bins spanning ``[lo, hi]``.

    ``seen_min``/``seen_max`` are the true extremes observed (the bins may span a wider
    range: TensorFlow's calibrator records in-place ADD ranges on the producer too).
    """

    lo: float
    hi: float
    counts: np.ndarray
    seen_min: float = float("inf")
    seen_max: float = float("-inf")

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


RangeFn = Callable[[Histogram, float], "tuple[float, float]"]
RANGE_METHODS: dict[CalibrationMethod, RangeFn] = {}


def range_method(method: CalibrationMethod) -> Callable[[RangeFn], RangeFn]:
    def wrap(fn: RangeFn) -> RangeFn:
        RANGE_METHODS[method] = fn
        return fn

    return wrap


@range_method(CalibrationMethod.MINMAX)
def minmax(hist: Histogram, _param: float) -> tuple[float, float]:
    """The true observed range (never wider than what the calibration data produced)."""
    return _seen(hist)


def _seen(hist: Histogram) -> tuple[float, float]:
    if hist.seen_min > hist.seen_max:
        return hist.lo, hist.hi
    return min(hist.seen_min, 0.0), max(hist.seen_max, 0.0)


@range_method(CalibrationMethod.PERCENTILE)
def percentile(hist: Histogram, keep: float) -> tuple[float, float]:
    """Clip ``(100 - keep) / 2`` percent of the values off each tail (not past zero)."""
    cdf = np.cumsum(hist.counts) / max(hist.counts.sum(), 1)
    tail = (100.0 - keep) / 200.0
    edges = hist.edges
    seen_lo, seen_hi = _seen(hist)
    lo = max(float(edges[int(np.searchsorted(cdf, tail))]), seen_lo) if seen_lo < 0 else seen_lo
    hi = min(float(edges[min(int(np.searchsorted(cdf, 1 - tail)) + 1, len(edges) - 1)]), seen_hi)
    return min(lo, 0.0), max(hi, 0.0)


@range_method(CalibrationMethod.MSE)
def mse(hist: Histogram, _param: float) -> tuple[float, float]:
    """The shrunken range with the least expected squared error (rounding + clipping)."""
    c, n = hist.centers, hist.counts.astype(np.float64)
    seen_lo, seen_hi = _seen(hist)
    best, best_err = (seen_lo, seen_hi), np.inf
    for f in np.linspace(0.2, 1.0, 81):
        lo, hi = seen_lo * f, seen_hi * f
        step = (hi - lo) / QUANT_LEVELS
        if step <= 0:
            continue
        clipped = np.clip(c, lo, hi)
        err = np.sum(n * (c - clipped) ** 2) + np.sum(n[(c >= lo) & (c <= hi)]) * step**2 / 12
        if err < best_err:
            best, best_err = (float(lo), float(hi)), err
    return best


def collect_histograms(model: bytes, tensors: dict[int, tuple[str, float, float]],
                       samples: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
                       ) -> dict[int, Histogram]:
    """Histogram every listed tensor over the samples (float model, all tensors kept)."""
    from edgeship.quantize.layers import _interpreter

    interp = _interpreter(model)
    inp = interp.get_input_details()[0]["index"]
    hists = {i: Histogram(lo, hi, np.zeros(BINS, np.int64)) for i, (_, lo, hi) in tensors.items() if hi > lo}
    for k, x in enumerate(samples):
        interp.set_tensor(inp, x.astype(np.float32))
        interp.invoke()
        for i, h in hists.items():
            values = interp.get_tensor(i).ravel()
            h.seen_min = min(h.seen_min, float(values.min()))
            h.seen_max = max(h.seen_max, float(values.max()))
            idx = np.clip(((values - h.lo) * (BINS / (h.hi - h.lo))).astype(np.int64), 0, BINS - 1)
            h.counts += np.bincount(idx, minlength=BINS)
        if progress:
            progress(k + 1)
    return hists


def choose_ranges(hists: dict[int, Histogram], method: CalibrationMethod, param: float,
                  keep: Iterable[int] = ()) -> dict[int, tuple[float, float]]:
    """New ranges for every histogrammed tensor; those in ``keep`` get their true min-max."""
    fn = RANGE_METHODS[method]
    skip = set(keep)
    return {i: (_seen(h) if i in skip else fn(h, param)) for i, h in hists.items()}
