"""Budget searches: the SQNR budget (float op groups, :mod:`edgeship.quantize.mixed`) and ``--max-drop``
(float layers), each measuring candidates TensorFlow's quantizer makes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship._progress import Progress, silent
from edgeship.quantize import layers, mixed
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.search_report import KeptLayer, MixedPrecision, SpeedMeasurement
from edgeship.quantize.speed import Stopwatch, speed_floor
from edgeship.quantize.worker import Quantizer
from edgeship.reference import run_tflite
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import DriftFigures, compare


@dataclass(frozen=True)
class Judged:
    """Images a model is judged on, with the float model's outputs on them (and labels, where known).

    The held-apart evaluation images (what the written model's figures come from) or the
    search images (calibration images the budget search measures candidates on).
    """

    pixels: np.ndarray
    prep: Preprocessing
    reference: np.ndarray
    truth: tuple[int | None, ...]

    @classmethod
    def of(
        cls,
        float_model: bytes,
        pixels: np.ndarray,
        prep: Preprocessing,
        truth: Sequence[int | None] | None = None,
        *,
        progress: Progress = silent,
        label: str = "run float reference",
    ) -> Judged:
        """Run the float model on the pixels once (``truth``: labels, None where unknown or not given)."""
        reference = run_tflite(float_model, pixels, prep, progress=progress, label=label)
        return cls(pixels, prep, reference, tuple(truth) if truth is not None else (None,) * len(pixels))

    def figures(self, model: bytes, progress: Progress, label: str = "run int8") -> DriftFigures:
        """Drift of ``model``'s outputs from the float model's on these images."""
        got = run_tflite(model, self.pixels, self.prep, progress=progress, label=label)
        return compare(self.reference, got, list(self.truth))


def calib_scorer(
    quantized: Quantizer,
    float_model: bytes,
    calib_px: np.ndarray,
    prep: Any,
    options: QuantizeOptions,
    progress: Progress,
) -> Callable[..., float]:
    """``score(calibrated, float_nodes=())``: SQNR (dB) against the float model, on calibration images only,
    of the int8 model TensorFlow's quantizer makes (what the range choice and the budget search measure)."""
    pixels = calib_px[: options.search_images]
    judged: list[Judged] = []

    def score(calibrated: bytes, float_nodes: Sequence[str] = ()) -> float:
        if not judged:
            judged.append(Judged.of(float_model, pixels, prep, progress=progress, label="run float (search images)"))
        quant, _ = quantized(calibrated, float_nodes)
        return judged[0].figures(quant, progress, label="measure a candidate").sqnr_db

    return score


def budget_search(
    quantized: Quantizer,
    calibrated: bytes,
    all_int8: tuple[bytes, DriftFigures],
    score: Callable[..., float],
    judged: Judged,
    float_model: bytes,
    stage: Path | Stopwatch,
    options: QuantizeOptions,
    progress: Progress,
) -> tuple[bytes, DriftFigures, MixedPrecision, bool]:
    """Meet ``options.min_sqnr_db`` by keeping the cheapest op groups float (mixed models only), never
    going under ``options.min_speedup`` x float32's speed."""
    quant, figs = all_int8
    budget = float(options.min_sqnr_db or 0.0)
    if not options.float_islands or figs.sqnr_db >= budget:
        return quant, figs, MixedPrecision(budget), figs.sqnr_db >= budget
    progress("budget search", None, None)
    limit = output_grid_db(quant, judged.reference)
    timed: list[SpeedMeasurement] = []
    fast_enough = speed_floor(quantized, calibrated, float_model, stage, options.min_speedup, timed, progress)
    found = mixed.budgeted(
        calibrated, lambda nodes: score(calibrated, nodes), budget, held_apart_db=figs.sqnr_db, fast_enough=fast_enough
    )
    report = _searched(found, budget, figs.sqnr_db, options.min_speedup, timed, limit)
    if not found.kept:
        return quant, figs, report, False
    candidate, runs = quantized(calibrated, found.nodes)
    cfigs = judged.figures(candidate, progress, label="run budgeted int8")
    report = replace(report, eval_sqnr_db=cfigs.sqnr_db)
    if cfigs.sqnr_db <= figs.sqnr_db:  # better on the search images only: keep the all-int8 model
        return quant, figs, replace(report, kept_float=(), float_ops=0), False
    # latency_ms_1_thread: filled in by the speed check (one interleaved run with the written model)
    report = replace(report, delegation=runs.delegation, latency_ms_1_thread={})
    return candidate, cfigs, report, cfigs.sqnr_db >= budget


def _searched(
    found: mixed.SearchResult,
    budget: float,
    eval_all_int8_db: float,
    min_speedup: float,
    timed: list[SpeedMeasurement],
    limit: float | None,
) -> MixedPrecision:
    """The report of a search that ran, before its model is judged on the evaluation images."""
    return MixedPrecision(
        budget_sqnr_db=budget,
        searched=True,
        target_sqnr_db=round(found.budget_db, 3),
        all_int8_sqnr_db=round(found.base_db, 3),
        sqnr_db=round(found.sqnr_db, 3),
        within_budget=found.within_budget,
        kept_float=found.kept,
        float_ops=len(found.nodes),
        steps=found.steps,
        int8_matrix_ceiling_db=round(found.ceiling_db, 3) if found.ceiling_db is not None else None,
        eval_sqnr_db_all_int8=eval_all_int8_db,
        min_speedup=min_speedup,
        speed_measurements=tuple(timed),
        int8_output_limit_db=round(limit, 3) if limit is not None else None,
    )


def output_grid_db(model: bytes, reference: np.ndarray) -> float | None:
    """SQNR of the float model's outputs rounded to ``model``'s integer output grid, nothing else changed.

    No model with that output tensor does better on these images, whatever stays float inside
    (logits with a small spread but long tails lose most to that grid). None for a float output.
    """
    spec = TFLiteModel(model, use_xnnpack=False).output
    if not spec.quantized:
        return None
    info = np.iinfo(spec.dtype)
    grid = np.clip(np.round(reference / spec.scale) + spec.zero_point, info.min, info.max)
    return compare(reference, ((grid - spec.zero_point) * spec.scale).astype(np.float32)).sqnr_db


def accuracy_drop(figs: DriftFigures) -> float:
    """Points ``--max-drop`` counts: top-1 accuracy lost against the labels when they are known, else top-1
    agreement lost against the float model."""
    return figs.top1_drop if figs.top1_drop is not None else figs.agreement_drop


def drop_measure(figs: DriftFigures) -> str:
    return "top-1 against labels" if figs.top1_drop is not None else "top-1 agreement with float"


def accuracy_aware(
    quantized: Quantizer,
    calibrated: bytes,
    start: tuple[bytes, DriftFigures],
    errs: list[layers.LayerError],
    judged: Judged,
    options: QuantizeOptions,
    progress: Progress,
) -> tuple[bytes, DriftFigures, tuple[KeptLayer, ...], bool]:
    """Keep the most harmful layers in float one at a time until the drop (:func:`accuracy_drop`) is inside
    the budget."""
    quant, figs = start
    budget = options.max_drop or 0.0
    drop = accuracy_drop(figs)
    kept: list[KeptLayer] = []
    denied: list[str] = []
    best = (quant, figs)
    for err in layers.most_harmful(errs)[: options.max_float_layers]:
        if drop <= budget:
            break
        denied.append(err.name)
        candidate, _ = quantized(calibrated, denied)
        cfigs = judged.figures(candidate, progress, label=f"re-measure with {len(denied)} float layer(s)")
        drop = accuracy_drop(cfigs)
        kept.append(
            KeptLayer(
                layer=err.name,
                op=err.op,
                sqnr_db=err.sqnr_db,
                added_error_db=err.added_error_db,
                size_bytes=len(candidate),
                top1_agreement=cfigs.top1_agreement,
                top1=cfigs.cand_top1,
                drop_points=drop,
                mean_cosine=cfigs.mean_cosine,
            )
        )
        if drop <= accuracy_drop(best[1]):
            best = (candidate, cfigs)
    within = accuracy_drop(best[1]) <= budget
    return best[0], best[1], tuple(kept), within
