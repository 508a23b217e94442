"""``quantize``: int8 post-training quantization from calibration images (a folder or arrays), in memory.

:func:`quantize` reads as the list of its steps; each step lives in the module named for it:
:mod:`.range_choice`, :mod:`.worker` (TensorFlow's quantizer in the child process),
:mod:`.speed` (placement and the speed check), :mod:`.search` (budget searches),
:mod:`.corrections` (equalization, bias correction); :mod:`.source` resolves what to quantize and
:mod:`.report` types what was measured; :mod:`.result` holds the outcome.
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeship._child import ChildWorker
from edgeship._deps import HOST_TOOLS, versions
from edgeship._progress import Progress, Timer, silent
from edgeship._run import owned_prefix
from edgeship.convert.result import ConvertResult
from edgeship.quantize import data, layers, rewrites, tflite_quant
from edgeship.quantize.corrections import bias_correct, equalized_float_model, paired_inputs
from edgeship.quantize.data import Images, Pixels
from edgeship.quantize.layers import LayerError
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.range_choice import apply_range_method, cross_fits, fold_bounds, fold_measurer
from edgeship.quantize.report import Accuracy, QuantizeReport, QuantizeSource, RangeReport, RunsOn, Sizes, StepReport
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
from edgeship.quantize.search_report import AccuracyAware, KeptLayer, MixedPrecision, Placement, SpeedCheck
from edgeship.quantize.source import float_source
from edgeship.quantize.speed import SpeedTiming, Stopwatch, speed_check, timed_placement
from edgeship.quantize.worker import Quantizer
from edgeship.reference import run_tflite
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import ImageSet, normalize
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
    listed = data.listed_sets(calibration, evaluation, options.split)  # bad folders: found before converting
    source = float_source(model, progress)
    with _native(worker) as native, tempfile.TemporaryDirectory(prefix=owned_prefix("quantize")) as work:
        calib, evals = _load_images(native, timer, listed, calibration, evaluation, options, source, progress)
        clock = Stopwatch(Path(work), timing)
        run = _Run(source, options, native, Path(work), timer, progress, calib, evals, clock)
        float_model, equalization = _equalize(run)
        (calibrated, rewritten), refs = _calibrate(run, float_model)
        calibrated, ranges = _choose_ranges(run, calibrated, refs.folds)
        quantized = Quantizer(native, options)
        (quant, runs), placement = _quantize_and_place(run, quantized, calibrated)
        quant, bias = _bias_correction(run, quant, calibrated)
        judged, figs, layer_errs, layer_plot = _evaluate(run, quant, calibrated, refs.evaluation)
        all_int8 = (quant, figs)  # before any op group is kept float: the speed check's alternative
        quant, figs, mixed, within = _sqnr_budget(run, quantized, calibrated, all_int8, judged)
        quant, figs, kept, within = _max_drop(run, quantized, calibrated, (quant, figs), layer_errs, judged, within)
        speed, mixed = _speed(run, quant, all_int8, mixed)
        steps = _Steps(equalization, rewritten, ranges, runs, placement, bias, mixed, kept, speed, started)
    report = _report(run, (quant, figs), within, layer_errs, steps)
    faster = all_int8[0] if speed.offered is not None and speed.offered.kind == "all_int8" else None
    card = int8_card(quant, report.output, source.card)
    return QuantizeResult(quant, card, figs, report, within, source, layer_plot, faster=faster)


@dataclass(frozen=True)
class _Steps:
    """What the steps of one :func:`quantize` call reported, for :func:`_report`."""

    equalization: StepReport
    rewrites: dict[str, int]
    ranges: RangeReport
    runs: RunsOn
    placement: Placement
    bias: StepReport
    mixed: MixedPrecision | None
    kept: tuple[KeptLayer, ...]
    speed: SpeedCheck
    started: float


def _report(
    run: _Run, written: tuple[bytes, DriftFigures], within: bool, layer_errs: list[LayerError], steps: _Steps
) -> QuantizeReport:
    (quant, figs), source, options = written, run.source, run.options
    return QuantizeReport(
        source=QuantizeSource(
            str(source.folder) if source.folder else None,
            source.card.model_file,
            source.card.source_model,
            source.card.source_sha256,
        ),
        options=options,
        calibration=run.calib.report,
        evaluation=run.evals.report,
        ranges=steps.ranges,
        rewrites=steps.rewrites,
        runs_on=steps.runs,
        placement=steps.placement,
        equalization=steps.equalization,
        bias_correction=steps.bias,
        figures=figs,
        sizes=Sizes.of(len(source.model), len(quant)),
        ops=op_histogram(quant),
        worst_layers=tuple(layer_errs[:10]),
        layer_count=len(layer_errs),
        accuracy=Accuracy.of(figs, sum(t is not None for t in run.evals.truth)),
        accuracy_aware=AccuracyAware(options.max_drop, drop_measure(figs), steps.kept, within),
        mixed_precision=steps.mixed,
        speed=steps.speed,
        output=INT8_FILE if within else OVER_BUDGET_FILE,
        versions={**versions(*HOST_TOOLS), "python": platform.python_version()},
        timings_s={**run.timer.seconds, "total": round(time.perf_counter() - steps.started, 3)},
        speed_timing=run.clock.record(),
    )


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
            data.pixels_of,
            listed,
            calibration,
            evaluation,
            options.split,
            source.card.preprocessing,
            source.label_names(),
            progress,
        )
        native.call("start TensorFlow", tflite_quant.start)
        return pixels.result()


def _equalize(run: _Run) -> tuple[bytes, StepReport]:
    """The float model to calibrate: the converted one, or cross-layer equalized and converted again."""
    if not run.options.use_equalize:
        return run.source.model, StepReport(False)
    with run.timer.stage("equalize"):
        model, info = equalized_float_model(run.source, run.work, normalize(run.calib.pixels, run.prep))
        px = run.evals.pixels  # the float model's change, on images equalization did not measure
        change = compare(run_tflite(run.source.model, px, run.prep), run_tflite(model, px, run.prep))
        info["float_change"] = {"images": len(px), "top1_agreement": change.top1_agreement, "sqnr_db": change.sqnr_db}
    return model, StepReport(True, info)


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


def _choose_ranges(run: _Run, calibrated: bytes, folds: dict[int, np.ndarray]) -> tuple[bytes, RangeReport]:
    measure = fold_measurer(run.source.model, run.calib.pixels, run.prep, run.progress, dict(folds))
    with run.timer.stage("ranges"):
        chosen, report = apply_range_method(
            calibrated, run.calib.pixels, run.prep, run.options, run.native, run.progress, measure
        )
    return chosen, RangeReport.from_dict(report)


def _quantize_and_place(run: _Run, quantized: Quantizer, calibrated: bytes) -> tuple[tuple[bytes, RunsOn], Placement]:
    """TensorFlow's quantizer; with timed placement, the large depthwise convolutions float when faster here."""
    with run.timer.stage("quantize"):
        made = quantized(calibrated)
    if not (run.options.timed_placement and run.options.float_islands):
        return made, Placement(False)
    with run.timer.stage("placement"):
        return timed_placement(quantized, calibrated, made, run.clock, run.progress)


