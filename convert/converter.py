"""``convert``: ONNX image classifier -> verified float TFLite, model card and report."""

from __future__ import annotations

import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship import reference, tflite_graph
from edgeship._child import ChildWorker, one_line
from edgeship._deps import HOST_TOOLS, versions
from edgeship._io import atomic_write_bytes, sha256_file
from edgeship._progress import Progress, Timer, silent
from edgeship.convert import onnx_model
from edgeship.convert.fold import fold_input_affine, normalization_into_graph
from edgeship.convert.gelu import fuse_gelu, lone_erf_notes
from edgeship.convert.report import (
    ChildRun,
    ConvertReport,
    ConvertSource,
    FloatCheck,
    NodeCounts,
    SimplifyCheck,
    VerificationInputs,
)
from edgeship.convert.simplify import simplify
from edgeship.errors import ConversionError, InputError, NativeCrashError, VerificationError
from edgeship.reference import OrtRunner
from edgeship.runtime.card import Layout, ModelCard, Preprocessing, TensorSpec, known_keys
from edgeship.runtime.delegation import flex_refusal, of_interpreter
from edgeship.runtime.images import ImageSet, Labels, list_images
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import compare
from edgeship.runtime.model_check import check_model_files

log = logging.getLogger(__name__)

# File names of a saved conversion (kept importable from here).
from edgeship.convert.result import (  # noqa: E402
    FLOAT16_FILE,
    FLOAT32_FILE,
    LABELS_FILE,
    SIMPLIFIED_FILE,
    ConvertResult,
    file_names,
)


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`convert`.

    Attributes:
        input_shape: Static ``N,C,H,W`` to convert with (default: dynamic batch -> 1).
        fp16: Also write and verify a float16 TFLite.
        images: Folder of real images to verify on (default: generated inputs).
        max_images: Verify on at most this many images (None: all).
        labels: Labels file (``wnid<TAB>names`` or one name per line) copied into the output.
        preprocessing: Image preprocessing (default: ImageNet recipe for the input size).
        synthetic_count: Number of generated inputs when no images are given.
        fold_input_affine: Fold leading Mul/Add/Sub/Div-by-constant ops on the input into
            the preprocessing (exact; fewer ops, and int8 input quantized once).
        pixels_in_graph: Put a per-channel normalisation (which clients such as MediaPipe
            Tasks cannot express) inside the graph, so the model takes 0..255 pixels.
    """

    input_shape: tuple[int, ...] | None = None
    fp16: bool = False
    images: Path | None = None
    max_images: int | None = None
    labels: Path | None = None
    preprocessing: Preprocessing | None = None
    synthetic_count: int = 16
    fold_input_affine: bool = True
    pixels_in_graph: bool = False

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images < 1:
            raise InputError(f"max_images must be >= 1, got {self.max_images}")
        if self.synthetic_count < 1:
            raise InputError(f"synthetic_count must be >= 1, got {self.synthetic_count}")

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        d["images"] = str(self.images) if self.images else None
        d["labels"] = str(self.labels) if self.labels else None
        d["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvertOptions:
        d = known_keys(cls, d, "convert option")
        for key in ("images", "labels"):
            d[key] = Path(d[key]) if d.get(key) else None
        d["input_shape"] = tuple(d["input_shape"]) if d.get("input_shape") else None
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"]) if d.get("preprocessing") else None
        return cls(**d)


def output_names(options: ConvertOptions) -> list[str]:
    """What :meth:`ConvertResult.save` writes for these options (checked before the work starts)."""
    return file_names(fp16=options.fp16, labels=options.labels is not None)


def convert(
    model: str | os.PathLike[str], *, options: ConvertOptions = ConvertOptions(), progress: Progress = silent
) -> ConvertResult:
    """Convert an ONNX image classifier to a verified float TFLite model (in memory).

    Args:
        model: Path to the ONNX model (never modified).
        options: See :class:`ConvertOptions`.
        progress: Progress hook (stage name, done, total).

    Returns:
        A :class:`ConvertResult`: the TFLite bytes, its model card and the report;
        :meth:`ConvertResult.save` writes them.

    Raises:
        InputError: Missing/corrupt model, wrong interface, bad image folder.
        ConversionError: Simplification or onnx2tf failed.
        VerificationError: The TFLite model does not match onnxruntime within tolerance.
    """
    started = time.perf_counter()
    timer = Timer(progress)
    src = Path(model)
    with timer.stage("load"):
        original = onnx_model.load_model(src)
        info = onnx_model.inspect_model(original, str(src))
        shape, shape_notes = onnx_model.resolve_shape(info, options.input_shape)
        prep = options.preprocessing or Preprocessing.imagenet(shape[2], shape[3])
        if tuple(prep.crop) != (shape[2], shape[3]):
            raise InputError(
                f"preprocessing crop {list(prep.crop)} does not match the model input {shape[2]}x{shape[3]}"
            )
        labels = Labels.load(options.labels) if options.labels else None
        images = _verification_images(options)
    source_sha = sha256_file(src)
    src_stat = src.stat()

    with tempfile.TemporaryDirectory(prefix="edgeship-convert-") as work:
        work_dir = Path(work)
        inputs = reference.make_inputs(
            images,
            prep,
            synthetic_count=options.synthetic_count,
            labels=images.labels_for(labels) if images and labels else (),
            progress=progress,
        )
        with timer.stage("simplify"):
            prepared, notes = onnx_model.normalise(original, info, shape)
            simplified, gelu_notes = fuse_gelu(simplify(prepared))
            notes += gelu_notes + lone_erf_notes(simplified)
            onnx_model.check_scores_output(simplified, src.name)
            scores = onnx_model.output_kind(simplified)
            renames = onnx_model.sanitise_names(simplified)
            if renames:
                notes.append(
                    f"{len(renames)} tensor name(s) TensorFlow rejects renamed (e.g. "
                    f"{next(iter(renames))!r} -> {next(iter(renames.values()))!r})"
                )
            model_prep, input_name = prep, renames.get(info.input_name, info.input_name)
            if options.fold_input_affine:
                simplified, model_prep, fold_notes = fold_input_affine(simplified, input_name, prep, shape[1])
                notes += fold_notes
            if options.pixels_in_graph:
                simplified, model_prep, graph_notes = normalization_into_graph(
                    simplified, input_name, model_prep, shape[1]
                )
                notes += graph_notes
            sim_check = _check_simplified(original, simplified, inputs, prep, model_prep, shape[0])
            atomic_write_bytes(work_dir / SIMPLIFIED_FILE, simplified.SerializeToString())
        with timer.stage("onnx2tf"):
            child = run_onnx2tf(work_dir / SIMPLIFIED_FILE, work_dir)
        tfl32 = work_dir / "tf" / "model_float32.tflite"
        tfl16 = work_dir / "tf" / "model_float16.tflite" if options.fp16 else None
        cleaned = _clean_graph(tfl32, tfl16)
        with timer.stage("verify"):
            _check_runnable(tfl32, tfl16)
            expected = reference.run_onnx(original, inputs.pixels, prep, progress=progress)
            checks = {"float32": _verify_one(tfl32, expected, inputs, model_prep, "float32", progress)}
            if options.fp16:
                checks["float16"] = _verify_one(
                    work_dir / "tf" / "model_float16.tflite", expected, inputs, model_prep, "float16", progress
                )
        _raise_on_failures(checks)
        with timer.stage("write"):
            tf_dir = work_dir / "tf"
            labels_bytes = options.labels.read_bytes() if options.labels else None
            card = _card(
                tfl32,
                FLOAT32_FILE,
                "float32",
                model_prep,
                src,
                source_sha,
                labels,
                LABELS_FILE if options.labels else None,
            ).with_(postprocessing=scores)
            if model_prep != prep:
                card = card.with_(source_preprocessing=prep, notes=tuple(n for n in notes if "folded" in n))
            float16 = (tf_dir / FLOAT16_FILE).read_bytes() if options.fp16 else None
            model_bytes = tfl32.read_bytes()
            report = ConvertReport(
                source=ConvertSource(str(src.resolve()), source_sha, src_stat.st_size, info),
                fixes=tuple(shape_notes + notes),
                input_shape_onnx=tuple(shape),
                node_counts=NodeCounts(
                    onnx_model.node_counts(original),
                    onnx_model.node_counts(simplified),
                    len(original.graph.node),
                    len(simplified.graph.node),
                ),
                simplify_check=sim_check,
                graph_cleanups=cleaned,
                xnnpack=of_interpreter(TFLiteModel(tfl32).interpreter),
                verification=checks,
                verification_inputs=VerificationInputs(
                    inputs.source,
                    int(len(inputs.pixels)),
                    str(images.root) if images else None,
                    len(images.skipped) if images else 0,
                ),
                preprocessing=model_prep,
                preprocessing_of_source=prep,
                sizes={
                    "onnx": src_stat.st_size,
                    FLOAT32_FILE: len(model_bytes),
                    **({FLOAT16_FILE: len(float16)} if float16 is not None else {}),
                },
                onnx2tf_child=child,
                versions={**versions(*HOST_TOOLS), "python": platform.python_version()},
                timings_s={**timer.seconds, "total": round(time.perf_counter() - started, 3)},
            )
            result = ConvertResult(
                model=model_bytes,
                card=card,
                report=report,
                simplified_onnx=(work_dir / SIMPLIFIED_FILE).read_bytes(),
                float16=float16,
                saved_model=_saved_model(tf_dir),
                labels=labels_bytes,
            )
        if src.stat().st_mtime_ns != src_stat.st_mtime_ns or sha256_file(src) != source_sha:
            raise ConversionError(f"the input model {src} changed during conversion; nothing is returned")
    return result


def preprocessing_for(
    model: str | os.PathLike[str], input_shape: tuple[int, ...] | None, given: dict[str, Any]
) -> Preprocessing:
    """Preprocessing from ``given`` keys, sized for the input the model will be converted with
    (crop = input H x W, resize 256/224 of it unless given)."""
    info = onnx_model.inspect_model(onnx_model.load_model(model), str(model))
    shape, _ = onnx_model.resolve_shape(info, input_shape)
    height, width = shape[2], shape[3]
    sized = {"crop": [height, width], "resize_shorter": round(min(height, width) * 256 / 224), **given}
    return Preprocessing.from_dict(sized)


def _verification_images(options: ConvertOptions) -> ImageSet | None:
    if options.images is None:
        return None
    images = list_images(options.images, minimum=1)
    if options.max_images:
        images = images.sample(options.max_images)
    return images


def _check_simplified(
    original: Any,
    simplified: Any,
    inputs: reference.VerifyInputs,
    prep: Preprocessing,
    model_prep: Preprocessing,
    batch: int,
) -> SimplifyCheck:
    """onnxruntime on the original vs the simplified (and folded) model, on a few of the inputs."""
    pixels = inputs.pixels[: max(batch, 8)]
    x = reference.nchw_batches(pixels, prep, batch=len(pixels))[0]
    ref = OrtRunner(original).run(x)
    _refuse_non_finite(original, ref)
    got = OrtRunner(simplified).run(reference.nchw_batches(pixels, model_prep, batch=len(pixels))[0])
    fig = compare(ref.reshape(len(x), -1), got.reshape(len(x), -1))
    result = SimplifyCheck(len(x), fig.max_abs_error, fig.mean_cosine, fig.top1_agreement)
    bad = int(np.count_nonzero(~np.isfinite(got)))
    if bad:
        raise ConversionError(
            f"the simplified model gives NaN or infinite scores ({bad} of {got.size}) where the original does not"
        )
    if fig.mean_cosine < 0.99999:
        raise ConversionError(
            f"simplified model differs from the original: mean cosine {fig.mean_cosine:.6f}, "
            f"max-abs {fig.max_abs_error:.3g}"
        )
    return result


def _refuse_non_finite(original: Any, scores: np.ndarray) -> None:
    """The source model's own scores are NaN or infinite: say so (and where), not "cosine 0"."""
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if not bad:
        return
    from onnx import numpy_helper  # heavy optional dependency: deferred

    weights = sum(
        int(np.count_nonzero(~np.isfinite(a)))
        for a in map(numpy_helper.to_array, original.graph.initializer)
        if a.dtype.kind == "f"
    )
    where = f"{weights} of its weight values are NaN or infinite" if weights else "its weights are finite"
    raise ConversionError(
        f"the source model's scores are NaN or infinite ({bad} of {scores.size} on the check "
        f"inputs; {where}); nothing was written"
    )


