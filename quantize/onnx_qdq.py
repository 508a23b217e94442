"""int8 ONNX QDQ models for onnxruntime targets, from the float ONNX that ``convert`` simplified.

:func:`quantize_qdq` calibrates onnxruntime's static quantizer on the same calibration images,
chosen and preprocessed the same way as the TFLite path (:mod:`edgeship.quantize.data`: the same
split, the same uint8 crops, the converted model's preprocessing), writes per-channel int8 weights
and int8 activations in QDQ form (``QuantizeLinear``/``DequantizeLinear`` pairs that onnxruntime
fuses into ``QLinearConv`` and the like), pinned to an opset and IR version that onnxruntime 1.21 (the
one Debian and Raspberry Pi OS trixie ship) loads, and measures it against the float model on the
evaluation images under the runtime's own :class:`~edgeship.runtime.ort_model.OrtModel`.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._deps import require
from edgeship._io import atomic_write_bytes, atomic_write_json
from edgeship._progress import Progress, silent
from edgeship._version import SCHEMA_VERSION
from edgeship.convert.result import ConvertResult
from edgeship.errors import CalibrationError, InputError, OutputExistsError
from edgeship.quantize import data
from edgeship.quantize.data import Images, ImagesUsed, Pixels, Split
from edgeship.quantize.source import float_source
from edgeship.reference import OrtRunner
from edgeship.runtime.card import ModelCard, Preprocessing, TensorSpec, known_keys
from edgeship.runtime.images import normalize
from edgeship.runtime.metrics import DriftFigures, compare
from edgeship.runtime.ort_model import QUANT_KEYS, OrtModel

#: File names in a quantize folder (beside the TFLite model's, never the same).
QDQ_FILE = "model_int8_qdq.onnx"
QDQ_CARD_FILE = "model_int8_qdq.card.json"
QDQ_REPORT_FILE = "qdq_report.json"
#: The newest opset and IR version onnxruntime 1.21 (Debian trixie's python3-onnxruntime) runs.
MAX_OPSET = 21
MAX_IR_VERSION = 10
#: The oldest opset with per-channel QuantizeLinear/DequantizeLinear (an ``axis``).
MIN_OPSET = 13


class QdqMethod(str, Enum):
    """onnxruntime's calibration methods (activation ranges)."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


@dataclass(frozen=True)
class QdqOptions:
    """Options of :func:`quantize_qdq`; the calibration split's fields mean what they mean in ``QuantizeOptions``.

    Attributes:
        num_calib, seed, eval_split, max_eval, min_calib: Which images calibrate and which evaluate
            (:class:`edgeship.quantize.data.Split`; the TFLite path's defaults).
        method: Activation range method (docs/quantization.md says how the default, percentile 99.999 with
            float logits, was chosen).
        percentile: Kept mass for ``percentile``.
        per_channel: Per-channel int8 weights (False: per-tensor).
        float_logits: The layer writing the scores reads its int8 input and int8 weights through
            DequantizeLinear and writes float scores (no int8 grid on the scores), as the TFLite path's
            float logits: the QuantizeLinear/DequantizeLinear pairs after it are removed.
        uint8_activations: uint8 activations (onnxruntime's U8S8 kernels) instead of int8 (S8S8).
        io: ``int8``: the model takes its int8 input as the first QuantizeLinear would write it (the runtime
            feeds ``pixel + k`` when the preprocessing folds into it, as for TFLite; scale and zero point
            in the model's metadata and card); ``float32``: float input. Scores are float either way.
    """

    num_calib: int = 200
    seed: int | None = None
    eval_split: float = 0.2
    max_eval: int | None = None
    min_calib: int = 10
    method: QdqMethod = QdqMethod.PERCENTILE
    percentile: float = 99.999
    per_channel: bool = True
    float_logits: bool = True
    uint8_activations: bool = False
    io: str = "int8"

    def __post_init__(self) -> None:
        if self.io not in ("int8", "float32"):
            raise InputError(f"io must be int8 or float32, got {self.io!r}")
        try:
            object.__setattr__(self, "method", QdqMethod(self.method))
        except ValueError as exc:
            raise InputError(f"method must be one of {[m.value for m in QdqMethod]}, got {self.method!r}") from exc
        if self.num_calib < 1:
            raise InputError(f"num_calib must be >= 1, got {self.num_calib}")
        if not 90.0 <= self.percentile < 100.0:
            raise InputError(f"percentile must be from 90 to below 100, got {self.percentile}")

    @property
    def split(self) -> Split:
        return Split(self.num_calib, self.seed, self.eval_split, self.max_eval, self.min_calib)

    @classmethod
    def on_split(cls, split: Split) -> QdqOptions:
        """The default QDQ options on ``split``: the calibration and evaluation images the TFLite path uses."""
        return cls(split.num_calib, split.seed, split.eval_split, split.max_eval, split.min_calib)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["method"] = self.method.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QdqOptions:
        return cls(**known_keys(cls, d, "QDQ option"))


