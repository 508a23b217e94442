"""onnxsim simplification and onnxruntime equivalence checks."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from edgeship._deps import require
from edgeship.errors import ConversionError

log = logging.getLogger(__name__)


def simplify(model: Any) -> Any:
    """Simplify with onnxsim (constant folding, shape inference, dead-node removal).

    Raises:
        ConversionError: onnxsim failed or could not prove the result equivalent.
    """
    onnxsim = require("onnxsim", purpose="simplify ONNX models")
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        raise ConversionError(f"onnxsim failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if not ok:
        raise ConversionError("onnxsim could not validate the simplified model against the original")
    return simplified


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
        from edgeship.runtime.interpreter import in_fixed_batches

        return in_fixed_batches(x, self.fixed_batch or len(x), lambda chunk: self.session.run(
            [self.output.name], {self.input.name: chunk.astype(np.float32)})[0])

    def run_all(self, batches: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.run(b) for b in batches], axis=0)


def _loadable(model: Any) -> Any:
    """The model with an IR version onnxruntime accepts (newer onnx writes IR 12; ORT 1.23 reads <= 11)."""
    from edgeship.convert.onnx_model import MAX_IR_VERSION

    if model.ir_version <= MAX_IR_VERSION:
        return model
    onnx = require("onnx")
    if onnx.helper.find_min_ir_version_for(model.opset_import) > MAX_IR_VERSION:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.ir_version = MAX_IR_VERSION
    return copy
