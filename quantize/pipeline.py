"""``quantize``: int8 post-training quantization from calibration images (a folder or arrays), in memory."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edgeship._child import ChildWorker
from edgeship._deps import HOST_TOOLS, versions
from edgeship._progress import Progress, Timer, silent
from edgeship.convert import tflite_graph
from edgeship.convert.pipeline import convert
from edgeship.convert.result import FLOAT32_FILE, ConvertResult
from edgeship.errors import CalibrationError, InputError
from edgeship.quantize import data, layers, mixed, ranges, rewrites, tflite_quant
from edgeship.quantize.data import Images, Pixels, is_folder
from edgeship.quantize.options import CalibrationMethod, QuantizeOptions
from edgeship.quantize.result import (FAST_FILE, INT8_FILE, LAYER_PLOT, OVER_BUDGET_FILE,  # noqa: F401 - re-exported
                                      REPORT_FILE, QuantizeResult, int8_card, op_histogram, output_names)
from edgeship.runtime.card import CARD_FILE, ModelCard, Preprocessing
from edgeship.runtime.delegation import Delegation, of_interpreter, op_counts
from edgeship.runtime.images import ImageSet, Labels, normalize
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import DriftFigures, compare
from edgeship.verify.outputs import run_tflite

log = logging.getLogger(__name__)

#: Invokes per model of the speed check (1 thread, XNNPACK, interleaved; the median counts).
SPEED_RUNS = 60
LAYER_SAMPLES = 16


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
    def of(cls, float_model: bytes, pixels: np.ndarray, prep: Preprocessing,
           truth: Sequence[int | None] | None = None, *, progress: Progress = silent,
           label: str = "run float reference") -> Judged:
        """Run the float model on the pixels once (``truth``: labels, None where unknown or not given)."""
        reference = run_tflite(float_model, pixels, prep, progress=progress, label=label)
        return cls(pixels, prep, reference, tuple(truth) if truth is not None else (None,) * len(pixels))

    def figures(self, model: bytes, progress: Progress, label: str = "run int8") -> DriftFigures:
        """Drift of ``model``'s outputs from the float model's on these images."""
        got = run_tflite(model, self.pixels, self.prep, progress=progress, label=label)
        return compare(self.reference, got, list(self.truth))



def quantize(model: ConvertResult | str | os.PathLike[str], calibration: Images, *,
             evaluation: Images | None = None, options: QuantizeOptions = QuantizeOptions(),
             progress: Progress = silent) -> QuantizeResult:
    """Quantize a converted model to int8 and measure how far it drifted (in memory).

    Full-integer, or with float islands (ops XNNPACK has no int8 kernel for) and, under an
    SQNR budget, float op groups, where ``options`` allow mixed models.

    Args:
        model: A :class:`ConvertResult`, the folder of a saved conversion, or an ONNX file
            (converted first, in memory, with default options).
        calibration: A folder of images (JPEG, PNG, BMP, WebP; any mode), or an iterable
            of ``HxWx3`` uint8 RGB arrays (any size; resized and cropped like files).
        evaluation: Images to measure drift on, as for ``calibration`` (None: images held
            apart from ``calibration``, never the same ones).
        options: See :class:`QuantizeOptions`.
        progress: Progress hook.

    Returns:
        A :class:`QuantizeResult`; ``within_budget`` is False when a budget was given and
        not met (:meth:`QuantizeResult.raise_for_budget` raises then). ``save`` writes it.

    Raises:
        InputError: Bad model path, image folder or arrays.
        CalibrationError: Too few usable calibration images, the quantizer failed, or its
            model does not run on XNNPACK and the reference kernels.
        NativeCrashError: TensorFlow's native code died in the child (one line, the stage named).
    """
    started = time.perf_counter()
    timer = Timer(progress)
    listed = _listed(calibration, evaluation, options)  # bad image folders are found before any conversion
    source = float_source(model, progress)
    prep = source.card.preprocessing
    with timer.stage("load images"):
        calib, evals = _images(listed, calibration, evaluation, options, prep, source.label_names(), progress)
    with ChildWorker() as native, tempfile.TemporaryDirectory(prefix="edgeship-quantize-") as work:
        stage, float_model = Path(work), source.model
        calib_px, eval_px = calib.pixels, evals.pixels
        samples = _sampler(calib_px, prep)
        eq_report: dict[str, Any] = {"enabled": options.equalize}
        if options.equalize:
            with timer.stage("equalize"):
                float_model, info = _equalized_float_model(source, stage)
                eq_report.update(info)
        with timer.stage("calibrate"):
            calibrated = native.call("calibrate (TensorFlow)", tflite_quant.calibrate, float_model,
                                     normalize(calib_px, prep), progress=lambda k: progress("calibrate", k, len(calib_px)))
        calibrated, rewritten = rewrites.apply(calibrated)
        quantized = Quantizer(native, options)
        score = _calib_scorer(quantized, source.model, calib_px, prep, options, progress)
        measure = _fold_measurer(quantized, source.model, calib_px, prep, progress)
        calibrated, range_report = _apply_range_method(calibrated, samples, len(calib_px), options, progress, measure)
        with timer.stage("quantize"):
            quant, runs = quantized(calibrated)
        placement: dict[str, Any] = {"enabled": options.timed_placement and options.float_islands}
        if options.timed_placement and options.float_islands:
            with timer.stage("placement"):
                (quant, runs), info = _timed_placement(quantized, calibrated, (quant, runs), stage, progress)
                placement.update(info)
        bc_report: dict[str, Any] = {"enabled": options.use_bias_correction}
        if options.use_bias_correction:
            with timer.stage("bias correction"):
                quant, info = _bias_correct(quant, calibrated, calib_px, prep, progress)
                bc_report.update(info)
        with timer.stage("evaluate"):
            judged = Judged.of(source.model, eval_px, prep, evals.truth, progress=progress)
            figs = judged.figures(quant, progress)
        with timer.stage("per-layer"):
            layer_errs = layers.layer_errors(calibrated, quant, *_paired_inputs(quant, eval_px[:LAYER_SAMPLES], prep))
        kept: list[dict[str, Any]] = []
        within, mixed_report = True, {}
        all_int8 = (quant, figs)  # before any op group is kept float: the speed check's alternative
        if options.min_sqnr_db is not None:
            with timer.stage("budget search"):
                quant, figs, mixed_report, within = _budget_search(quantized, calibrated, (quant, figs), score, judged,
                                                                   source.model, stage, options, progress)
        if options.max_drop is not None:
            with timer.stage("accuracy-aware"):
                quant, figs, kept, within_drop = _accuracy_aware(quantized, calibrated, (quant, figs), layer_errs,
                                                                 judged, options, progress)
                within = within and within_drop
        final_name = INT8_FILE if within else OVER_BUDGET_FILE
        speed: dict[str, Any] = {"measured": False}
        if options.float_islands:  # XNNPACK targets; full-integer ones run on NNAPI/DSPs, not measured here
            with timer.stage("speed check"):
                speed = _speed_check(source.model, quant, all_int8, stage, options.min_speedup, progress)
            if "latency_ms_1_thread" in mixed_report:  # the same interleaved run, shown in the budget search too
                mixed_report["latency_ms_1_thread"] = {"float32": speed["ms"]["float32"],
                                                       "all_int8": speed["ms"].get("all_int8", speed["ms"]["int8"]),
                                                       "budgeted": speed["ms"]["int8"]}
        plot = layers.plot_worst(layer_errs, stage / LAYER_PLOT,
                                 title=f"worst tensors, {options.method.value} calibration "
                                       f"({'per-tensor' if options.per_tensor else 'per-channel'})")
        layer_plot = plot.read_bytes() if plot and Path(plot).is_file() else None
    card = int8_card(quant, final_name, source.card)
    float_size = len(source.model)
    report = {
        "edgeship_report": "quantize",
        "source": {"folder": str(source.folder) if source.folder else None, "float_model": source.card.model_file,
                   "source_model": source.card.source_model, "source_sha256": source.card.source_sha256},
        "options": options.to_dict(),
        "calibration": calib.report,
        "evaluation": evals.report,
        "ranges": range_report,
        "rewrites": rewritten,
        "runs_on": runs,
        "placement": placement,
        "equalization": eq_report,
        "bias_correction": bc_report,
        "figures": figs.to_dict(),
        "sizes": {"float32": float_size, "int8": len(quant), "ratio": round(float_size / len(quant), 2)},
        "ops": op_histogram(quant),
        "worst_layers": [e.to_dict() for e in layer_errs[:10]],
        "layer_count": len(layer_errs),
        "accuracy_aware": {"max_drop": options.max_drop, "kept_in_float": kept, "within_budget": within},
        "mixed_precision": mixed_report,
        "speed": speed,
        "output": final_name,
        "versions": {**versions(*HOST_TOOLS), "python": platform.python_version()},
        "timings_s": {**timer.seconds, "total": round(time.perf_counter() - started, 3)},
    }
    if speed.get("verdict"):
        log.warning("%s", speed["verdict"])
    faster = all_int8[0] if (speed.get("offered") or {}).get("kind") == "all_int8" else None
    return QuantizeResult(quant, card, figs, report, within, source, layer_plot, faster=faster)


def _listed(calibration: Images, evaluation: Images | None,
            options: QuantizeOptions) -> tuple[ImageSet, ImageSet] | None:
    """Calibration and evaluation folders listed and split (None for arrays)."""
    if evaluation is not None and is_folder(calibration) != is_folder(evaluation):
        raise InputError("give calibration and evaluation images the same way: both folders, or both arrays")
    if not is_folder(calibration):
        return None
    return data.split_images(Path(calibration), options.split, Path(evaluation) if evaluation is not None else None)


def _images(listed: tuple[ImageSet, ImageSet] | None, calibration: Images, evaluation: Images | None,
            options: QuantizeOptions, prep: Any, labels: Labels | None, progress: Progress) -> tuple[Pixels, Pixels]:
    """Calibration and evaluation pixels, from the listed folders or from arrays."""
    if listed is not None:
        return data.from_sets(*listed, evaluation is None, prep, labels, progress)
    return data.from_arrays(calibration, evaluation, options.split, prep)


def float_source(model: ConvertResult | str | os.PathLike[str], progress: Progress = silent) -> ConvertResult:
    """The float model to quantize: a conversion, a saved convert folder, or an ONNX file converted now."""
    if isinstance(model, ConvertResult):
        return model
    path = Path(model)
    if path.is_dir():
        return ConvertResult.load(path)
    if path.is_file():
        return convert(path, progress=progress)
    raise InputError(f"model {path} does not exist")


def conversion_for(model: Path, out: Path, *, force: bool) -> ConvertResult | Path:
    """What ``quantize MODEL -o OUT`` quantizes: a convert folder as it is; for an ONNX file, the
    conversion of exactly that file already saved in OUT (unless ``force``), else the file (converted
    by :func:`quantize`; :meth:`QuantizeResult.save_with_source` writes the conversion into OUT too)."""
    if model.is_file() and not force:
        return reusable_conversion(out, model) or model
    return model


def reusable_conversion(folder: Path, onnx: Path) -> ConvertResult | None:
    """The conversion of exactly this ONNX file saved in ``folder``, if there is one."""
    from edgeship._io import sha256_file

    if not (folder / CARD_FILE).is_file() or not (folder / FLOAT32_FILE).is_file():
        return None
    if ModelCard.load(folder / CARD_FILE).source_sha256 != sha256_file(onnx):
        return None
    return ConvertResult.load(folder)


def _sampler(pixels: np.ndarray, prep: Any) -> Callable[[], Iterable[np.ndarray]]:
    def gen() -> Iterable[np.ndarray]:
        for i in range(len(pixels)):
            yield normalize(pixels[i:i + 1], prep)

    return gen


def _apply_range_method(calibrated: bytes, samples: Callable[[], Iterable[np.ndarray]], n: int,
                        options: QuantizeOptions, progress: Progress,
                        measure: Callable[[int, bytes], ranges.FoldError] | None = None) -> tuple[bytes, dict[str, Any]]:
    recorded = tflite_quant.read_ranges(calibrated)
    report: dict[str, Any] = {"method": options.method.value, "tensors": len(recorded)}
    # Every method starts from edgeship's own statistics: TensorFlow's calibrator records an
    # in-place ADD's range on its producer too, which widens residual branches up to 1.5x.
    # The model input and the final scores keep their true min-max: clipping scores changes
    # the arg-max.
    m = TFLiteModel(calibrated, use_xnnpack=False)
    keep = {m.input.index, m.output.index}
    if options.method == CalibrationMethod.AUTO and measure is not None and n >= 2 * CROSS_FOLDS:
        # Per model: the method whose ranges, fitted on one half of the calibration images, give
        # the best int8 model on the other half (both ways, pooled); then fitted on all of them.
        folds = [ranges.collect_histograms(calibrated, recorded, itertools.islice(samples(), a, b),
                                           progress=lambda k, a=a: progress("histograms", a + k, n))
                 for a, b in _fold_bounds(n)]
        hists = ranges.merge_histograms(folds)
        progress("choose the range method by cross-fitted SQNR", None, None)
        method, report["auto"] = ranges.choose_cross_fitted(
            folds, options.percentile, lambda k, r: measure(k, tflite_quant.set_ranges(calibrated, r)), keep=keep)
        new = ranges.choose_ranges(hists, method, options.percentile, keep=keep)
    else:
        hists = ranges.collect_histograms(calibrated, recorded, samples(),
                                          progress=lambda k: progress("histograms", k, n))
        method: CalibrationMethod | ranges.RangeChoice = options.method
        if method == CalibrationMethod.AUTO:  # too few images (or nothing to measure with) to cross-fit
            method = ranges.CROSS_FIT_CANDIDATES[0]
            report["auto"] = {"chosen": method.label, "fallback": f"{n} calibration image(s): too few to cross-fit"}
        new = ranges.choose_ranges(hists, method, options.percentile, keep=keep)
    shrink = [(hi - lo) / max(recorded[i][2] - recorded[i][1], 1e-12) for i, (lo, hi) in new.items()]
    report.update({"adjusted": len(new), "mean_range_fraction": float(np.mean(shrink)) if shrink else 1.0})
    return tflite_quant.set_ranges(calibrated, new), report


#: Folds of the calibration images for the cross-fitted range choice (``method=auto``).
CROSS_FOLDS = 2


def _fold_bounds(n: int, folds: int = CROSS_FOLDS) -> list[tuple[int, int]]:
    """Consecutive folds of the ``n`` calibration images (the order ``samples()`` yields them)."""
    edges = np.linspace(0, n, folds + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class Quantizer:
    """``quantized(calibrated, float_nodes=())``: :func:`_quantize_checked`, remembered per model and node
    set (the budget search measures the same set's SQNR and speed, then writes it).

    ``placed``: nodes kept float for speed (:func:`_timed_placement`), kept float in every model made after.
    """

    def __init__(self, native: ChildWorker, options: QuantizeOptions) -> None:
        self.native, self.options = native, options
        self.placed: tuple[str, ...] = ()
        self.done: dict[tuple[bytes, frozenset[str]], tuple[bytes, dict[str, Any]]] = {}

    def __call__(self, calibrated: bytes, float_nodes: Sequence[str] = ()) -> tuple[bytes, dict[str, Any]]:
        nodes = self._with_placed(float_nodes)
        key = (hashlib.sha256(calibrated).digest(), frozenset(nodes))
        if key not in self.done:
            self.done[key] = _quantize_checked(self.native, calibrated, self.options, nodes)
        return self.done[key]

    def once(self, calibrated: bytes) -> tuple[bytes, dict[str, Any]]:
        """Not remembered: for models made once and dropped (the range choice's fold models)."""
        return _quantize_checked(self.native, calibrated, self.options, self._with_placed(()))

    def _with_placed(self, float_nodes: Sequence[str]) -> tuple[str, ...]:
        return (*self.placed, *(n for n in float_nodes if n not in self.placed))


#: Timed placement keeps its candidates float only when that is at least this much faster.
PLACEMENT_GAIN = 1.05


def _timed_placement(quantized: Quantizer, calibrated: bytes, quant: tuple[bytes, dict[str, Any]], work: Path,
                     progress: Progress) -> tuple[tuple[bytes, dict[str, Any]], dict[str, Any]]:
    """Keep the ops float whose int8 kernel may be slower than the float one here (large depthwise
    convolutions: :func:`mixed.slow_int8_candidates`) when the model measures faster that way
    (1 thread, XNNPACK, interleaved); ``quantized.placed`` remembers them for every model made after."""
    nodes = mixed.slow_int8_candidates(calibrated)
    if not nodes:
        return quant, {"candidates": 0}
    progress("placement: time large depthwise convolutions in float", None, None)
    placed = quantized(calibrated, nodes)
    ms = mixed.latencies({"int8": quant[0], "placed": placed[0]}, work, runs=SPEED_RUNS, stat="min_ms")
    keep = ms["int8"] >= PLACEMENT_GAIN * ms["placed"]
    report = {"candidates": len(nodes), "kept_float": keep, "ms": ms, "min_gain": PLACEMENT_GAIN,
              "nodes": list(nodes)}
    if not keep:
        return quant, report
    quantized.placed = tuple(nodes)
    return placed, report


def _fold_measurer(quantized: Quantizer, float_model: bytes, calib_px: np.ndarray, prep: Any,
                   progress: Progress) -> Callable[[int, bytes], ranges.FoldError]:
    """``measure(k, calibrated)``: signal and error energy of the logits of the int8 model TensorFlow's
    quantizer makes from ``calibrated``, against the float model, on fold ``k`` of the calibration images."""
    bounds = _fold_bounds(len(calib_px))
    reference: dict[int, np.ndarray] = {}

    def measure(k: int, calibrated: bytes) -> ranges.FoldError:
        a, b = bounds[k]
        if k not in reference:
            reference[k] = run_tflite(float_model, calib_px[a:b], prep, progress=progress, label="run float (folds)")
        quant, _ = quantized.once(calibrated)
        got = run_tflite(quant, calib_px[a:b], prep, progress=progress, label="measure a range method")
        ref = reference[k].astype(np.float64)
        return ranges.FoldError(float(np.sum(ref ** 2)), float(np.sum((ref - got) ** 2)))

    return measure


def _calib_scorer(quantized: Quantizer, float_model: bytes, calib_px: np.ndarray, prep: Any, options: QuantizeOptions,
                  progress: Progress) -> Callable[..., float]:
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


#: The budget search aims this much above the speed floor: one 60-invoke measurement is noisy on a
#: loaded machine (MobileNetV3-Large: 1.72x in the search, 1.46x in the speed check, 1.21x in a later run),
#: and the speed check measures the written model again.
SEARCH_SPEED_MARGIN = 1.15


def _speed_floor(quantized: Quantizer, calibrated: bytes, float_model: bytes, work: Path, floor: float,
                 measured: list[dict[str, Any]], progress: Progress) -> Callable[[Sequence[str]], bool] | None:
    """``fast_enough(float_nodes)`` of the budget search: the model with those nodes float runs at least
    ``floor`` x float32's speed (1 thread, XNNPACK, interleaved, fastest invoke of each); each measurement
    is appended to ``measured``."""
    if floor <= 0:
        return None
    floor *= SEARCH_SPEED_MARGIN

    def fast_enough(float_nodes: Sequence[str]) -> bool:
        progress("budget search: speed of a candidate", None, None)
        ms = mixed.latencies({"float32": float_model, "candidate": quantized(calibrated, float_nodes)[0]}, work,
                             runs=SPEED_RUNS, stat="min_ms")
        speedup = ms["float32"] / ms["candidate"]
        measured.append({"float_ops": len(float_nodes), "ms": ms, "speedup_vs_float32": round(speedup, 3)})
        return speedup >= floor

    # The all-int8 model first, for the report. Not a shortcut: one timing on a loaded machine can put
    # it under the floor (EfficientNet-B0: 1.29x once, 2.2x in a quiet pass), which would stop the search.
    fast_enough(())
    return fast_enough


def _budget_search(quantized: Quantizer, calibrated: bytes, all_int8: tuple[bytes, DriftFigures],
                   score: Callable[..., float], judged: Judged, float_model: bytes, stage: Path,
                   options: QuantizeOptions, progress: Progress) -> tuple[bytes, DriftFigures, dict[str, Any], bool]:
    """Meet ``options.min_sqnr_db`` by keeping the cheapest op groups float (mixed models only), never
    going under ``options.min_speedup`` x float32's speed."""
    quant, figs = all_int8
    budget = float(options.min_sqnr_db or 0.0)
    if not options.float_islands or figs.sqnr_db >= budget:
        return quant, figs, {"budget_sqnr_db": budget, "searched": False}, figs.sqnr_db >= budget
    progress("budget search", None, None)
    limit = output_grid_db(quant, judged.reference)
    timed: list[dict[str, Any]] = []
    fast_enough = _speed_floor(quantized, calibrated, float_model, stage, options.min_speedup, timed, progress)
    found = mixed.budgeted(calibrated, lambda nodes: score(calibrated, nodes), budget, held_apart_db=figs.sqnr_db,
                           fast_enough=fast_enough)
    report: dict[str, Any] = {"budget_sqnr_db": budget, **found.to_dict(), "searched": True,
                              "eval_sqnr_db_all_int8": figs.sqnr_db, "min_speedup": options.min_speedup,
                              "speed_measurements": timed,
                              **({"int8_output_limit_db": round(limit, 3)} if limit is not None else {})}
    if not found.kept:
        return quant, figs, report, False
    candidate, runs = quantized(calibrated, found.nodes)
    cfigs = judged.figures(candidate, progress, label="run budgeted int8")
    report.update(eval_sqnr_db=cfigs.sqnr_db)
    if cfigs.sqnr_db <= figs.sqnr_db:  # better on the search images only: keep the all-int8 model
        return quant, figs, {**report, "kept_float": [], "float_ops": 0}, False
    # latency_ms_1_thread: filled in by the speed check (one interleaved run with the written model)
    report.update(delegation=runs["delegation"], latency_ms_1_thread={})
    return candidate, cfigs, report, cfigs.sqnr_db >= budget


def output_grid_db(model: bytes, reference: np.ndarray) -> float | None:
    """SQNR of the float model's outputs rounded to ``model``'s integer output grid, nothing else changed.

    No model with that output tensor does better on these images, whatever stays float inside:
    on EfficientNet-B0 with random weights (logits of std 0.4 reaching +-16) the int8 output
    alone holds 19.3 dB on the 300 held-apart images of the architecture matrix. None for a
    float output.
    """
    spec = TFLiteModel(model, use_xnnpack=False).output
    if not spec.quantized:
        return None
    info = np.iinfo(spec.dtype)
    grid = np.clip(np.round(reference / spec.scale) + spec.zero_point, info.min, info.max)
    return compare(reference, ((grid - spec.zero_point) * spec.scale).astype(np.float32)).sqnr_db


def _speed_check(float_model: bytes, model: bytes, all_int8: tuple[bytes, DriftFigures], work: Path,
                 min_speedup: float, progress: Progress) -> dict[str, Any]:
    """The written model against float32 (and the all-int8 model, when ops were kept float) at 1 thread.

    XNNPACK, interleaved in one run (:func:`mixed.latencies`). Under ``min_speedup`` x float32 (at least 1.0)
    (an int8 build slower than, or barely faster than, its float build is never left unsaid),
    ``verdict`` says so and ``offered`` names the fastest of the others: the all-int8 model
    (saved beside as ``model_int8_FAST.tflite``; its SQNR is under the budget) or the float32
    model (exact).
    """
    progress("speed check (1 thread, XNNPACK)", None, None)
    alt = all_int8[0] if all_int8[0] != model else None
    models: dict[str, Any] = {"float32": float_model, "int8": model, **({"all_int8": alt} if alt is not None else {})}
    ms = mixed.latencies(models, work, runs=SPEED_RUNS)
    speedup, floor = ms["float32"] / ms["int8"], max(min_speedup, 1.0)
    report: dict[str, Any] = {"measured": True, "threads": 1, "delegate": "xnnpack", "runs": SPEED_RUNS, "ms": ms,
                              "speedup_vs_float32": round(speedup, 3), "faster_than_float32": speedup > 1.0,
                              "min_speedup": floor, "offered": None}
    if speedup >= floor:
        return report
    how = "SLOWER than" if speedup < 1.0 else f"only {speedup:.2f}x as fast as"
    verdict = (f"the int8 model is {how} float32 at 1 thread on XNNPACK ({ms['int8']:.2f} ms vs "
               f"{ms['float32']:.2f} ms; floor {floor}x)")
    faster = min((k for k in ("all_int8", "float32") if k in ms and ms[k] < ms["int8"]), key=ms.get, default=None)
    if faster == "all_int8":
        report["offered"] = {"kind": "all_int8", "model": FAST_FILE, "ms": ms["all_int8"],
                             "speedup_vs_float32": round(ms["float32"] / ms["all_int8"], 3),
                             "sqnr_db": round(all_int8[1].sqnr_db, 2)}
        verdict += (f": {FAST_FILE} (all-int8, SQNR {all_int8[1].sqnr_db:.1f} dB, under the budget) runs "
                    f"{ms['all_int8']:.2f} ms, {report['offered']['speedup_vs_float32']:.2f}x float32")
    elif faster == "float32":
        report["offered"] = {"kind": "float32", "model": "the float32 model", "ms": ms["float32"],
                             "speedup_vs_float32": 1.0, "sqnr_db": None}
        verdict += ": the float32 model is faster (and exact)"
    else:
        verdict += f"; nothing faster was made: the float32 model is exact at {1 / speedup:.2f}x the time"
    report["verdict"] = verdict
    return report


def _quantize_checked(native: ChildWorker, calibrated: bytes, options: QuantizeOptions,
                      denied: Sequence[str] = ()) -> tuple[bytes, dict[str, Any]]:
    """TensorFlow's quantizer, then a first run on XNNPACK and the reference kernels, both in the child.

    With ``options.float_islands``, normalisations (LayerNorm's elementwise pieces, see
    :func:`edgeship.quantize.mixed.normalization_groups`) stay float, and the ops XNNPACK left
    outside in int8 but runs in float are quantized again as float islands, kept when that
    gives fewer partitions.

    Raises:
        CalibrationError: The model the quantizer wrote does not run on one of them.
    """
    if options.float_islands:  # LayerNorm's pieces float inside XNNPACK, as onnxruntime's QDQ computes them
        denied = [*denied, *(n for n in mixed.normalization_nodes(calibrated) if n not in set(denied))]
    quant, runs = _quantize_once(native, calibrated, options, denied)
    islands = _island_candidates(calibrated, Delegation.from_dict(runs["delegation"])) if options.float_islands else []
    if islands:
        islanded, islanded_runs = _quantize_once(native, calibrated, options, [*denied, *islands])
        if islanded_runs["delegation"]["partitions"] < runs["delegation"]["partitions"]:
            all_int8 = runs["delegation"]
            quant, runs = islanded, {**islanded_runs, "float_islands": islands, "all_int8_delegation": all_int8}
    return quant, runs


def _quantize_once(native: ChildWorker, calibrated: bytes, options: QuantizeOptions,
                   denied: Sequence[str]) -> tuple[bytes, dict[str, Any]]:
    quant = native.call("quantize (TensorFlow)", tflite_quant.quantize_calibrated, calibrated,
                        io_dtype=options.io.value, per_tensor=options.per_tensor, denylisted_nodes=list(denied))
    runs = native.call("first run of the int8 model", tflite_quant.check_runs, quant)
    broken = [f"{kernels}: {runs[kernels]}" for kernels in ("xnnpack", "reference") if runs[kernels]]
    if broken:
        raise CalibrationError(f"the int8 model TensorFlow's quantizer wrote does not run ({'; '.join(broken)}); "
                               f"ops: {_op_summary(quant)}; nothing was written")
    return quant, runs


def _island_candidates(calibrated: bytes, int8: Delegation) -> list[str]:
    """Ops outside XNNPACK in int8 whose type XNNPACK runs in float (the float model's delegation says)."""
    if int8.partitions <= 1:
        return []
    float_outside = set(of_interpreter(TFLiteModel(calibrated).interpreter).outside)
    ops = tflite_quant.op_names_by_output(calibrated)
    return [name for name in int8.outside_outputs if name in ops and ops[name] not in float_outside]


def _op_summary(model: bytes) -> str:
    return op_counts(op_histogram(model))


def _equalized_float_model(source: ConvertResult, work: Path) -> tuple[bytes, dict[str, Any]]:
    """Cross-layer equalize the converted ONNX and convert it again (onnx2tf, child process)."""
    from edgeship.convert.pipeline import run_onnx2tf
    from edgeship.quantize.equalize import equalize

    from edgeship._deps import require

    onnx = require("onnx", purpose="equalize the model")
    if not source.simplified_onnx:
        raise InputError("the conversion has no simplified ONNX model; re-run `edgeship convert` to use --equalize")
    model, info = equalize(onnx.load_from_string(source.simplified_onnx))
    onnx.save(model, str(work / "equalized.onnx"))
    child = run_onnx2tf(work / "equalized.onnx", work)
    model, _ = tflite_graph.clean((work / "tf" / FLOAT32_FILE).read_bytes())
    return model, {**info, "onnx2tf_s": child["wall_s"]}


BIAS_CORRECTION_IMAGES = 64


def _bias_correct(quant: bytes, calibrated: bytes, pixels: np.ndarray, prep: Any,
                  progress: Progress) -> tuple[bytes, dict[str, Any]]:
    """Sequential empirical bias correction on (at most 64 of) the calibration images."""
    from edgeship.quantize.bias_correction import correct_biases

    return correct_biases(quant, calibrated, *_paired_inputs(quant, pixels[:BIAS_CORRECTION_IMAGES], prep),
                          progress=lambda k, n: progress("bias correction", k, n))


def _paired_inputs(quant: bytes, pixels: np.ndarray, prep: Any) -> tuple[np.ndarray, np.ndarray]:
    """The same images as the float model's input and as the int8 model's typed input (the deployment path)."""
    return normalize(pixels, prep), TFLiteModel(quant, use_xnnpack=False).input_from_pixels(pixels, prep)


def _accuracy_aware(quantized: Quantizer, calibrated: bytes, start: tuple[bytes, DriftFigures],
                    errs: list[layers.LayerError], judged: Judged, options: QuantizeOptions,
                    progress: Progress) -> tuple[bytes, DriftFigures, list[dict[str, Any]], bool]:
    """Keep the most harmful layers in float one at a time until the drop is inside the budget."""
    quant, figs = start
    budget = options.max_drop or 0.0
    drop = figs.agreement_drop
    kept: list[dict[str, Any]] = []
    denied: list[str] = []
    best = (quant, figs)
    for err in layers.most_harmful(errs)[: options.max_float_layers]:
        if drop <= budget:
            break
        denied.append(err.name)
        candidate, _ = quantized(calibrated, denied)
        cfigs = judged.figures(candidate, progress, label=f"re-measure with {len(denied)} float layer(s)")
        drop = cfigs.agreement_drop
        kept.append({"layer": err.name, "op": err.op, "sqnr_db": err.sqnr_db, "added_error_db": err.added_error_db,
                     "size_bytes": len(candidate),
                     "top1_agreement": cfigs.top1_agreement, "mean_cosine": cfigs.mean_cosine})
        if cfigs.top1_agreement >= best[1].top1_agreement:
            best = (candidate, cfigs)
    within = best[1].agreement_drop <= budget
    return best[0], best[1], kept, within
