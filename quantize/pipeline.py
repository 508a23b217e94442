"""``quantize``: int8 post-training quantization from calibration images (a folder or arrays), in memory.

:func:`quantize` reads as the list of its steps; each step lives in the module named for it:
:mod:`.range_choice`, :mod:`.worker` (TensorFlow's quantizer in the child process),
:mod:`.speed` (placement and the speed check), :mod:`.search` (budget searches),
:mod:`.corrections` (equalization, bias correction), :mod:`.result`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._child import ChildWorker
from edgeship._deps import HOST_TOOLS, versions
from edgeship._progress import Progress, Timer, silent
from edgeship.convert.converter import convert
from edgeship.convert.result import FLOAT32_FILE, ConvertResult
from edgeship.errors import InputError
from edgeship.quantize import data, layers, rewrites, tflite_quant
from edgeship.quantize.corrections import bias_correct, equalized_float_model, paired_inputs
from edgeship.quantize.data import Images, Pixels, is_folder
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.range_choice import apply_range_method, cross_fits, fold_bounds, fold_measurer
from edgeship.quantize.result import (  # noqa: F401 - re-exported
    FAST_FILE,
    INT8_FILE,
    LAYER_PLOT,
    OVER_BUDGET_FILE,
    REPORT_FILE,
    QuantizeResult,
    int8_card,
    op_histogram,
    output_names,
)
from edgeship.quantize.search import Judged, accuracy_aware, budget_search, calib_scorer, drop_measure
from edgeship.quantize.search import output_grid_db as output_grid_db
from edgeship.quantize.speed import SpeedTiming, Stopwatch, speed_check, timed_placement
from edgeship.quantize.worker import Quantizer
from edgeship.reference import run_tflite
from edgeship.runtime.card import CARD_FILE, ModelCard, Preprocessing
from edgeship.runtime.images import ImageSet, Labels, normalize
from edgeship.runtime.metrics import DriftFigures, compare

log = logging.getLogger(__name__)

#: Evaluation images the per-layer errors are measured on.
LAYER_SAMPLES = 16


@dataclass(frozen=True)
class _Run:
    """What every step of one :func:`quantize` call shares."""

    source: ConvertResult
    options: QuantizeOptions
    native: ChildWorker
    work: Path
    timer: Timer
    progress: Progress
    calib: Pixels
    evals: Pixels
    clock: Stopwatch  # where the speed decisions are timed

    @property
    def prep(self) -> Preprocessing:
        return self.source.card.preprocessing


def quantize(
    model: ConvertResult | str | os.PathLike[str],
    calibration: Images,
    *,
    evaluation: Images | None = None,
    options: QuantizeOptions = QuantizeOptions(),
    progress: Progress = silent,
    worker: ChildWorker | None = None,
    timing: SpeedTiming | None = None,
) -> QuantizeResult:
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
        worker: A native worker to use (deploy starts one, TensorFlow imported, while it converts);
            None: one for this call.
        timing: Where timed placement, the speed floor and the speed check are timed (default: here;
            deploy and the CLI time them on the target's ssh device, ``--host``).

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
    with _native(worker) as native, tempfile.TemporaryDirectory(prefix="edgeship-quantize-") as work:
        calib, evals = _load_images(native, timer, listed, calibration, evaluation, options, source, progress)
        clock = Stopwatch(Path(work), timing)
        run = _Run(source, options, native, Path(work), timer, progress, calib, evals, clock)
        float_model, equalization = _equalize(run)
        (calibrated, rewritten), refs = _calibrate(run, float_model)
        calibrated, range_report = _choose_ranges(run, calibrated, refs.folds)
        quantized = Quantizer(native, options)
        (quant, runs), placement = _quantize_and_place(run, quantized, calibrated)
        quant, bias = _bias_correction(run, quant, calibrated)
        judged, figs, layer_errs, layer_plot = _evaluate(run, quant, calibrated, refs.evaluation)
        all_int8 = (quant, figs)  # before any op group is kept float: the speed check's alternative
        quant, figs, mixed_report, within = _sqnr_budget(run, quantized, calibrated, all_int8, judged)
        quant, figs, kept, within = _max_drop(run, quantized, calibrated, (quant, figs), layer_errs, judged, within)
        speed = _speed(run, quant, all_int8, mixed_report)
    report = {
        "edgeship_report": "quantize",
        "source": {
            "folder": str(source.folder) if source.folder else None,
            "float_model": source.card.model_file,
            "source_model": source.card.source_model,
            "source_sha256": source.card.source_sha256,
        },
        "options": options.to_dict(),
        "calibration": calib.report,
        "evaluation": evals.report,
        "ranges": range_report,
        "rewrites": rewritten,
        "runs_on": runs,
        "placement": placement,
        "equalization": equalization,
        "bias_correction": bias,
        "figures": figs.to_dict(),
        "sizes": {"float32": len(source.model), "int8": len(quant), "ratio": round(len(source.model) / len(quant), 2)},
        "ops": op_histogram(quant),
        "worst_layers": [e.to_dict() for e in layer_errs[:10]],
        "layer_count": len(layer_errs),
        "accuracy": _accuracy(figs, evals),
        "accuracy_aware": {
            "max_drop": options.max_drop,
            "measure": drop_measure(figs),
            "kept_in_float": kept,
            "within_budget": within,
        },
        "mixed_precision": mixed_report,
        "speed": speed,
        "speed_timing": run.clock.record(),
        "output": INT8_FILE if within else OVER_BUDGET_FILE,
        "versions": {**versions(*HOST_TOOLS), "python": platform.python_version()},
        "timings_s": {**timer.seconds, "total": round(time.perf_counter() - started, 3)},
    }
    faster = all_int8[0] if (speed.get("offered") or {}).get("kind") == "all_int8" else None
    card = int8_card(quant, report["output"], source.card)
    return QuantizeResult(quant, card, figs, report, within, source, layer_plot, faster=faster)


def _accuracy(figs: DriftFigures, evals: Pixels) -> dict[str, Any]:
    """Top-1 (and top-5) against the labels of the evaluation images, float and int8, when labels are known."""
    labelled = sum(t is not None for t in evals.truth)
    if not labelled or figs.ref_top1 is None:
        return {"labelled": 0}
    return {
        "labelled": labelled,
        "float_top1": figs.ref_top1,
        "int8_top1": figs.cand_top1,
        "top1_drop_points": figs.top1_drop,
        "float_top5": figs.ref_top5,
        "int8_top5": figs.cand_top5,
    }


@contextlib.contextmanager
def _native(worker: ChildWorker | None) -> Iterator[ChildWorker]:
    """The caller's worker (left running), else one for this call."""
    if worker is not None:
        yield worker
        return
    with ChildWorker() as own:
        yield own


