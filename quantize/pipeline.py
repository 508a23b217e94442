"""``quantize``: int8 post-training quantization from a folder of calibration images."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edgeship._child import ChildWorker
from edgeship._deps import HOST_TOOLS, versions
from edgeship._io import atomic_copy, atomic_write_bytes, atomic_write_json, check_outputs_free, staged_output
from edgeship._progress import Progress, Timer, silent
from edgeship.convert import pipeline as conv
from edgeship.convert import tflite_graph
from edgeship.convert.verify import load_pixels, run_tflite
from edgeship.errors import AccuracyDriftError, CalibrationError, InputError
from edgeship.quantize import layers, mixed, ranges, rewrites, tflite_quant
from edgeship.quantize.options import CalibrationMethod, QuantizeOptions
from edgeship.runtime.card import CARD_FILE, ModelCard, TensorSpec
from edgeship.runtime.images import ImageSet, Labels, list_images, normalize
from edgeship.runtime.delegation import Delegation, of_interpreter
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import DriftFigures, compare

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.tflite"
INT8_CARD = "model_int8.card.json"
OVER_BUDGET_FILE = "model_int8_OVER_BUDGET.tflite"
OVER_BUDGET_CARD = "model_int8_OVER_BUDGET.card.json"
REPORT_FILE = "quant_report.json"
LAYER_PLOT = "layer_errors.png"
LAYER_SAMPLES = 16


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` produced."""

    out_dir: Path
    model_path: Path
    card: ModelCard
    figures: DriftFigures
    report: dict[str, Any] = field(repr=False)
    within_budget: bool = True


@dataclass(frozen=True)
class _Source:
    folder: Path
    card: ModelCard
    labels: Labels | None


def output_names() -> list[str]:
    return [INT8_FILE, INT8_CARD, REPORT_FILE, LAYER_PLOT, OVER_BUDGET_FILE, OVER_BUDGET_CARD]