def run_onnx2tf(onnx_path: Path, work_dir: Path) -> ChildRun:
    """Run onnx2tf in edgeship's worker process on a private copy; return its figures."""
    from edgeship.convert import onnx2tf_worker

    model_copy = work_dir / "model.onnx"
    shutil.copyfile(onnx_path, model_copy)
    job = {"onnx": str(model_copy), "output": str(work_dir / "tf"), "workdir": str(work_dir)}
    start = time.perf_counter()
    with ChildWorker(env={"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}) as worker:
        try:
            result = worker.call("onnx2tf", onnx2tf_worker.run, job)
        except NativeCrashError as exc:
            result = {"ok": False, "error": str(exc)}
        log_text = Path(worker.log_path).read_text(errors="replace")
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if not result.get("ok") or not (work_dir / "tf" / "model_float32.tflite").is_file():
        kept = _keep_log(log_text)
        tail = one_line(log_text)
        raise ConversionError(
            f"onnx2tf failed: {result.get('error', 'no TFLite written')}"
            + (f" ({tail})" if tail and tail not in result.get("error", "") else "")
            + (f"; full log: {kept}" if kept else "")
        )
    return ChildRun(round(wall, 3), round(peak_mb, 1), 0)


def _clean_graph(*paths: Path | None) -> dict[str, int]:
    """The XNNPACK clean-ups of :mod:`tflite_graph`, in place on onnx2tf's outputs (verified next)."""
    counts: dict[str, int] = {}
    for path in (p for p in paths if p is not None):
        model, changed = tflite_graph.clean(path.read_bytes())
        if changed:
            path.write_bytes(model)
        counts = counts or changed
    return counts


def _check_runnable(*paths: Path | None) -> None:
    """Refuse a model the on-device interpreter cannot run, before verifying it here.

    This process has TensorFlow loaded (the graph clean-ups use it), and with it the
    interpreter silently gains TensorFlow's Flex delegate, which no device has: so Select
    TF ops and custom ops are refused from the file itself, then each model is loaded,
    allocated and run once in a child process with only the runtime's interpreter.
    """
    present = [p for p in paths if p is not None]
    for path in present:
        ops = tflite_graph.custom_ops(path.read_bytes())
        refusal = flex_refusal(ops)
        if refusal:  # other custom ops: the child's run says whether the runtime resolves them
            raise ConversionError(f"the converted model {refusal} (replace those ops in the ONNX model)")
    for path, problem in check_model_files(present).items():
        if problem:
            raise ConversionError(
                f"the converted model {path.name} does not run on the on-device interpreter: {problem}"
            )


def _keep_log(text: str) -> Path | None:
    """Keep a failed worker's log where the user can read it (the run's folders are removed) and log it."""
    if not text.strip():
        return None
    log.debug("onnx2tf log:\n%s", text)
    from edgeship._run import lasting_temp_dir

    fd, kept = tempfile.mkstemp(prefix="edgeship-onnx2tf-", suffix=".log", dir=lasting_temp_dir())
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return Path(kept)


def _verify_one(
    path: Path, expected: Any, inputs: reference.VerifyInputs, prep: Preprocessing, precision: str, progress: Progress
) -> FloatCheck:
    got = reference.run_tflite(path, inputs.pixels, prep, progress=progress, label=f"run {precision} tflite")
    fig = reference.figures(expected, got, inputs)
    tol = reference.TOLERANCES[precision]
    return FloatCheck(fig, tol, inputs.real, tuple(reference.failures(fig, tol, real=inputs.real)))


def _raise_on_failures(checks: dict[str, FloatCheck]) -> None:
    problems = [f"{name}: {p}" for name, c in checks.items() for p in c.failures]
    if problems:
        raise VerificationError("converted TFLite does not match onnxruntime: " + "; ".join(problems))


def _saved_model(tf_dir: Path) -> dict[str, bytes]:
    """onnx2tf's SavedModel, file by file (kept for TensorFlow's own tools)."""
    files: dict[str, bytes] = {}
    for name in ("saved_model.pb", "variables", "assets", "fingerprint.pb"):
        src = tf_dir / name
        for f in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []:
            files[str(f.relative_to(tf_dir))] = f.read_bytes()
    return files


def _card(
    path: Path,
    file_name: str,
    precision: str,
    prep: Preprocessing,
    src: Path,
    sha: str,
    labels: Labels | None,
    labels_file: str | None,
) -> ModelCard:
    model = TFLiteModel(path)
    inp, out = model.input, model.output
    classes = max(1, int(np.prod(out.shape[1:])))
    if labels is not None and len(labels) != classes:
        log.warning("labels file has %d entries but the model has %d outputs", len(labels), classes)
    return ModelCard(
        model_file=file_name,
        precision=precision,
        input=TensorSpec.of(inp, Layout.NHWC.value),
        output=TensorSpec.of(out),
        preprocessing=prep,
        source_model=src.name,
        source_sha256=sha,
        labels_file=labels_file,
        num_classes=classes,
    )
