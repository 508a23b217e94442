"""Activation range methods: min-max, percentile clipping, MSE-optimal, entropy (KL), auto.

Each method maps an activation's histogram (:mod:`edgeship.quantize.histograms`) and the
observed range to the range handed to TFLite's quantizer.

``auto`` measures instead of assuming: :func:`choose_cross_fitted` picks, per model, the
candidate of :data:`CROSS_FIT_CANDIDATES` (a method, its parameter and a margin) whose ranges
fitted on one half of the calibration images give the best int8 model on the other half
(both ways). Per tensor,
:func:`least_consumer_error` is the candidate range with the least expected error *at its
consumers' outputs* (clipping a LOGISTIC or HARD_SWISH input where the function is flat
costs nothing there; rounding noise is scaled by the consumer's slope).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeship.quantize.histograms import Histogram, merge_histograms
from edgeship.quantize.options import CalibrationMethod

QUANT_LEVELS = 255
ERROR_BINS = 256  # histogram resolution the consumer-aware error is computed at


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


@range_method(CalibrationMethod.ENTROPY)
def entropy(hist: Histogram, _param: float) -> tuple[float, float]:
    """The shrunken range whose 255-level version of the histogram is closest in KL divergence."""
    seen_lo, seen_hi = _seen(hist)
    best, best_kl = (seen_lo, seen_hi), np.inf
    for f in np.linspace(0.2, 1.0, 41):
        lo, hi = seen_lo * f, seen_hi * f
        if hi <= lo:
            continue
        kl = _kl_after_quantizing(hist, lo, hi)
        if kl < best_kl:
            best, best_kl = (float(lo), float(hi)), kl
    return best


def _kl_after_quantizing(hist: Histogram, lo: float, hi: float) -> float:
    """KL(P || Q): P the histogram clipped to ``[lo, hi]`` (tails folded onto the edges), Q the
    255-level copy of the unclipped part."""
    c, n = hist.centers, hist.counts.astype(np.float64)
    inside = (c >= lo) & (c <= hi)
    if not inside.any():
        return np.inf
    raw = n[inside]
    p = raw.copy()
    p[0] += n[c < lo].sum()
    p[-1] += n[c > hi].sum()
    level = np.minimum(((c[inside] - lo) / (hi - lo) * QUANT_LEVELS).astype(np.int64), QUANT_LEVELS - 1)
    nonzero = p > 0
    # Q comes from the unclipped counts (TensorRT's entropy calibration): the mass clipping moves
    # onto the edges is what Q misses, so clipping costs divergence.
    mass = np.bincount(level, weights=raw, minlength=QUANT_LEVELS)
    support = np.bincount(level, weights=nonzero.astype(np.float64), minlength=QUANT_LEVELS)
    q = np.where(nonzero, mass[level] / np.maximum(support[level], 1), 0.0)
    p, q = p / p.sum(), q / max(q.sum(), 1e-30)
    m = nonzero & (q > 0)
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


#: Elementwise consumers whose slope decides how much an input error matters; every other op
#: (convolutions, adds, pooling...) is linear or piecewise linear and weighs errors as they are.
CONSUMER_FNS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "LOGISTIC": lambda x: 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))),
    "HARD_SWISH": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "TANH": np.tanh,
    "GELU": lambda x: 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3))),
    "RELU": lambda x: np.maximum(x, 0.0),
    "RELU6": lambda x: np.clip(x, 0.0, 6.0),
    "RELU_N1_TO_1": lambda x: np.clip(x, -1.0, 1.0),
}


def consumer_errors(hist: Histogram, ranges: np.ndarray) -> np.ndarray:
    """Expected squared error at the consumers' outputs for each candidate ``[lo, hi]`` row of ``ranges``.

    Clipping error ``f(x) - f(clip(x))`` plus rounding noise ``step^2 / 12`` scaled by the
    slope of ``f`` over one step, summed over the histogram (``f`` the identity for linear
    consumers; summed over consumers).
    """
    coarse = ERROR_BINS if len(hist.counts) % ERROR_BINS == 0 else len(hist.counts)  # 8x fewer bins: fast enough
    n = hist.counts.astype(np.float64).reshape(coarse, -1).sum(axis=1)[None, :]
    edges = np.linspace(hist.lo, hist.hi, coarse + 1)
    c = ((edges[:-1] + edges[1:]) / 2)[None, :]
    lo, hi = ranges[:, :1], ranges[:, 1:]
    step = np.maximum(hi - lo, 1e-12) / QUANT_LEVELS
    clipped = np.clip(c, lo, hi)
    inside = (c >= lo) & (c <= hi)
    fns = {CONSUMER_FNS.get(op) for op in hist.consumers} or {None}
    total = np.zeros(len(ranges))
    for fn in fns:
        if fn is None:
            clip_err, slope = (c - clipped) ** 2, 1.0
        else:
            clip_err = (fn(c) - fn(clipped)) ** 2
            slope = (fn(c + step / 2) - fn(c - step / 2)) / step
        total += np.sum(n * (clip_err + inside * slope**2 * step**2 / 12), axis=1)
    return total


def candidate_ranges(hist: Histogram, param: float) -> np.ndarray:
    """``[lo, hi]`` rows to choose from: min-max, percentiles, MSE, and a grid of shrunken ends."""
    seen_lo, seen_hi = _seen(hist)
    fixed = [_seen(hist), mse(hist, 0.0), *(percentile(hist, k) for k in sorted({99.9, 99.99, 99.999, param}))]
    grid = np.linspace(0.1, 1.0, 19)
    lows = np.unique(np.concatenate([[r[0] for r in fixed], seen_lo * grid]))
    highs = np.unique(np.concatenate([[r[1] for r in fixed], seen_hi * grid]))
    rows = np.array([(lo, hi) for lo in lows for hi in highs if hi > lo], dtype=np.float64)
    return rows if len(rows) else np.array([[seen_lo, seen_hi]])


@range_method(CalibrationMethod.AUTO)
def least_consumer_error(hist: Histogram, param: float) -> tuple[float, float]:
    """The candidate range (see :func:`candidate_ranges`) with the least error at the consumers' outputs."""
    rows = candidate_ranges(hist, param)
    lo, hi = rows[int(np.argmin(consumer_errors(hist, rows)))]
    return float(lo), float(hi)


