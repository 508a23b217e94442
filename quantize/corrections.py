"""Corrections before and after quantizing: cross-layer equalization and empirical bias correction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeship import tflite_graph
from edgeship._deps import require
from edgeship._progress import Progress
from edgeship.convert.converter import run_onnx2tf
from edgeship.convert.result import FLOAT32_FILE, ConvertResult
from edgeship.errors import InputError
from edgeship.quantize.bias_correction import correct_biases
from edgeship.quantize.equalize import channel_stats, equalize
from edgeship.runtime.images import normalize
from edgeship.runtime.interpreter import TFLiteModel


def equalized_float_model(source: ConvertResult, work: Path, inputs: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """Equalize the converted ONNX, its channels measured on ``inputs`` (normalized NHWC calibration
    images, at most :data:`STATS_IMAGES` of them), and convert it again (onnx2tf, child process)."""

    onnx = require("onnx", purpose="equalize the model")
    if not source.simplified_onnx:
        raise InputError(
            "the conversion has no simplified ONNX model to equalize; re-run `edgeship convert`, or quantize "
            "with --no-equalize"
        )
    model = onnx.load_from_string(source.simplified_onnx)
    model, info = equalize(model, stats=channel_stats(_onnx_layout(model, inputs[:STATS_IMAGES])))
    onnx.save(model, str(work / "equalized.onnx"))
    child = run_onnx2tf(work / "equalized.onnx", work)
    model, _ = tflite_graph.clean((work / "tf" / FLOAT32_FILE).read_bytes())
    return model, {**info, "stats_images": min(len(inputs), STATS_IMAGES), "onnx2tf_s": child.wall_s}


#: Calibration images the channel statistics of equalization are measured on.
STATS_IMAGES = 100


def _onnx_layout(model: Any, nhwc: np.ndarray) -> np.ndarray:
    """NHWC inputs in the ONNX model's own layout (NCHW unless its input's last dimension is the channels)."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    channels = nhwc.shape[-1]
    nchw = len(dims) == 4 and not (dims[-1] == channels and dims[1] != channels)
    return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)) if nchw else nhwc


BIAS_CORRECTION_IMAGES = 64


def bias_correct(
    quant: bytes, calibrated: bytes, pixels: np.ndarray, prep: Any, ops: tuple[str, ...], progress: Progress
) -> tuple[bytes, dict[str, Any]]:
    """Sequential empirical bias correction of the ``ops`` convolutions on (at most 64 of) the calibration images."""

    return correct_biases(
        quant,
        calibrated,
        *paired_inputs(quant, pixels[:BIAS_CORRECTION_IMAGES], prep),
        ops=ops,
        progress=lambda k, n: progress("bias correction", k, n),
    )


def paired_inputs(quant: bytes, pixels: np.ndarray, prep: Any) -> tuple[np.ndarray, np.ndarray]:
    """The same images as the float model's input and as the int8 model's typed input (the deployment path)."""
    return normalize(pixels, prep), TFLiteModel(quant, use_xnnpack=False).input_from_pixels(pixels, prep)