def _load_images(
    native: ChildWorker,
    timer: Timer,
    listed: tuple[ImageSet, ImageSet] | None,
    calibration: Images,
    evaluation: Images | None,
    options: QuantizeOptions,
    source: ConvertResult,
    progress: Progress,
) -> tuple[Pixels, Pixels]:
    """Calibration and evaluation pixels, decoded while the child starts TensorFlow.

    The child is started from this thread: it is told to die with the thread that started it.
    """
    with ThreadPoolExecutor(1) as pool, timer.stage("load images"):
        pixels = pool.submit(
            _images, listed, calibration, evaluation, options, source.card.preprocessing, source.label_names(), progress
        )
        native.call("start TensorFlow", tflite_quant.start)
        return pixels.result()


def _equalize(run: _Run) -> tuple[bytes, dict[str, Any]]:
    """The float model to calibrate: the converted one, or cross-layer equalized and converted again."""
    if not run.options.equalize:
        return run.source.model, {"enabled": False}
    with run.timer.stage("equalize"):
        model, info = equalized_float_model(run.source, run.work)
    return model, {"enabled": True, **info}


@dataclass(frozen=True)
class _References:
    """The float model's outputs on the evaluation images and on each calibration fold."""

    evaluation: np.ndarray
    folds: dict[int, np.ndarray]


def _calibrate(run: _Run, float_model: bytes) -> tuple[tuple[bytes, dict[str, int]], _References]:
    """TensorFlow's calibrator on the calibration images (in the child), then the int8-breaking rewrites;
    meanwhile this process runs the float model on every image the later steps compare with."""
    px = run.calib.pixels
    with run.timer.stage("calibrate"), ThreadPoolExecutor(1) as pool:
        calibrating = pool.submit(
            run.native.call,
            "calibrate (TensorFlow)",
            tflite_quant.calibrate,
            float_model,
            normalize(px, run.prep),
            progress=lambda k: run.progress("calibrate", k, len(px)),
        )
        folds = fold_bounds(len(px)) if cross_fits(run.options, len(px)) else []
        refs = _References(
            run_tflite(run.source.model, run.evals.pixels, run.prep),
            {k: run_tflite(run.source.model, px[a:b], run.prep) for k, (a, b) in enumerate(folds)},
        )
        calibrated = calibrating.result()
    return rewrites.apply(calibrated), refs


def _choose_ranges(run: _Run, calibrated: bytes, folds: dict[int, np.ndarray]) -> tuple[bytes, dict[str, Any]]:
    measure = fold_measurer(run.source.model, run.calib.pixels, run.prep, run.progress, dict(folds))
    with run.timer.stage("ranges"):
        return apply_range_method(
            calibrated, run.calib.pixels, run.prep, run.options, run.native, run.progress, measure
        )