def choose_ranges(
    hists: dict[int, Histogram], method: CalibrationMethod | RangeChoice, param: float, keep: Iterable[int] = ()
) -> dict[int, tuple[float, float]]:
    """New ranges for every histogrammed tensor; those in ``keep`` get their true min-max.

    ``method`` may be a :class:`RangeChoice` (what :func:`choose_cross_fitted` returns): its
    own parameter and margin then apply, ``param`` only where it names none.
    """
    if isinstance(method, RangeChoice):
        return method.fit(hists, param, keep=keep)
    fn = RANGE_METHODS[method]
    skip = set(keep)
    return {i: (_seen(h) if i in skip else fn(h, param)) for i, h in hists.items()}


@dataclass(frozen=True)
class RangeChoice:
    """One candidate of the cross-fitted choice: a range method, its parameter, and a margin.

    Attributes:
        method: A fixed range method (:data:`RANGE_METHODS`, not ``auto``).
        param: Its parameter (kept mass for ``percentile``); None: the caller's.
        widen: Both ends scaled by this factor after fitting (1.0: as fitted): a margin for
            images beyond the calibration set, whose values can exceed the calibrated extremes.
    """

    method: CalibrationMethod
    param: float | None = None
    widen: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibrationMethod(self.method))
        if self.method == CalibrationMethod.AUTO:
            raise ValueError("a cross-fitted candidate must be a fixed range method, not auto")
        if self.widen < 1.0:
            raise ValueError(f"widen must be >= 1 (a margin, not a clip), got {self.widen}")

    @property
    def label(self) -> str:
        """``minmax``, ``percentile 99.99``, ``minmax x1.1``: the name reports use."""
        name = self.method.value if self.param is None else f"{self.method.value} {self.param:g}"
        return name if self.widen == 1.0 else f"{name} x{self.widen:g}"

    def fit(
        self, hists: dict[int, Histogram], param: float, keep: Iterable[int] = ()
    ) -> dict[int, tuple[float, float]]:
        """Ranges for every histogrammed tensor (those in ``keep``: their true min-max, never widened)."""
        skip = set(keep)
        fitted = choose_ranges(hists, self.method, param if self.param is None else self.param, keep=skip)
        grow = self.widen - 1.0  # each end moves away from the other, by its own magnitude
        return {i: (r if i in skip else (r[0] - grow * abs(r[0]), r[1] + grow * abs(r[1]))) for i, r in fitted.items()}