def quantize(model: str | os.PathLike[str], calibration: str | os.PathLike[str], out_dir: str | os.PathLike[str],
             *, options: QuantizeOptions = QuantizeOptions(), progress: Progress = silent) -> QuantizeResult:
    """Quantize a model to an int8 TFLite and measure how far it drifted.

    Full-integer, or with float islands (ops XNNPACK has no int8 kernel for) and, under an
    SQNR budget, float op groups, where ``options`` allow mixed models.

    Args:
        model: An ONNX file (converted first, into ``out_dir``) or the output folder of
            a previous ``convert``.
        calibration: Folder of calibration images (JPEG, PNG, BMP, WebP; any mode).
        out_dir: Output folder (may be the convert folder itself).
        options: See :class:`QuantizeOptions`.
        progress: Progress hook.

    Raises:
        InputError: Bad model path or image folder, or outputs exist without ``force``.
        CalibrationError: Too few usable calibration images, the quantizer failed, or its
            model does not run on XNNPACK and the reference kernels.
        NativeCrashError: TensorFlow's native code died in the child (one line, the stage named).
        AccuracyDriftError: ``max_drop`` given and still over budget after keeping
            layers in float (the best model is written as ``model_int8_OVER_BUDGET.tflite``).
    """
    started = time.perf_counter()
    timer = Timer(progress)
    model, out_dir = Path(model), Path(out_dir)
    calib_set, eval_set = split_images(Path(calibration), options)
    check_outputs_free(out_dir, output_names(), force=options.force)
    source = _float_source(model, out_dir, options, progress)
    prep = source.card.preprocessing
    with staged_output(out_dir, output_names(), force=options.force) as stage, ChildWorker() as native:
        with timer.stage("load images"):
            calib_px = load_pixels(calib_set, prep, progress)
            eval_px = load_pixels(eval_set, prep, progress)
        samples = _sampler(calib_px, prep)
        float_model, eq_report = (source.folder / source.card.model_file).read_bytes(), {"enabled": options.equalize}
        if options.equalize:
            with timer.stage("equalize"), tempfile.TemporaryDirectory(prefix="edgeship-equalize-") as work:
                float_model, info = _equalized_float_model(source.folder, Path(work))
                eq_report.update(info)
        with timer.stage("calibrate"):
            calibrated = native.call("calibrate (TensorFlow)", tflite_quant.calibrate, float_model,
                                     normalize(calib_px, prep), progress=lambda k: progress("calibrate", k, len(calib_px)))
        calibrated, rewritten = rewrites.apply(calibrated)
        score = _calib_scorer(native, source.folder / source.card.model_file, calib_px, prep, options, stage, progress)
        calibrated, range_report = _apply_range_method(calibrated, samples, len(calib_px), options, progress, score)
        with timer.stage("quantize"):
            quant, runs = _quantize_checked(native, calibrated, options)
        bc_report: dict[str, Any] = {"enabled": options.use_bias_correction}
        if options.use_bias_correction:
            with timer.stage("bias correction"):
                quant, info = _bias_correct(quant, calibrated, calib_px, prep, progress)
                bc_report.update(info)
        float_path = source.folder / source.card.model_file
        truth = eval_set.labels_for(source.labels)
        with timer.stage("evaluate"):
            reference = run_tflite(float_path, eval_px, prep, progress=progress, label="run float reference")
            figs = _evaluate(quant, eval_px, prep, reference, truth, stage, progress)
        with timer.stage("per-layer"):
            layer_errs = layers.layer_errors(calibrated, quant, *_paired_inputs(quant, eval_px[:LAYER_SAMPLES], prep))
        kept: list[dict[str, Any]] = []
        within, mixed_report = True, {}
        if options.min_sqnr_db is not None:
            with timer.stage("budget search"):
                quant, figs, mixed_report, within = _budget_search(native, calibrated, quant, figs, score, eval_px,
                                                                   prep, reference, truth, float_path, stage, options,
                                                                   progress)
        if options.max_drop is not None:
            with timer.stage("accuracy-aware"):
                quant, figs, kept, within_drop = _accuracy_aware(native, calibrated, quant, figs, layer_errs,
                                                                 eval_px, prep, reference, truth, stage, options,
                                                                 progress)
                within = within and within_drop
        final_name = INT8_FILE if within else OVER_BUDGET_FILE
        atomic_write_bytes(stage / final_name, quant)
        layers.plot_worst(layer_errs, stage / LAYER_PLOT,
                          title=f"worst tensors, {options.method.value} calibration "
                                f"({'per-tensor' if options.per_tensor else 'per-channel'})")
        card = _int8_card(stage / final_name, final_name, source.card)
        if source.card.labels_file and out_dir.resolve() != source.folder.resolve():
            atomic_copy(source.folder / source.card.labels_file, stage / source.card.labels_file)
        atomic_write_json(stage / (INT8_CARD if within else OVER_BUDGET_CARD), card.to_dict())
        float_size = float_path.stat().st_size
        report = {
            "edgeship_report": "quantize",
            "source": {"folder": str(source.folder), "float_model": source.card.model_file,
                       "source_model": source.card.source_model, "source_sha256": source.card.source_sha256},
            "options": options.to_dict(),
            "calibration": _image_report(calib_set),
            "evaluation": {**_image_report(eval_set), "held_apart_from_calibration": options.eval_dir is None},
            "ranges": range_report,
            "rewrites": rewritten,
            "runs_on": runs,
            "equalization": eq_report,
            "bias_correction": bc_report,
            "figures": figs.to_dict(),
            "sizes": {"float32": float_size, "int8": len(quant), "ratio": round(float_size / len(quant), 2)},
            "ops": _op_histogram(quant),
            "worst_layers": [e.to_dict() for e in layer_errs[:10]],
            "layer_count": len(layer_errs),
            "accuracy_aware": {"max_drop": options.max_drop, "kept_in_float": kept, "within_budget": within},
            "mixed_precision": mixed_report,
            "output": final_name,
            "versions": {**versions(*HOST_TOOLS), "python": platform.python_version()},
            "timings_s": {**timer.seconds, "total": round(time.perf_counter() - started, 3)},
        }
        atomic_write_json(stage / REPORT_FILE, report)
    # With --force, drop the other outcome's files from an earlier run so they cannot be mistaken.
    for stale in ((OVER_BUDGET_FILE, OVER_BUDGET_CARD) if within else (INT8_FILE, INT8_CARD)):
        (out_dir / stale).unlink(missing_ok=True)
    result = QuantizeResult(out_dir, out_dir / final_name, card, figs, report, within)
    if not within and options.min_sqnr_db is not None and figs.sqnr_db < options.min_sqnr_db:
        how = (f"after keeping {mixed_report.get('float_ops', 0)} op(s) float" if options.float_islands
               else "as a full-integer model (the target allows no float ops)")
        raise AccuracyDriftError(
            f"int8 model under the SQNR budget of {options.min_sqnr_db} dB {how}: SQNR {figs.sqnr_db:.2f} dB; "
            f"best model kept as {out_dir / OVER_BUDGET_FILE}", [f"sqnr_db {figs.sqnr_db:.2f}"])
    if not within:
        raise AccuracyDriftError(
            f"int8 model still over the --max-drop budget of {options.max_drop} points after keeping "
            f"{len(kept)} layer(s) in float: top-1 agreement {100 * figs.top1_agreement:.2f}%; best model kept "
            f"as {out_dir / OVER_BUDGET_FILE}", [f"top1_agreement {100 * figs.top1_agreement:.2f}%"])
    return result