def _quantize_and_place(
    run: _Run, quantized: Quantizer, calibrated: bytes
) -> tuple[tuple[bytes, dict[str, Any]], dict[str, Any]]:
    """TensorFlow's quantizer; with timed placement, the large depthwise convolutions float when faster here."""
    with run.timer.stage("quantize"):
        made = quantized(calibrated)
    placement: dict[str, Any] = {"enabled": run.options.timed_placement and run.options.float_islands}
    if placement["enabled"]:
        with run.timer.stage("placement"):
            made, info = timed_placement(quantized, calibrated, made, run.clock, run.progress)
            placement.update(info)
    return made, placement


def _bias_correction(run: _Run, quant: bytes, calibrated: bytes) -> tuple[bytes, dict[str, Any]]:
    if not run.options.use_bias_correction:
        return quant, {"enabled": False}
    with run.timer.stage("bias correction"):
        quant, info = bias_correct(quant, calibrated, run.calib.pixels, run.prep, run.progress)
    return quant, {"enabled": True, **info}


def _evaluate(
    run: _Run, quant: bytes, calibrated: bytes, reference: np.ndarray
) -> tuple[Judged, DriftFigures, list[Any], bytes | None]:
    """Drift on the evaluation images, per-layer errors and their plot (the int8 run on the other core)."""
    px, prep = run.evals.pixels, run.prep
    with run.timer.stage("evaluate"), ThreadPoolExecutor(1) as pool:
        got = pool.submit(run_tflite, quant, px, prep)
        layer_errs = layers.layer_errors(calibrated, quant, *paired_inputs(quant, px[:LAYER_SAMPLES], prep))
        layer_plot = _layer_plot(run, layer_errs)
        judged = Judged(px, prep, reference, tuple(run.evals.truth))
        figs = compare(reference, got.result(), list(judged.truth))
    return judged, figs, layer_errs, layer_plot


def _layer_plot(run: _Run, layer_errs: list[Any]) -> bytes | None:
    title = (
        f"worst tensors, {run.options.method.value} calibration "
        f"({'per-tensor' if run.options.per_tensor else 'per-channel'})"
    )
    plot = layers.plot_worst(layer_errs, run.work / LAYER_PLOT, title=title)
    return plot.read_bytes() if plot and Path(plot).is_file() else None


def _sqnr_budget(
    run: _Run, quantized: Quantizer, calibrated: bytes, all_int8: tuple[bytes, DriftFigures], judged: Judged
) -> tuple[bytes, DriftFigures, dict[str, Any], bool]:
    if run.options.min_sqnr_db is None:
        return *all_int8, {}, True
    score = calib_scorer(quantized, run.source.model, run.calib.pixels, run.prep, run.options, run.progress)
    with run.timer.stage("budget search"):
        return budget_search(
            quantized, calibrated, all_int8, score, judged, run.source.model, run.clock, run.options, run.progress
        )


def _max_drop(
    run: _Run,
    quantized: Quantizer,
    calibrated: bytes,
    start: tuple[bytes, DriftFigures],
    layer_errs: list[Any],
    judged: Judged,
    within: bool,
) -> tuple[bytes, DriftFigures, list[dict[str, Any]], bool]:
    if run.options.max_drop is None:
        return *start, [], within
    with run.timer.stage("accuracy-aware"):
        quant, figs, kept, within_drop = accuracy_aware(
            quantized, calibrated, start, layer_errs, judged, run.options, run.progress
        )
    return quant, figs, kept, within and within_drop


def _speed(
    run: _Run, quant: bytes, all_int8: tuple[bytes, DriftFigures], mixed_report: dict[str, Any]
) -> dict[str, Any]:
    """The speed check (XNNPACK targets; full-integer ones run on NNAPI/DSPs, not measured here)."""
    if not run.options.float_islands:
        return {"measured": False}
    with run.timer.stage("speed check"):
        speed = speed_check(run.source.model, quant, all_int8, run.clock, run.options.min_speedup, run.progress)
    if "latency_ms_1_thread" in mixed_report:  # the same interleaved run, shown in the budget search too
        mixed_report["latency_ms_1_thread"] = {
            "float32": speed["ms"]["float32"],
            "all_int8": speed["ms"].get("all_int8", speed["ms"]["int8"]),
            "budgeted": speed["ms"]["int8"],
        }
    if speed.get("verdict"):
        log.warning("%s", speed["verdict"])
    return speed


def _listed(
    calibration: Images, evaluation: Images | None, options: QuantizeOptions
) -> tuple[ImageSet, ImageSet] | None:
    """Calibration and evaluation folders listed and split (None for arrays)."""
    if evaluation is not None and is_folder(calibration) != is_folder(evaluation):
        raise InputError("give calibration and evaluation images the same way: both folders, or both arrays")
    if not is_folder(calibration):
        return None
    return data.split_images(Path(calibration), options.split, Path(evaluation) if evaluation is not None else None)


def _images(
    listed: tuple[ImageSet, ImageSet] | None,
    calibration: Images,
    evaluation: Images | None,
    options: QuantizeOptions,
    prep: Any,
    labels: Labels | None,
    progress: Progress,
) -> tuple[Pixels, Pixels]:
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
