"""Range choice: every activation's histogram on the calibration images, then the range method applied.

``auto`` chooses the method per model by cross-fitted SQNR (:func:`edgeship.quantize.ranges.choose_cross_fitted`).
Both cores work: the child histograms one fold while this process does the other, and it
quantizes the next candidate while this process measures the last one. The figures are
those of the same steps run one after another.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from edgeship._child import ChildWorker
from edgeship._progress import Progress
from edgeship.quantize import ranges, tflite_quant
from edgeship.quantize.histograms import Histogram, collect_histograms, merge_histograms
from edgeship.quantize.options import CalibrationMethod, QuantizeOptions
from edgeship.quantize.worker import Quantizer
from edgeship.reference import run_tflite
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import normalize
from edgeship.runtime.interpreter import TFLiteModel

#: Folds of the calibration images for the cross-fitted range choice (``method=auto``).
CROSS_FOLDS = 2


def fold_bounds(n: int, folds: int = CROSS_FOLDS) -> list[tuple[int, int]]:
    """Consecutive folds of the ``n`` calibration images."""
    edges = np.linspace(0, n, folds + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def cross_fits(options: QuantizeOptions, n: int) -> bool:
    """Whether the range method is chosen by cross-fitting (``auto``, and enough calibration images)."""
    return options.method == CalibrationMethod.AUTO and n >= 2 * CROSS_FOLDS


def apply_range_method(
    calibrated: bytes,
    pixels: np.ndarray,
    prep: Preprocessing,
    options: QuantizeOptions,
    native: ChildWorker,
    progress: Progress,
    measure: Callable[[int, bytes], ranges.FoldError] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """The calibrated model with every activation range chosen by ``options.method``, and the report.

    Every method starts from edgeship's own statistics: TensorFlow's calibrator records an
    in-place ADD's range on its producer too, which widens residual branches up to 1.5x. The
    model input and the final scores keep their true min-max: clipping scores changes the arg-max.
    """
    recorded = tflite_quant.read_ranges(calibrated)
    report: dict[str, Any] = {"method": options.method.value, "tensors": len(recorded)}
    m = TFLiteModel(calibrated, use_xnnpack=False)
    keep = {m.input.index, m.output.index}
    n = len(pixels)
    cross_fit = cross_fits(options, n) and measure is not None
    start = time.perf_counter()
    folds = histograms(
        calibrated, recorded, pixels, prep, fold_bounds(n, CROSS_FOLDS if n >= 2 else 1), native, progress
    )
    hists = merge_histograms(folds)
    report["seconds"] = {"histograms": round(time.perf_counter() - start, 3)}
    method: CalibrationMethod | ranges.RangeChoice = options.method
    if cross_fit and measure is not None:
        # Per model: the method whose ranges, fitted on one half of the calibration images, give
        # the best int8 model on the other half (both ways, pooled); then fitted on all of them.
        progress("choose the range method by cross-fitted SQNR", None, None)
        start = time.perf_counter()
        method, report["auto"] = cross_fitted(calibrated, folds, options, keep, native, measure)
        report["seconds"]["cross_fit"] = round(time.perf_counter() - start, 3)
    elif method == CalibrationMethod.AUTO:  # too few images (or nothing to measure with) to cross-fit
        method = ranges.CROSS_FIT_CANDIDATES[0]
        report["auto"] = {"chosen": method.label, "fallback": f"{n} calibration image(s): too few to cross-fit"}
    new = ranges.choose_ranges(hists, method, options.percentile, keep=keep)
    shrink = [(hi - lo) / max(recorded[i][2] - recorded[i][1], 1e-12) for i, (lo, hi) in new.items()]
    report.update({"adjusted": len(new), "mean_range_fraction": float(np.mean(shrink)) if shrink else 1.0})
    return tflite_quant.set_ranges(calibrated, new), report


def histograms(
    calibrated: bytes,
    recorded: dict[int, tuple[str, float, float]],
    pixels: np.ndarray,
    prep: Preprocessing,
    bounds: list[tuple[int, int]],
    native: ChildWorker,
    progress: Progress,
) -> list[dict[int, Histogram]]:
    """Histograms of every recorded tensor, one set per fold; the child histograms the later folds meanwhile.

    The bins come from the recorded ranges, so the folds merge into exactly the histograms of
    one pass over every image (:func:`edgeship.quantize.histograms.merge_histograms`).
    """

    def samples(a: int, b: int) -> Iterator[np.ndarray]:
        return (normalize(pixels[i : i + 1], prep) for i in range(a, b))

    (a, b), rest = bounds[0], bounds[1:]
    with ThreadPoolExecutor(1) as pool:
        later = [
            pool.submit(native.call, "histograms", collect_histograms, calibrated, recorded, list(samples(*fold)))
            for fold in rest
        ]
        first = collect_histograms(
            calibrated, recorded, samples(a, b), progress=lambda k: progress("histograms", k, b - a)
        )
        return [first, *(f.result() for f in later)]


def cross_fitted(
    calibrated: bytes,
    folds: list[dict[int, Histogram]],
    options: QuantizeOptions,
    keep: set[int],
    native: ChildWorker,
    measure: Callable[[int, bytes], ranges.FoldError],
) -> tuple[ranges.RangeChoice, dict[str, Any]]:
    """:func:`edgeship.quantize.ranges.choose_cross_fitted`, the child quantizing ahead of the measurements."""
    plan = ranges.cross_fit_plan(folds, options.percentile, keep=keep)
    models = [tflite_quant.set_ranges(calibrated, fitted) for _, _, fitted in plan]
    quantized = Quantizer(native, options)
    with ThreadPoolExecutor(1) as pool:
        made = [pool.submit(quantized.once, model) for model in models]  # one after another in the child
        errors = [measure(k, f.result()[0]) for (_, k, _), f in zip(plan, made)]
    return ranges.pick_cross_fitted(plan, errors)


def fold_measurer(
    float_model: bytes,
    pixels: np.ndarray,
    prep: Preprocessing,
    progress: Progress,
    reference: dict[int, np.ndarray] | None = None,
) -> Callable[[int, bytes], ranges.FoldError]:
    """``measure(k, quant)``: signal and error energy of the logits of the int8 model ``quant`` against the
    float model, on fold ``k`` of the calibration images (``reference``: the float outputs already run per fold)."""
    bounds = fold_bounds(len(pixels))
    reference = reference if reference is not None else {}

    def measure(k: int, quant: bytes) -> ranges.FoldError:
        a, b = bounds[k]
        if k not in reference:
            reference[k] = run_tflite(float_model, pixels[a:b], prep, progress=progress, label="run float (folds)")
        got = run_tflite(quant, pixels[a:b], prep, progress=progress, label="measure a range method")
        ref = reference[k].astype(np.float64)
        return ranges.FoldError(float(np.sum(ref**2)), float(np.sum((ref - got) ** 2)))

    return measure