def split_images(folder: Path, options: QuantizeOptions) -> tuple[ImageSet, ImageSet]:
    """Calibration images and the evaluation images (never the same files)."""
    images = list_images(folder, minimum=0)
    if len(images) < options.min_calib:
        raise CalibrationError(
            f"{folder} has {len(images)} usable image(s) ({len(images.skipped)} other file(s) skipped); "
            f"calibration needs at least {options.min_calib}")
    if options.eval_dir is not None:
        evals = list_images(options.eval_dir, minimum=1)
        calib = images.sample(options.num_calib, seed=options.seed)
        overlap = {f.resolve() for f in calib.files} & {f.resolve() for f in evals.files}
        if overlap:
            raise InputError(f"{len(overlap)} evaluation image(s) are also calibration images "
                             f"(e.g. {sorted(overlap)[0]}); keep the two sets apart")
    elif len(images) > options.num_calib and len(images) - options.num_calib >= 1:
        chosen = images.sample(options.num_calib, seed=options.seed)
        picked = set(chosen.files)
        calib = chosen
        evals = images.subset([i for i, f in enumerate(images.files) if f not in picked])
    else:
        n_eval = max(1, round(len(images) * options.eval_split))
        calib, evals = images.split(len(images) - n_eval)
        calib = calib.sample(options.num_calib, seed=options.seed)
    if len(calib) < options.min_calib:
        raise CalibrationError(f"only {len(calib)} calibration image(s) left after holding out "
                               f"{len(evals)} for evaluation; at least {options.min_calib} needed")
    if options.max_eval:
        evals = evals.sample(options.max_eval)
    return calib, evals


def _float_source(model: Path, out_dir: Path, options: QuantizeOptions, progress: Progress) -> _Source:
    """The float model to quantize: a convert folder, or convert the ONNX file first."""
    if model.is_dir():
        card_path = model / CARD_FILE
        if not card_path.is_file():
            raise InputError(f"{model} is not an edgeship convert folder (no {CARD_FILE}); pass the ONNX model "
                             "or run `edgeship convert` first")
        card = ModelCard.load(card_path)
        if card.precision != "float32" or not (model / card.model_file).is_file():
            raise InputError(f"{model} holds no float32 model to quantize (its card names {card.model_file}, "
                             f"{card.precision}); pass the ONNX model or a `edgeship convert` folder")
    elif model.is_file():
        folder = out_dir
        if _same_conversion(folder, model) and not options.force:
            log.info("reusing the conversion of %s in %s", model, folder)
        else:
            conv.convert(model, folder, options=conv.ConvertOptions(force=options.force), progress=progress)
        return _float_source(folder, out_dir, options, progress)
    else:
        raise InputError(f"model {model} does not exist")
    labels = Labels.load(model / card.labels_file) if card.labels_file and (model / card.labels_file).is_file() else None
    return _Source(model, card, labels)


def _same_conversion(folder: Path, model: Path) -> bool:
    """Whether ``folder`` holds a conversion of exactly this ONNX file."""
    from edgeship._io import sha256_file

    if not (folder / CARD_FILE).is_file() or not (folder / conv.FLOAT32_FILE).is_file():
        return False
    return ModelCard.load(folder / CARD_FILE).source_sha256 == sha256_file(model)


def _sampler(pixels: np.ndarray, prep: Any) -> Callable[[], Iterable[np.ndarray]]:
    def gen() -> Iterable[np.ndarray]:
        for i in range(len(pixels)):
            yield normalize(pixels[i:i + 1], prep)

    return gen


