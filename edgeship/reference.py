"""Reference runs on the host: a TFLite model and the ONNX model (onnxruntime) on the same pixels, and the
tolerances that say a float conversion is the same model (convert's check; quantize and verify use the runners)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship._deps import require
from edgeship._progress import Progress, silent
from edgeship.errors import ConversionError
from edgeship.runtime import images as runtime_images
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import ImageSet, normalize, synthetic_pixels
from edgeship.runtime.interpreter import TFLiteModel, in_fixed_batches
from edgeship.runtime.metrics import DriftFigures, compare


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for a float model (agreement is only enforced on real images)."""

    min_cosine: float
    min_top1_agreement: float

    def to_dict(self) -> dict[str, float]:
        return {"min_cosine": self.min_cosine, "min_top1_agreement": self.min_top1_agreement}


#: Highest ONNX IR version the pinned onnxsim accepts (and onnxruntime reads).
MAX_IR_VERSION = 10

#: float32 must be numerically the same model; float16 weights round to 11 bits.
TOLERANCES = {
    "float32": Tolerance(min_cosine=0.9999, min_top1_agreement=1.0),
    "float16": Tolerance(min_cosine=0.999, min_top1_agreement=0.99),
}


@dataclass(frozen=True)
class VerifyInputs:
    """Pixels (uint8 NHWC, already resized and cropped) plus where they came from."""

    pixels: np.ndarray
    source: str  # "images" or "synthetic"
    labels: tuple[int | None, ...] = ()

    @property
    def real(self) -> bool:
        return self.source == "images"


def load_pixels(images: ImageSet, prep: Preprocessing, progress: Progress = silent) -> np.ndarray:
    """Resize/crop every image of the set to uint8 NHWC pixels, decoded in parallel (one thread per core).

    The same image path as the deployed runtime (``edgeship.runtime.images``), so
    calibration and checks see the pixels the device will see.
    """
    return runtime_images.load_pixels(images.files, prep, progress=progress)


def make_inputs(
    images: ImageSet | None,
    prep: Preprocessing,
    *,
    synthetic_count: int = 16,
    labels: Sequence[int | None] = (),
    progress: Progress = silent,
) -> VerifyInputs:
    if images is not None:
        return VerifyInputs(load_pixels(images, prep, progress), "images", tuple(labels))
    return VerifyInputs(synthetic_pixels(synthetic_count, prep, seed=0), "synthetic")


def nchw_batches(pixels: np.ndarray, prep: Preprocessing, batch: int = 32) -> list[np.ndarray]:
    return [normalize(pixels[i : i + batch], prep).transpose(0, 3, 1, 2) for i in range(0, len(pixels), batch)]


def run_tflite(
    path: Path | str | bytes,
    pixels: np.ndarray,
    prep: Preprocessing,
    *,
    num_threads: int | None = None,
    progress: Progress = silent,
    label: str = "run tflite",
) -> np.ndarray:
    """Float outputs of a TFLite model (a path or its bytes; any I/O dtype) on the pixels, one image at a time."""
    model = TFLiteModel(path, num_threads=num_threads)
    step = model.input.shape[0]
    outs = []
    for i in range(0, len(pixels), step):
        chunk = pixels[i : i + step]
        outs.append(model.run_pixels(chunk, prep).reshape(len(chunk), -1))
        progress(label, min(i + step, len(pixels)), len(pixels))
    return np.concatenate(outs, axis=0)


def run_onnx(model: Any, pixels: np.ndarray, prep: Preprocessing, *, progress: Progress = silent) -> np.ndarray:
    runner = OrtRunner(model)
    outs = []
    batches = nchw_batches(pixels, prep)
    for i, b in enumerate(batches):
        outs.append(runner.run(b).reshape(len(b), -1))
        progress("run onnxruntime", min((i + 1) * 32, len(pixels)), len(pixels))
    return np.concatenate(outs, axis=0)


def failures(fig: DriftFigures, tol: Tolerance, *, real: bool) -> list[str]:
    """Every tolerance a result misses (empty when it passes)."""
    bad = []
    if fig.mean_cosine < tol.min_cosine:
        bad.append(f"mean cosine {fig.mean_cosine:.6f} < {tol.min_cosine}")
    if real and fig.top1_agreement < tol.min_top1_agreement:
        bad.append(f"top-1 agreement {100 * fig.top1_agreement:.2f}% < {100 * tol.min_top1_agreement:.2f}%")
    return bad


def figures(ref: np.ndarray, cand: np.ndarray, inputs: VerifyInputs) -> DriftFigures:
    return compare(ref, cand, inputs.labels if inputs.labels else None)


class OrtRunner:
    """Run an ONNX model with onnxruntime on the CPU, one input, one output."""

    def __init__(self, model: Any, *, threads: int | None = None) -> None:
        ort = require("onnxruntime", purpose="run the ONNX reference")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        payload = model if isinstance(model, (bytes, str)) else _loadable(model).SerializeToString()
        try:
            self.session = ort.InferenceSession(payload, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ConversionError(f"onnxruntime cannot load the model: {str(exc)[:300]}") from exc
        self.input = self.session.get_inputs()[0]
        self.output = self.session.get_outputs()[0]
        batch = self.input.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Float NCHW batch -> float outputs (split into the model's fixed batch if any)."""
        return in_fixed_batches(
            x,
            self.fixed_batch or len(x),
            lambda chunk: self.session.run([self.output.name], {self.input.name: chunk.astype(np.float32)})[0],
        )

    def run_all(self, batches: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.run(b) for b in batches], axis=0)


def _loadable(model: Any) -> Any:
    """The model with an IR version onnxruntime accepts (newer onnx writes IR 12; ORT 1.23 reads <= 11)."""
    if model.ir_version <= MAX_IR_VERSION:
        return model
    onnx = require("onnx")
    if onnx.helper.find_min_ir_version_for(model.opset_import) > MAX_IR_VERSION:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = MAX_IR_VERSION
    return copy
