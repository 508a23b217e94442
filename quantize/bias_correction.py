"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantization shifts the mean of each convolution's output channels. Running the float
and the quantized model on the calibration images measures that shift per channel; it is
subtracted from the float model's biases and the model is quantized again. All layers
are corrected together, a few damped rounds, so that corrections of early layers are
not counted twice downstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# Fused activation -> the open interval where the op is linear (errors there are bias shifts).
_LINEAR = {0: (-np.inf, np.inf), 1: (0.0, np.inf), 3: (0.0, 6.0), 2: (-1.0, 1.0)}


@dataclass(frozen=True)
class _Conv:
    output: int
    output_name: str
    bias: int  # tensor index of the bias in the float model
    activation: int


def _convs(model_obj: Any, op_names: list[str]) -> list[_Conv]:
    from tensorflow.lite.python import schema_py_generated as schema

    sub = model_obj.subgraphs[0]
    found = []
    for op, name in zip(sub.operators, op_names):
        if name not in _CONV_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
            continue
        opts = op.builtinOptions
        act = getattr(opts, "fusedActivationFunction", schema.ActivationFunctionType.NONE) if opts else 0
        out = int(op.outputs[0])
        found.append(_Conv(out, _name(sub.tensors[out]), int(op.inputs[2]), int(act)))
    return found


def _name(tensor: Any) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def correct_biases(calibrated: bytes, quantize: Callable[[bytes], bytes], samples: Callable[[], Iterable[np.ndarray]],
                   *, rounds: int = 3, damping: float = 0.7,
                   progress: Callable[[int, int], None] | None = None) -> tuple[bytes, dict[str, Any]]:
    """Return a calibrated float model whose biases compensate the quantization shift.

    Args:
        calibrated: Calibrated float model (ranges recorded).
        quantize: Calibrated model -> quantized model (the same settings as the final one).
        samples: Calibration inputs (float NHWC arrays).
        rounds: Correction rounds; each re-quantizes and re-measures.
        damping: Fraction of the measured shift removed per round.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from edgeship.quantize.layers import _interpreter

    obj = fbu.read_model_from_bytearray(bytearray(calibrated))
    float_interp = _interpreter(calibrated)
    op_names = [d["op_name"] for d in float_interp._get_ops_details()]  # noqa: SLF001
    convs = _convs(obj, op_names)
    history = []
    current = calibrated
    for r in range(rounds):
        shifts = _measure_shifts(calibrated, quantize(current), convs, samples)
        history.append(float(np.mean([np.mean(np.abs(s)) for s in shifts.values()])) if shifts else 0.0)
        buffers = obj.buffers
        tensors = obj.subgraphs[0].tensors
        for conv in convs:
            shift = shifts.get(conv.output_name)
            if shift is None:
                continue
            buf = buffers[tensors[conv.bias].buffer]
            bias = np.frombuffer(np.asarray(buf.data, dtype=np.uint8).tobytes(), dtype=np.float32).copy()
            if bias.shape != shift.shape:
                continue
            bias -= (damping * shift).astype(np.float32)
            buf.data = np.frombuffer(bias.tobytes(), dtype=np.uint8)
        current = bytes(fbu.convert_object_to_bytearray(obj))
        if progress:
            progress(r + 1, rounds)
    return current, {"rounds": rounds, "damping": damping, "layers": len(convs),
                     "mean_abs_shift_per_round": history}


def _measure_shifts(float_model: bytes, quant_model: bytes, convs: list[_Conv],
                    samples: Callable[[], Iterable[np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel mean (quantized - float) output of each conv, where the op is linear."""
    from edgeship.quantize.layers import _interpreter, _quantize

    f_int, q_int = _interpreter(float_model), _interpreter(quant_model)
    q_by_name = {d["name"]: d for d in q_int.get_tensor_details()}
    pairs = [(c, q_by_name[c.output_name]) for c in convs if c.output_name in q_by_name]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    f_in = f_int.get_input_details()[0]["index"]
    q_in = q_int.get_input_details()[0]
    for x in samples():
        f_int.set_tensor(f_in, x.astype(np.float32))
        f_int.invoke()
        q_int.set_tensor(q_in["index"], _quantize(x, q_in))
        q_int.invoke()
        for conv, qd in pairs:
            f = f_int.get_tensor(conv.output).astype(np.float64)
            scale, zp = qd["quantization"]
            if not scale:
                continue
            q = (q_int.get_tensor(qd["index"]).astype(np.float64) - zp) * scale
            lo, hi = _LINEAR.get(conv.activation, (-np.inf, np.inf))
            mask = (f > lo) & (f < hi)
            channels = f.shape[-1]
            diff = np.where(mask, q - f, 0.0).reshape(-1, channels)
            sums[conv.output_name] = sums.get(conv.output_name, 0) + diff.sum(0)
            counts[conv.output_name] = counts.get(conv.output_name, 0) + mask.reshape(-1, channels).sum(0)
    return {k: sums[k] / np.maximum(counts[k], 1) for k in sums}