def _apply_range_method(calibrated: bytes, samples: Callable[[], Iterable[np.ndarray]], n: int,
                        options: QuantizeOptions, progress: Progress,
                        score: Callable[..., float] | None = None) -> tuple[bytes, dict[str, Any]]:
    recorded = tflite_quant.read_ranges(calibrated)
    report: dict[str, Any] = {"method": options.method.value, "tensors": len(recorded)}
    hists = ranges.collect_histograms(calibrated, recorded, samples(),
                                      progress=lambda k: progress("histograms", k, n))
    # Every method starts from edgeship's own statistics: TensorFlow's calibrator records an
    # in-place ADD's range on its producer too, which widens residual branches up to 1.5x.
    # The model input and the final scores keep their true min-max: clipping scores changes
    # the arg-max.
    m = TFLiteModel(calibrated, use_xnnpack=False)
    keep = {m.input.index, m.output.index}
    if options.method == CalibrationMethod.AUTO and score is not None:
        # Candidates fitted on the calibration images the scorer does not measure on, so that
        # the choice rewards ranges that generalise; the winner is then fitted on all of them.
        fit = hists if n <= 2 * options.search_images else ranges.collect_histograms(
            calibrated, recorded, itertools.islice(samples(), options.search_images, None))
        progress("choose ranges by measured SQNR", None, None)
        new, report["auto"] = ranges.choose_by_measurement(
            fit, options.percentile, lambda r: score(tflite_quant.set_ranges(calibrated, r)), keep=keep, final=hists)
    else:
        new = ranges.choose_ranges(hists, options.method, options.percentile, keep=keep)
    shrink = [(hi - lo) / max(recorded[i][2] - recorded[i][1], 1e-12) for i, (lo, hi) in new.items()]
    report.update({"adjusted": len(new), "mean_range_fraction": float(np.mean(shrink)) if shrink else 1.0})
    return tflite_quant.set_ranges(calibrated, new), report


def _calib_scorer(native: ChildWorker, float_path: Path, calib_px: np.ndarray, prep: Any, options: QuantizeOptions,
                  stage: Path, progress: Progress) -> Callable[..., float]:
    """``score(calibrated, float_nodes=())``: SQNR (dB) against the float model, on calibration images only,
    of the int8 model TensorFlow's quantizer makes (what the range choice and the budget search measure)."""
    pixels = calib_px[: options.search_images]
    reference: list[np.ndarray] = []

    def score(calibrated: bytes, float_nodes: Sequence[str] = ()) -> float:
        if not reference:
            reference.append(run_tflite(float_path, pixels, prep, progress=progress, label="run float (search images)"))
        quant, _ = _quantize_checked(native, calibrated, options, float_nodes)
        return _evaluate(quant, pixels, prep, reference[0], [None] * len(pixels), stage, progress,
                         label="measure a candidate").sqnr_db

    return score


def _budget_search(native: ChildWorker, calibrated: bytes, quant: bytes, figs: DriftFigures,
                   score: Callable[..., float], eval_px: np.ndarray, prep: Any, reference: np.ndarray,
                   truth: list[int | None], float_path: Path, stage: Path, options: QuantizeOptions,
                   progress: Progress) -> tuple[bytes, DriftFigures, dict[str, Any], bool]:
    """Meet ``options.min_sqnr_db`` by keeping the cheapest op groups float (mixed models only)."""
    budget = float(options.min_sqnr_db or 0.0)
    if not options.float_islands or figs.sqnr_db >= budget:
        return quant, figs, {"budget_sqnr_db": budget, "searched": False}, figs.sqnr_db >= budget
    progress("budget search", None, None)
    found = mixed.budgeted(calibrated, lambda nodes: score(calibrated, nodes), budget, held_apart_db=figs.sqnr_db)
    report: dict[str, Any] = {"budget_sqnr_db": budget, **found.to_dict(), "searched": True,
                              "eval_sqnr_db_all_int8": figs.sqnr_db}
    if not found.kept:
        return quant, figs, report, False
    candidate, runs = _quantize_checked(native, calibrated, options, found.nodes)
    cfigs = _evaluate(candidate, eval_px, prep, reference, truth, stage, progress, label="run budgeted int8")
    report.update(eval_sqnr_db=cfigs.sqnr_db)
    if cfigs.sqnr_db <= figs.sqnr_db:  # better on the search images only: keep the all-int8 model
        return quant, figs, {**report, "kept_float": [], "float_ops": 0}, False
    report.update(delegation=runs["delegation"],
                  latency_ms_1_thread=mixed.latencies({"float32": float_path, "all_int8": quant, "budgeted": candidate},
                                                      stage))
    return candidate, cfigs, report, cfigs.sqnr_db >= budget