@dataclass(frozen=True)
class QdqReport:
    """What :func:`quantize_qdq` did and measured (``qdq_report.json``).

    ``figures``: the QDQ model's own arithmetic against the float model (what the budget judges; ARM's
    int8 kernels compute it); ``host_kernels``: the same images through this machine's fused int8 kernels.
    """

    options: QdqOptions
    calibration: ImagesUsed
    evaluation: ImagesUsed
    figures: DriftFigures
    host_kernels: DriftFigures
    runtime: dict[str, Any]
    opset: int
    ir_version: int
    float_scores_removed: tuple[str, ...]
    versions: dict[str, str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "edgeship_report": "quantize_qdq",
            "options": self.options.to_dict(),
            "calibration": self.calibration.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "figures": self.figures.to_dict(),
            "host_kernels": self.host_kernels.to_dict(),
            "runtime": self.runtime,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "float_scores_removed": list(self.float_scores_removed),
            "versions": self.versions,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class QdqResult:
    """The int8 QDQ model (bytes), its card, its figures against the float model, the report."""

    model: bytes = field(repr=False)
    card: ModelCard
    figures: DriftFigures
    report: QdqReport
    #: The conversion's labels file (the card names it), written beside the model.
    labels: bytes | None = field(repr=False, default=None)

    def save(self, out_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write ``model_int8_qdq.onnx``, its card, ``qdq_report.json`` and the labels its card names into
        ``out_dir`` (atomically).

        Raises:
            OutputExistsError: One of them exists and ``force`` is False.
        """
        out = Path(out_dir)
        labels = self.card.labels_file if self.labels is not None else None
        names = (QDQ_FILE, QDQ_CARD_FILE, QDQ_REPORT_FILE, *([labels] if labels else []))
        existing = [n for n in names if (out / n).exists()]
        if existing and not force:
            raise OutputExistsError(f"{out / existing[0]} exists; pass force=True (--force) to replace it")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / QDQ_FILE, self.model)
        atomic_write_json(out / QDQ_CARD_FILE, self.card.to_dict())
        atomic_write_json(out / QDQ_REPORT_FILE, self.report.to_dict())
        if labels and self.labels is not None:
            atomic_write_bytes(out / labels, self.labels)
        return out / QDQ_FILE


def quantize_qdq(
    model: ConvertResult | str | os.PathLike[str],
    calibration: Images,
    *,
    evaluation: Images | None = None,
    options: QdqOptions = QdqOptions(),
    progress: Progress = silent,
) -> QdqResult:
    """Quantize the converted float ONNX to an int8 QDQ ONNX for onnxruntime and measure its drift.

    Args:
        model: A :class:`ConvertResult`, a saved convert folder, or an ONNX file (converted first).
        calibration: A folder of images or an iterable of ``HxWx3`` uint8 RGB arrays (as ``quantize``).
        evaluation: Images to measure on (None: the ones the split holds apart from calibration).
        options: See :class:`QdqOptions`.
        progress: Progress hook.

    Returns:
        A :class:`QdqResult` (``save`` writes it).

    Raises:
        InputError: Bad model or images; a conversion without its simplified ONNX.
        CalibrationError: Too few calibration images, or onnxruntime's quantizer failed.
    """
    started = time.perf_counter()
    listed = data.listed_sets(calibration, evaluation, options.split)
    source = float_source(model, progress)
    if not source.simplified_onnx:
        raise InputError("the conversion has no model_simplified.onnx to quantize; convert the ONNX model again")
    prep = source.card.preprocessing
    calib, evals = data.pixels_of(listed, calibration, evaluation, options.split, prep, source.label_names(), progress)
    float_onnx = fixed_dims(source.simplified_onnx)
    qdq, excluded = write_qdq(float_onnx, calib.pixels, prep, options, progress)
    measured = measure(float_onnx, qdq, evals, prep)
    report = QdqReport(
        options,
        calib.report,
        evals.report,
        measured.figures,
        measured.host_kernels,
        measured.runtime,
        *_versions_of(qdq),
        excluded,
        _tool_versions(),
        round(time.perf_counter() - started, 3),
    )
    card = qdq_card(source.card, qdq)
    return QdqResult(qdq, card, measured.figures, report, source.labels if card.labels_file else None)


def fixed_dims(model_bytes: bytes) -> bytes:
    """The float ONNX with a batch of 1 where its input's batch is symbolic (the quantizer needs fixed shapes)."""
    onnx = require("onnx", purpose="write an ONNX QDQ model")
    model = onnx.load_from_string(model_bytes)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and not dims[0].dim_value:
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1
        for out in model.graph.output:
            out_dims = out.type.tensor_type.shape.dim
            if out_dims and not out_dims[0].dim_value:
                out_dims[0].ClearField("dim_param")
                out_dims[0].dim_value = 1
        del model.graph.value_info[:]
        model = onnx.shape_inference.infer_shapes(model)
    return bytes(model.SerializeToString())


def calibration_batches(pixels: np.ndarray, prep: Preprocessing, layout: str = "NCHW") -> Iterator[np.ndarray]:
    """The calibration images as the float ONNX takes them, one ``[1, ...]`` input each."""
    for px in pixels:
        x = normalize(px[None], prep)
        yield np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x, dtype=np.float32)


def write_qdq(
    float_onnx: bytes, pixels: np.ndarray, prep: Preprocessing, options: QdqOptions, progress: Progress = silent
) -> tuple[bytes, tuple[str, ...]]:
    """onnxruntime's static quantizer (QDQ, int8 weights) calibrated on ``pixels``; (model, nodes left float)."""
    quant = require("onnxruntime.quantization", purpose="write an ONNX QDQ model")
    onnx = require("onnx", purpose="write an ONNX QDQ model")
    model = onnx.load_from_string(float_onnx)
    input_name = model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="edgeship-qdq-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        src.write_bytes(pinned(model, onnx).SerializeToString())
        reader = _Reader(input_name, calibration_batches(pixels, prep), len(pixels), progress)
        act = quant.QuantType.QUInt8 if options.uint8_activations else quant.QuantType.QInt8
        try:
            quant.quantize_static(
                str(src),
                str(dst),
                reader,
                quant_format=quant.QuantFormat.QDQ,
                per_channel=options.per_channel,
                activation_type=act,
                weight_type=quant.QuantType.QInt8,
                calibrate_method=_calibrate_method(quant, options.method),
                extra_options=_extra_options(options),
            )
        except Exception as exc:  # the quantizer raises many types
            raise CalibrationError(f"onnxruntime's quantizer failed: {' '.join(str(exc).split())[:300]}") from exc
        written = onnx.load(str(dst))
    if options.io == "int8" and not options.uint8_activations:
        written = int8_input(written, onnx)
    excluded = float_scores(written) if options.float_logits else ()
    return bytes(pinned(written, onnx).SerializeToString()), excluded


def int8_input(model: Any, onnx: Any) -> Any:
    """The model taking int8 input where its float input went only into one per-tensor QuantizeLinear.

    The QuantizeLinear is removed, its consumers read the graph input, and its scale and zero point go
    into the model's metadata (``edgeship.input_scale``, ``edgeship.input_zero_point``), where
    :class:`OrtModel` reads them. A model whose input goes anywhere else is returned as it is.
    """
    from onnx import numpy_helper

    graph, name = model.graph, model.graph.input[0].name
    users = [n for n in graph.node if name in n.input]
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return model
    quant, inits = users[0], {t.name: t for t in graph.initializer}
    if len(quant.input) < 3 or quant.input[1] not in inits or quant.input[2] not in inits:
        return model
    scale, zero = (numpy_helper.to_array(inits[quant.input[i]]) for i in (1, 2))
    if scale.size != 1 or zero.dtype != np.int8:
        return model
    for node in graph.node:
        node.input[:] = [name if i == quant.output[0] else i for i in node.input]
    graph.node.remove(quant)
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT8
    for key, value in zip(QUANT_KEYS["input"], (repr(float(scale.reshape(-1)[0])), str(int(zero.reshape(-1)[0])))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


def pinned(model: Any, onnx: Any) -> Any:
    """The model at an opset from :data:`MIN_OPSET` to :data:`MAX_OPSET` and IR version <= :data:`MAX_IR_VERSION`.

    Raises:
        InputError: The model needs a newer opset than onnxruntime 1.21 runs.
    """
    opset = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    version = opset.version if opset is not None else MIN_OPSET
    if version > MAX_OPSET:
        raise InputError(f"the model uses opset {version}; onnxruntime 1.21 runs opsets up to {MAX_OPSET}")
    if version < MIN_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_OPSET)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


#: Ops between the scores layer and the graph output that only move values (their QDQ pairs are dropped).
_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Reshape", "Flatten", "Squeeze", "Slice", "Transpose")


def float_scores(model: Any) -> tuple[str, ...]:
    """Drop the QuantizeLinear/DequantizeLinear pairs between the layer writing the scores and the output.

    That layer then runs in float on its dequantized int8 input and weights and writes float scores.
    Returns the names of the nodes removed.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    tail, node = [], producers.get(graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            tail.append(node)
        node = producers.get(node.input[0])
    outputs = {o.name for o in graph.output}
    for dropped in tail:
        _bypass(graph, dropped, outputs)
    used = {i for node in graph.node for i in node.input}
    for init in [t for t in graph.initializer if t.name not in used]:  # the dropped pairs' scales and zero points
        graph.initializer.remove(init)
    return tuple(n.name for n in tail)


def _bypass(graph: Any, node: Any, outputs: set[str]) -> None:
    """Remove ``node``, its readers reading its input instead (a graph output keeps its name)."""
    src, dst = node.input[0], node.output[0]
    graph.node.remove(node)
    if dst in outputs:  # the producer of src writes the output's name; src's other readers follow it
        for other in graph.node:
            other.output[:] = [dst if o == src else o for o in other.output]
            other.input[:] = [dst if i == src else i for i in other.input]
        return
    for other in graph.node:
        other.input[:] = [src if i == dst else i for i in other.input]


@dataclass(frozen=True)
class Measured:
    """The QDQ model against the float ONNX on the evaluation images, two ways (see :class:`OrtModel`'s ``fuse``).

    Attributes:
        figures: The model's own arithmetic (QDQ groups unfused): what ARM's int8 kernels compute.
        host_kernels: onnxruntime's int8 kernels of this machine (fused, as a device runs it).
        runtime: ``describe()`` of the fused run (kernels, version).
    """

    figures: DriftFigures
    host_kernels: DriftFigures
    runtime: dict[str, Any]


def measure(float_onnx: bytes, qdq: bytes, evals: Pixels, prep: Preprocessing) -> Measured:
    """The QDQ model (on the runtime's :class:`OrtModel`) against the float ONNX on the evaluation images."""
    reference = OrtRunner(float_onnx)
    ref = np.concatenate([reference.run(x) for x in calibration_batches(evals.pixels, prep)]).reshape(len(evals), -1)
    truth = list(evals.truth)
    figures = {}
    for fuse in (False, True):
        candidate = OrtModel(qdq, fuse=fuse)
        got = candidate.run_pixels(evals.pixels, prep).reshape(len(evals), -1)
        figures[fuse] = compare(ref, got, truth)
    return Measured(figures[False], figures[True], candidate.describe())


def qdq_card(float_card: ModelCard, qdq: bytes) -> ModelCard:
    """The float model's card, for the QDQ model (its own file, precision and tensors)."""
    model = OrtModel(qdq)
    shape = _model_shape(model.input.shape, model.layout)
    return float_card.with_(
        model_file=QDQ_FILE,
        precision="int8",
        input=TensorSpec(
            model.input.name,
            shape,
            model.input.dtype.name,
            model.layout,
            model.input.scale or None,
            model.input.zero_point if model.input.quantized else None,
        ),
        output=TensorSpec(model.output.name, model.output.shape, model.output.dtype.name),
        notes=(*float_card.notes, "int8 ONNX QDQ model for onnxruntime (CPU execution provider)"),
    )


def _model_shape(nhwc: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return (nhwc[0], nhwc[3], nhwc[1], nhwc[2]) if layout == "NCHW" else nhwc


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` contract: ``get_next()`` -> a feed dict, None at the end."""

    def __init__(self, name: str, batches: Iterator[np.ndarray], total: int, progress: Progress) -> None:
        self.name, self.batches, self.total, self.progress, self.done = name, batches, total, progress, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.done += 1
        self.progress("calibrate (onnxruntime)", self.done, self.total)
        return {self.name: batch}

    def rewind(self) -> None:  # onnxruntime >= 1.17 may ask; one pass is all it gets
        return None

    def __len__(self) -> int:
        return self.total


def _calibrate_method(quant: Any, method: QdqMethod) -> Any:
    return {
        QdqMethod.MINMAX: quant.CalibrationMethod.MinMax,
        QdqMethod.ENTROPY: quant.CalibrationMethod.Entropy,
        QdqMethod.PERCENTILE: quant.CalibrationMethod.Percentile,
    }[method]


def _extra_options(options: QdqOptions) -> dict[str, Any]:
    extra: dict[str, Any] = {"CalibTensorRangeSymmetric": False}
    if options.method is QdqMethod.PERCENTILE:
        extra["CalibPercentile"] = options.percentile
    return extra


def _versions_of(qdq: bytes) -> tuple[int, int]:
    onnx = require("onnx")
    model = onnx.load_from_string(qdq)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return int(opset), int(model.ir_version)


def _tool_versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for dist in ("onnxruntime", "onnx", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeship.quantize.onnx_qdq MODEL --calib DIR -o OUT``: write and measure the QDQ model."""
    import argparse
    import json
    import sys

    from edgeship.errors import EdgeshipError

    ap = argparse.ArgumentParser(prog="python -m edgeship.quantize.onnx_qdq", description=main.__doc__)
    ap.add_argument("model", help="ONNX model, or the output folder of `edgeship convert`")
    ap.add_argument("--calib", required=True, help="folder of calibration images")
    ap.add_argument("--eval", dest="eval_dir", help="evaluation images (default: those the split holds apart)")
    ap.add_argument("-o", "--out", required=True, help="output folder")
    ap.add_argument("--num-calib", type=int, default=QdqOptions.num_calib)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--method", choices=[m.value for m in QdqMethod], default=QdqOptions.method.value)
    ap.add_argument("--percentile", type=float, default=QdqOptions.percentile)
    ap.add_argument("--int8-logits", action="store_true", help="scores on the int8 output grid (default: float)")
    ap.add_argument("--uint8-activations", action="store_true")
    ap.add_argument("--io", choices=["int8", "float32"], default=QdqOptions.io, help="input dtype")
    ap.add_argument("--force", action="store_true", help="replace existing outputs")
    args = ap.parse_args(argv)
    options = QdqOptions(
        num_calib=args.num_calib,
        seed=args.seed,
        method=args.method,
        percentile=args.percentile,
        float_logits=not args.int8_logits,
        uint8_activations=args.uint8_activations,
        io=args.io,
    )
    try:
        if (Path(args.out) / QDQ_FILE).exists() and not args.force:
            raise OutputExistsError(f"{Path(args.out) / QDQ_FILE} exists; pass --force to replace it")
        result = quantize_qdq(args.model, args.calib, evaluation=args.eval_dir, options=options)
        path = result.save(args.out, force=args.force)
    except EdgeshipError as exc:
        print(f"edgeship.quantize.onnx_qdq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps({"model": str(path), **result.report.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