def _bias_correction(run: _Run, quant: bytes, calibrated: bytes) -> tuple[bytes, StepReport]:
    if not run.options.bias_correction_ops:
        return quant, StepReport(False)
    with run.timer.stage("bias correction"):
        quant, info = bias_correct(
            quant, calibrated, run.calib.pixels, run.prep, run.options.bias_correction_ops, run.progress
        )
    return quant, StepReport(True, info)


def _evaluate(
    run: _Run, quant: bytes, calibrated: bytes, reference: np.ndarray
) -> tuple[Judged, DriftFigures, list[LayerError], bytes | None]:
    """Drift on the evaluation images, per-layer errors and their plot (the int8 run on the other core)."""
    px, prep = run.evals.pixels, run.prep
    with run.timer.stage("evaluate"), ThreadPoolExecutor(1) as pool:
        got = pool.submit(run_tflite, quant, px, prep)
        layer_errs = layers.layer_errors(calibrated, quant, *paired_inputs(quant, px[:LAYER_SAMPLES], prep))
        layer_plot = _layer_plot(run, layer_errs)
        judged = Judged(px, prep, reference, tuple(run.evals.truth))
        figs = compare(reference, got.result(), list(judged.truth))
    return judged, figs, layer_errs, layer_plot


def _layer_plot(run: _Run, layer_errs: list[LayerError]) -> bytes | None:
    title = (
        f"worst tensors, {run.options.method.value} calibration "
        f"({'per-tensor' if run.options.per_tensor else 'per-channel'})"
    )
    plot = layers.plot_worst(layer_errs, run.work / LAYER_PLOT, title=title)
    return plot.read_bytes() if plot and Path(plot).is_file() else None


def _sqnr_budget(
    run: _Run, quantized: Quantizer, calibrated: bytes, all_int8: tuple[bytes, DriftFigures], judged: Judged
) -> tuple[bytes, DriftFigures, MixedPrecision | None, bool]:
    if run.options.min_sqnr_db is None:
        return *all_int8, None, True
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
    layer_errs: list[LayerError],
    judged: Judged,
    within: bool,
) -> tuple[bytes, DriftFigures, tuple[KeptLayer, ...], bool]:
    if run.options.max_drop is None:
        return *start, (), within
    with run.timer.stage("accuracy-aware"):
        quant, figs, kept, within_drop = accuracy_aware(
            quantized, calibrated, start, layer_errs, judged, run.options, run.progress
        )
    return quant, figs, kept, within and within_drop


def _speed(
    run: _Run, quant: bytes, all_int8: tuple[bytes, DriftFigures], mixed: MixedPrecision | None
) -> tuple[SpeedCheck, MixedPrecision | None]:
    """The speed check (XNNPACK targets; full-integer ones run on NNAPI/DSPs, not measured here)."""
    if not run.options.float_islands:
        return SpeedCheck(False), mixed
    with run.timer.stage("speed check"):
        speed = speed_check(run.source.model, quant, all_int8, run.clock, run.options.min_speedup, run.progress)
    if mixed is not None and mixed.latency_ms_1_thread is not None:  # the same run, shown in the search too
        ms = speed.ms
        latency = {"float32": ms["float32"], "all_int8": ms.get("all_int8", ms["int8"]), "budgeted": ms["int8"]}
        mixed = replace(mixed, latency_ms_1_thread=latency)
    if speed.verdict:
        log.warning("%s", speed.verdict)
    return speed, mixed