def _quantize_checked(native: ChildWorker, calibrated: bytes, options: QuantizeOptions,
                      denied: Sequence[str] = ()) -> tuple[bytes, dict[str, Any]]:
    """TensorFlow's quantizer, then a first run on XNNPACK and the reference kernels, both in the child.

    With ``options.float_islands``, the ops XNNPACK left outside in int8 but runs in float
    are quantized again as float islands, kept when that gives fewer partitions.

    Raises:
        CalibrationError: The model the quantizer wrote does not run on one of them.
    """
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
    return ", ".join(f"{name} x{n}" for name, n in _op_histogram(model).items())


def _equalized_float_model(folder: Path, work: Path) -> tuple[bytes, dict[str, Any]]:
    """Cross-layer equalize the converted ONNX and convert it again (onnx2tf, child process)."""
    from edgeship._deps import require
    from edgeship.quantize.equalize import equalize

    onnx = require("onnx", purpose="equalize the model")

    simplified = folder / conv.SIMPLIFIED_FILE
    if not simplified.is_file():
        raise InputError(f"{folder} has no {conv.SIMPLIFIED_FILE}; re-run `edgeship convert` to use --equalize")
    model, info = equalize(onnx.load(str(simplified)))
    onnx.save(model, str(work / "equalized.onnx"))
    child = conv._run_onnx2tf(work / "equalized.onnx", work)  # noqa: SLF001 - the same offline child run
    model, _ = tflite_graph.clean((work / "tf" / conv.FLOAT32_FILE).read_bytes())
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


def _evaluate(quant: bytes, pixels: np.ndarray, prep: Any, reference: np.ndarray, truth: list[int | None],
              stage: Path, progress: Progress, label: str = "run int8") -> DriftFigures:
    tmp = stage / ".eval.tflite"
    atomic_write_bytes(tmp, quant)
    try:
        got = run_tflite(tmp, pixels, prep, progress=progress, label=label)
    finally:
        tmp.unlink(missing_ok=True)
    return compare(reference, got, truth)


def _accuracy_aware(native: ChildWorker, calibrated: bytes, quant: bytes, figs: DriftFigures, errs: list[layers.LayerError],
                    pixels: np.ndarray, prep: Any, reference: np.ndarray, truth: list[int | None], stage: Path,
                    options: QuantizeOptions, progress: Progress) -> tuple[bytes, DriftFigures, list[dict[str, Any]], bool]:
    """Keep the most harmful layers in float one at a time until the drop is inside the budget."""
    budget = options.max_drop or 0.0
    drop = figs.agreement_drop
    kept: list[dict[str, Any]] = []
    denied: list[str] = []
    best = (quant, figs)
    for err in layers.most_harmful(errs)[: options.max_float_layers]:
        if drop <= budget:
            break
        denied.append(err.name)
        candidate, _ = _quantize_checked(native, calibrated, options, denied)
        cfigs = _evaluate(candidate, pixels, prep, reference, truth, stage, progress,
                          label=f"re-measure with {len(denied)} float layer(s)")
        drop = cfigs.agreement_drop
        kept.append({"layer": err.name, "op": err.op, "sqnr_db": err.sqnr_db, "added_error_db": err.added_error_db,
                     "size_bytes": len(candidate),
                     "top1_agreement": cfigs.top1_agreement, "mean_cosine": cfigs.mean_cosine})
        if cfigs.top1_agreement >= best[1].top1_agreement:
            best = (candidate, cfigs)
    within = best[1].agreement_drop <= budget
    return best[0], best[1], kept, within


def _int8_card(path: Path, file_name: str, float_card: ModelCard) -> ModelCard:
    m = TFLiteModel(path)
    i, o = m.input, m.output
    return float_card.with_(
        model_file=file_name,
        precision="int8",
        input=TensorSpec(i.name, i.shape, i.dtype.name, float_card.input.layout, i.scale or None,
                         i.zero_point if i.quantized else None),
        output=TensorSpec(o.name, o.shape, o.dtype.name, None, o.scale or None, o.zero_point if o.quantized else None),
    )


def _image_report(images: ImageSet) -> dict[str, Any]:
    names = "\n".join(str(f.relative_to(images.root)) for f in images.files)
    return {"folder": str(images.root), "count": len(images), "skipped_files": len(images.skipped),
            "first": images.files[0].name if images.files else None,
            "last": images.files[-1].name if images.files else None,
            "file_list_sha256": hashlib.sha256(names.encode()).hexdigest()}


def _op_histogram(model: bytes) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(tflite_quant.op_names(model)).most_common())
