"""``convert``: ONNX image classifier -> verified float TFLite, model card and report."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeship import reference
from edgeship._deps import HOST_TOOLS, versions
from edgeship._io import atomic_write_bytes, sha256_file
from edgeship._progress import Progress, Timer, silent
from edgeship._run import owned_prefix
from edgeship.convert import onnx_model
from edgeship.convert.fold import fold_input_affine, normalization_into_graph
from edgeship.convert.gelu import fuse_gelu, lone_erf_notes
from edgeship.convert.onnx2tf_run import check_runnable, clean_graph, saved_model_files
from edgeship.convert.onnx2tf_run import run_onnx2tf as run_onnx2tf
from edgeship.convert.options import ConvertOptions as ConvertOptions
from edgeship.convert.options import output_names as output_names
from edgeship.convert.options import preprocessing_for as preprocessing_for
from edgeship.convert.report import ConvertReport, ConvertSource, NodeCounts, VerificationInputs
from edgeship.convert.result import FLOAT16_FILE, FLOAT32_FILE, LABELS_FILE, SIMPLIFIED_FILE, ConvertResult
from edgeship.convert.simplify import simplify
from edgeship.convert.verification import check_simplified, raise_on_failures, verification_images, verify_one
from edgeship.errors import ArgumentTypeError, ConversionError, InputError
from edgeship.runtime.card import Layout, ModelCard, Preprocessing, TensorSpec
from edgeship.runtime.delegation import of_interpreter
from edgeship.runtime.images import Labels
from edgeship.runtime.interpreter import TFLiteModel

log = logging.getLogger(__name__)


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
    if not isinstance(options, ConvertOptions):
        raise ArgumentTypeError(
            f"convert's options must be a ConvertOptions, got {type(options).__name__} "
            "(e.g. options=ConvertOptions(fp16=True))"
        )
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
        images = verification_images(options)
    source_sha = sha256_file(src)
    src_stat = src.stat()

    with tempfile.TemporaryDirectory(prefix=owned_prefix("convert")) as work:
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
            onnx_model.check_no_loops(simplified, src.name)
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
            sim_check = check_simplified(original, simplified, inputs, prep, model_prep, shape[0])
            atomic_write_bytes(work_dir / SIMPLIFIED_FILE, simplified.SerializeToString())
        with timer.stage("onnx2tf"):
            child = run_onnx2tf(work_dir / SIMPLIFIED_FILE, work_dir, float16=options.fp16)
        tfl32 = work_dir / "tf" / "model_float32.tflite"
        tfl16 = work_dir / "tf" / "model_float16.tflite" if options.fp16 else None
        cleaned = clean_graph(tfl32, tfl16)
        with timer.stage("verify"):
            check_runnable(tfl32, tfl16)
            expected = reference.run_onnx(original, inputs.pixels, prep, progress=progress)
            checks = {"float32": verify_one(tfl32, expected, inputs, model_prep, "float32", progress)}
            if options.fp16:
                checks["float16"] = verify_one(
                    work_dir / "tf" / "model_float16.tflite", expected, inputs, model_prep, "float16", progress
                )
        raise_on_failures(checks)
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
                saved_model=saved_model_files(tf_dir),
                labels=labels_bytes,
            )
        if src.stat().st_mtime_ns != src_stat.st_mtime_ns or sha256_file(src) != source_sha:
            raise ConversionError(f"the input model {src} changed during conversion; nothing is returned")
    return result


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