#: Candidates the cross-fitted choice measures per model (the earlier wins ties): two percentile
#: clippings, and min-max with and without a 10 % margin. Their figures on the architecture matrix
#: are in docs/benchmarks.md.
CROSS_FIT_CANDIDATES = (
    RangeChoice(CalibrationMethod.PERCENTILE, 99.9999),
    RangeChoice(CalibrationMethod.PERCENTILE, 99.99),
    RangeChoice(CalibrationMethod.MINMAX),
    RangeChoice(CalibrationMethod.MINMAX, widen=1.1),
)


@dataclass(frozen=True)
class FoldError:
    """Signal and error energy of an int8 model's logits on one fold's images (sums of squares)."""

    signal: float
    noise: float


def pooled_sqnr_db(errors: Iterable[FoldError]) -> float:
    """SQNR (dB) over every fold's images together (energies pooled, not dB averaged)."""
    errs = list(errors)
    signal, noise = sum(e.signal for e in errs), sum(e.noise for e in errs)
    return float("inf") if noise <= 0 else float(10 * np.log10(max(signal, 1e-30) / noise))


def choose_cross_fitted(
    folds: Sequence[dict[int, Histogram]],
    param: float,
    measure: Callable[[int, dict[int, tuple[float, float]]], FoldError],
    methods: Sequence[CalibrationMethod | RangeChoice] = CROSS_FIT_CANDIDATES,
    keep: Iterable[int] = (),
) -> tuple[RangeChoice, dict[str, object]]:
    """The range candidate whose ranges generalise best from some calibration images to the others.

    For each candidate and each fold ``k``, ranges are fitted on the histograms of every other
    fold and ``measure(k, ranges)`` scores the int8 model made with them on fold ``k``'s
    images; the candidate with the highest pooled SQNR wins (ties: the earlier one). Ranges are
    never scored on the images they were fitted on, and pooling every fold makes the score
    rest on all calibration images (one 48-image split was too noisy to carry over).

    Args:
        folds: Histograms of the same tensors over disjoint sets of calibration images.
        param: Kept mass for percentile candidates that name none.
        measure: Signal and error energy, on fold ``k``'s images, of the int8 model made with
            the given ranges.
        methods: The candidates (a bare method is a candidate with ``param``).
        keep: Tensors that keep their true min-max (model input, scores).

    Returns:
        The winner (fit it on every image with :func:`choose_ranges` or
        :meth:`RangeChoice.fit`) and a report: ``chosen`` and every candidate's pooled SQNR.
    """
    plan = cross_fit_plan(folds, param, methods, keep)
    return pick_cross_fitted(plan, [measure(k, fitted) for _, k, fitted in plan])


#: One measurement of the cross-fitted choice: a candidate, the fold it is scored on, its ranges fitted on the others.
Fitted = tuple["RangeChoice", int, dict[int, tuple[float, float]]]


def cross_fit_plan(
    folds: Sequence[dict[int, Histogram]],
    param: float,
    methods: Sequence[CalibrationMethod | RangeChoice] = CROSS_FIT_CANDIDATES,
    keep: Iterable[int] = (),
) -> list[Fitted]:
    """Every measurement :func:`choose_cross_fitted` makes, candidate by candidate, fold by fold (to run them
    in any order, or overlapped, and give the errors to :func:`pick_cross_fitted` in this order)."""
    if len(folds) < 2:
        raise ValueError("cross-fitting needs at least two folds of calibration images")
    keep = set(keep)
    candidates = [m if isinstance(m, RangeChoice) else RangeChoice(m) for m in methods]
    if len({c.label for c in candidates}) != len(candidates):
        raise ValueError(f"cross-fitted candidates need distinct labels: {[c.label for c in candidates]}")
    return [
        (c, k, c.fit(merge_histograms([f for j, f in enumerate(folds) if j != k]), param, keep=keep))
        for c in candidates
        for k in range(len(folds))
    ]


def pick_cross_fitted(plan: Sequence[Fitted], errors: Sequence[FoldError]) -> tuple[RangeChoice, dict[str, object]]:
    """The candidate with the highest pooled SQNR over its folds (ties: the earlier one), and the report."""
    candidates = list(dict.fromkeys(c for c, _, _ in plan))
    scores = {c.label: pooled_sqnr_db(e for (d, _, _), e in zip(plan, errors) if d == c) for c in candidates}
    best = max(candidates, key=lambda c: (scores[c.label], -candidates.index(c)))
    return best, {
        "chosen": best.label,
        "cross_fitted_sqnr_db": {k: round(v, 3) for k, v in scores.items()},
        "folds": len({k for _, k, _ in plan}),
    }
