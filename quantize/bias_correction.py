"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantization shifts the mean of each convolution's output channels. Layer by layer, in
execution order, the int8 model (with the corrections made so far) and its float twin
run on the calibration images; the per-channel mean of (dequantized int8 output - float
output), over positions where neither is clamped, is subtracted from the layer's int32
bias. Sequential correction matters: a shift measured downstream is mostly inherited
from upstream layers, so correcting all layers at once double-counts and diverges.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
#: TFLite TensorType values: an int8 or uint8 activation, an int32 bias.
_INT8_TYPES, _INT32 = (9, 3), 2


def correct_biases(
    quant: bytes,
    float_model: bytes,
    float_inputs: np.ndarray,
    quant_inputs: np.ndarray,
    *,
    min_count: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Return the int8 model with bias-corrected convolutions.

    Args:
        quant: Full-integer model.
        float_model: The calibrated float model it was quantized from (same tensor names).
        float_inputs: Float inputs ``[N, ...]`` (calibration images, model layout).
        quant_inputs: The same images as the int8 model's typed input ``[N, ...]``.
        min_count: Channels with fewer unclamped positions are left alone.
        progress: Called with (layers done, layers) after each layer.
    """
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from edgeship.quantize.tflite_quant import tensor_name
    from edgeship.runtime.interpreter import debug_interpreter

    qobj = fbu.read_model_from_bytearray(bytearray(quant))
    sub = qobj.subgraphs[0]
    q_ops = [d["op_name"] for d in debug_interpreter(quant)._get_ops_details()]  # noqa: SLF001
    f_interp = debug_interpreter(float_model)
    f_index = {d["name"]: d["index"] for d in f_interp.get_tensor_details()}
    convs = [
        op
        for op, name in zip(sub.operators, q_ops)
        if name in _CONV_OPS and _integer_conv(sub, op) and tensor_name(sub.tensors[op.outputs[0]]) in f_index
    ]
    # The layer producing the scores is left alone: its output range is the scores'.
    final = _score_producer(sub, q_ops)
    convs = [op for op in convs if op.outputs[0] != final]
    shifts = []
    for k, op in enumerate(convs):
        current = bytes(fbu.convert_object_to_bytearray(qobj))
        delta, count, step = _measure(current, f_interp, f_index, op, sub, float_inputs, quant_inputs)
        bias_t = sub.tensors[op.inputs[2]]
        bias_scale = np.asarray(bias_t.quantization.scale, dtype=np.float64)
        buf = qobj.buffers[bias_t.buffer]
        bias = np.frombuffer(np.asarray(buf.data, dtype=np.uint8).tobytes(), dtype=np.int32).astype(np.int64)
        corr = np.round(delta / bias_scale).astype(np.int64)
        corr[count < min_count] = 0
        buf.data = np.frombuffer(np.clip(bias - corr, -(2**31), 2**31 - 1).astype(np.int32).tobytes(), dtype=np.uint8)
        shifts.append(float(np.mean(np.abs(delta)) / step))
        if progress:
            progress(k + 1, len(convs))
    return bytes(fbu.convert_object_to_bytearray(qobj)), {
        "layers": len(convs),
        "images": int(len(float_inputs)),
        "mean_abs_shift_in_steps": round(float(np.mean(shifts)), 4) if shifts else 0.0,
        "max_layer_shift_in_steps": round(float(np.max(shifts)), 4) if shifts else 0.0,
    }


def _integer_conv(sub: Any, op: Any) -> bool:
    """An int8 convolution with an int32 bias (convolutions a mixed model keeps float have no integer bias)."""
    return (
        len(op.inputs) > 2
        and op.inputs[2] >= 0
        and sub.tensors[op.inputs[2]].type == _INT32
        and sub.tensors[op.outputs[0]].type in _INT8_TYPES
    )


def _score_producer(sub: Any, op_names: list[str]) -> int:
    """Tensor index of the scores before any reshape/slice at the end of the graph."""
    producer = {op.outputs[0]: (op, name) for op, name in zip(sub.operators, op_names) if len(op.outputs)}
    tensor = sub.outputs[0]
    while tensor in producer and producer[tensor][1] in (
        "RESHAPE",
        "STRIDED_SLICE",
        "SQUEEZE",
        "QUANTIZE",
        "DEQUANTIZE",
    ):
        tensor = producer[tensor][0].inputs[0]
    return int(tensor)


def _measure(
    quant: bytes,
    f_interp: Any,
    f_index: dict[str, int],
    op: Any,
    sub: Any,
    float_inputs: np.ndarray,
    quant_inputs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-channel mean output shift of one conv over the images, unclamped positions only."""
    from edgeship.quantize.tflite_quant import tensor_name
    from edgeship.runtime.interpreter import debug_interpreter

    q_interp = debug_interpreter(quant)
    out = op.outputs[0]
    detail = next(d for d in q_interp.get_tensor_details() if d["index"] == out)
    scale, zp = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    lo, hi = (info.min - zp) * scale, (info.max - zp) * scale
    f_out = f_index[tensor_name(sub.tensors[out])]
    f_in = f_interp.get_input_details()[0]["index"]
    q_in = q_interp.get_input_details()[0]["index"]
    total: np.ndarray | float = 0.0
    count: np.ndarray | float = 0.0
    for x, xq in zip(float_inputs, quant_inputs):
        f_interp.set_tensor(f_in, x[None])
        f_interp.invoke()
        q_interp.set_tensor(q_in, xq[None])
        q_interp.invoke()
        f = f_interp.get_tensor(f_out).astype(np.float64)
        raw = q_interp.get_tensor(out).astype(np.int32)
        mask = (raw > info.min) & (raw < info.max) & (f > lo) & (f < hi)
        diff = np.where(mask, (raw - zp) * scale - f, 0.0)
        channels = diff.shape[-1]
        total = total + diff.reshape(-1, channels).sum(0)
        count = count + mask.reshape(-1, channels).sum(0)
    count = np.asarray(count)
    return np.asarray(total) / np.maximum(count, 1), count, float(scale)
