"""Cross-fitted range candidates (``method=auto``, the default): margins, parameters, the choice (issue 12)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.quantize.options import CalibrationMethod, QuantizeOptions
from edgeship.quantize.ranges import (
    CROSS_FIT_CANDIDATES,
    FoldError,
    Histogram,
    RangeChoice,
    choose_cross_fitted,
    choose_ranges,
    minmax,
    percentile,
)

TENSOR, KEPT = 7, 9


def _hist(values: np.ndarray, lo: float, hi: float) -> Histogram:
    return Histogram(
        lo, hi, np.histogram(values, bins=2048, range=(lo, hi))[0], float(values.min()), float(values.max())
    )


def _folds(values: list[np.ndarray]) -> list[dict[int, Histogram]]:
    """One histogram per fold over shared bins (as the pipeline records them), a kept tensor beside."""
    lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    return [{TENSOR: _hist(v, lo, hi), KEPT: _hist(v, lo, hi)} for v in values]


def _rounding_model(test: list[np.ndarray]):
    """A fake int8 model: fold ``k``'s values clipped to the fitted range and rounded to 255 levels."""

    def measure(k: int, ranges: dict[int, tuple[float, float]]) -> FoldError:
        lo, hi = ranges[TENSOR]
        step = (hi - lo) / 255
        x = test[k]
        q = np.round((np.clip(x, lo, hi) - lo) / step) * step + lo
        return FoldError(float(np.sum(x**2)), float(np.sum((x - q) ** 2)))

    return measure


def test_a_margin_widens_both_ends_but_never_a_kept_tensor() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 50_000), [-6.0, 9.0]])
    hists = {TENSOR: _hist(values, -10, 10), KEPT: _hist(values, -10, 10)}
    got = RangeChoice(CalibrationMethod.MINMAX, widen=1.1).fit(hists, 99.999, keep={KEPT})
    assert got[TENSOR] == pytest.approx((-6.6, 9.9))
    assert got[KEPT] == pytest.approx((-6.0, 9.0))
    assert choose_ranges(hists, RangeChoice(CalibrationMethod.MINMAX, widen=1.1), 99.999, keep={KEPT}) == got


def test_a_candidate_keeps_its_own_percentile() -> None:
    rng = np.random.default_rng(1)
    values = rng.laplace(0, 1, 200_000)
    hists = {TENSOR: _hist(values, float(values.min()), float(values.max()))}
    own = choose_ranges(hists, RangeChoice(CalibrationMethod.PERCENTILE, 99.9), 99.9999)
    callers = choose_ranges(hists, RangeChoice(CalibrationMethod.PERCENTILE), 99.9999)
    assert own[TENSOR] == percentile(hists[TENSOR], 99.9)
    assert callers[TENSOR] == percentile(hists[TENSOR], 99.9999)
    assert own[TENSOR][1] < callers[TENSOR][1] < minmax(hists[TENSOR], 0)[1] + 1e-9


@pytest.mark.parametrize("bad", [dict(method=CalibrationMethod.AUTO), dict(method="minmax", widen=0.9)])
def test_bad_candidates_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        RangeChoice(**bad)


def test_cross_fit_takes_the_margin_when_unseen_images_exceed_every_fitted_range() -> None:
    rng = np.random.default_rng(2)
    # each fold reaches further than the other: ranges fitted on one clip the other's top values
    values = [np.concatenate([rng.normal(0, 1, 100_000), rng.uniform(0, top, 3_000)]) for top in (30.0, 33.0)]
    choice, report = choose_cross_fitted(_folds(values), 99.999, _rounding_model(values), keep={KEPT})
    assert choice == RangeChoice(CalibrationMethod.MINMAX, widen=1.1), report
    assert report["chosen"] == "minmax x1.1" and report["folds"] == 2
    assert set(report["cross_fitted_sqnr_db"]) == {c.label for c in CROSS_FIT_CANDIDATES}


def test_cross_fit_takes_strong_clipping_when_the_tails_are_one_image_outliers() -> None:
    rng = np.random.default_rng(3)
    values = [np.concatenate([rng.normal(0, 1, 300_000), [80.0 * (-1) ** k]]) for k in range(2)]
    choice, report = choose_cross_fitted(_folds(values), 99.999, _rounding_model(values), keep={KEPT})
    assert choice == RangeChoice(CalibrationMethod.PERCENTILE, 99.99), report


def test_ties_go_to_the_earlier_candidate() -> None:
    values = [np.linspace(-1, 1, 1001), np.linspace(-1, 1, 1001)]
    choice, report = choose_cross_fitted(_folds(values), 99.999, lambda k, r: FoldError(1.0, 0.01))
    assert choice == CROSS_FIT_CANDIDATES[0], report


def test_auto_is_the_default_and_measures_more_than_percentile_and_min_max() -> None:
    assert QuantizeOptions().method == CalibrationMethod.AUTO
    labels = [c.label for c in CROSS_FIT_CANDIDATES]
    assert len(set(labels)) == len(labels) == 4
    assert "percentile 99.999" not in labels  # cross-fitting over-rates it (MobileNetV3-Small, issue 12)


def test_fold_histograms_made_in_two_processes_merge_into_the_one_pass_histograms(
    tiny_bundle: object, calib_images: object
) -> None:
    """quantize histograms one fold here and the other in its child: together, exactly one pass's counts."""
    from edgeship._child import ChildWorker
    from edgeship.convert import ConvertResult
    from edgeship.quantize import histograms, range_choice, tflite_quant
    from edgeship.runtime.images import list_images, load_pixels, normalize

    conv = ConvertResult.load(tiny_bundle)  # type: ignore[arg-type]
    prep = conv.card.preprocessing
    pixels = load_pixels(list_images(calib_images).files[:12], prep)  # type: ignore[arg-type]
    calibrated = tflite_quant.calibrate(conv.model, normalize(pixels, prep))
    recorded = tflite_quant.read_ranges(calibrated)
    one_pass = histograms.collect_histograms(
        calibrated, recorded, (normalize(pixels[i : i + 1], prep) for i in range(len(pixels)))
    )
    with ChildWorker() as native:
        folds = range_choice.histograms(
            calibrated, recorded, pixels, prep, range_choice.fold_bounds(12), native, lambda *a: None
        )
    merged = histograms.merge_histograms(folds)
    assert len(folds) == 2 and set(merged) == set(one_pass) and one_pass
    for i, h in one_pass.items():
        assert np.array_equal(merged[i].counts, h.counts) and int(h.counts.sum()) > 0
        assert (merged[i].seen_min, merged[i].seen_max) == (h.seen_min, h.seen_max)
    assert not np.array_equal(folds[0][next(iter(folds[0]))].counts, folds[1][next(iter(folds[1]))].counts)


def test_bin_index_matches_truncate_then_clip() -> None:
    """The in-place float bins equal truncating to integers first and clipping after (the earlier rule)."""
    from edgeship.quantize.histograms import BINS, _bin_index

    values = np.random.default_rng(3).normal(0, 3, 100_000).astype(np.float32)
    values[:4] = [-1e9, 1e9, 0.0, np.nan]
    for lo, hi in ((-2.0, 2.0), (0.0, 6.0), (-0.001, 0.0005)):
        old = np.clip(((values[4:] - lo) * (BINS / (hi - lo))).astype(np.int64), 0, BINS - 1)
        assert np.array_equal(_bin_index(values[4:], lo, hi), old)
        assert list(_bin_index(values[:4], lo, hi)[[0, 1, 3]]) == [0, BINS - 1, 0]
