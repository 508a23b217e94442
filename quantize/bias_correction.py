"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantization shifts the mean of each convolution's output channels. Layer by layer, in
execution order, the int8 model (with the corrections made so far) and its float twin
run on the calibration images; the per-channel mean of (dequantized int8 output - float
output), over positions where neither is clamped, is subtracted from the layer's int32
bias. Sequential correction matters: a shift measured downstream is mostly inherited
from upstream layers, so correcting all layers at once double-counts and diverges.

Both models run on XNNPACK with every corrected convolution's output made a model output
(a delegate computes intermediate tensors in its own buffers, model outputs it writes out):
the int8 model once per layer and image, its biases patched in place in the serialised model
between layers; the float model once per image for each batch of consecutive layers whose
outputs fit in :data:`FLOAT_BYTES`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeship import tflite_graph
from edgeship.runtime.interpreter import TFLiteModel

log = logging.getLogger(__name__)

_CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
#: TFLite TensorType values: an int8 or uint8 activation, an int32 bias.
_INT8_TYPES, _INT32 = (9, 3), 2
#: A channel's shift is corrected only when it is this many standard errors from zero.
SIGNIFICANCE = 2.0
#: Float outputs held at once (bytes, over all images); the float model runs again for each later batch of layers.
FLOAT_BYTES = 256 * 2**20
#: Interpreter threads (quantize runs alone: both cores of a small machine).
THREADS = 2


@dataclass(frozen=True)
class _Conv:
    """One convolution to correct: its output tensor in each model and its int32 bias buffer."""

    out: int
    float_out: int
    bias_buffer: int
    bias_scale: np.ndarray
    #: Values of the output per image.
    size: int


def correct_biases(
    quant: bytes,
    float_model: bytes,
    float_inputs: np.ndarray,
    quant_inputs: np.ndarray,
    *,
    min_count: int = 10,
    ops: tuple[str, ...] = _CONV_OPS,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Return the int8 model with bias-corrected convolutions.

    Args:
        quant: Full-integer model.
        float_model: The calibrated float model it was quantized from (same tensor names).
        float_inputs: Float inputs ``[N, ...]`` (calibration images, model layout).
        quant_inputs: The same images as the int8 model's typed input ``[N, ...]``.
        min_count: Channels with fewer unclamped positions are left alone.
        ops: The convolution op types to correct.
        progress: Called with (layers done, layers) after each layer.
    """

    qobj = tflite_graph.read(quant)
    convs = _convs(qobj, tflite_graph.read(float_model), ops)
    if not convs:
        return quant, _report([], len(float_inputs), ops)
    probe = bytearray(_with_outputs(qobj, [c.out for c in convs]))
    float_probe = _with_outputs(tflite_graph.read(float_model), [c.float_out for c in convs])
    shifts: list[float] = []
    for batch in _batches(convs, len(float_inputs)):
        floats = _float_outputs(float_probe, batch, float_inputs)
        for conv in batch:
            delta, count, step = _measure(bytes(probe), conv.out, floats.pop(0), quant_inputs)  # then dropped
            bias = _bias_view(probe, conv.bias_buffer)
            corr = np.round(delta / conv.bias_scale).astype(np.int64)
            corr[count < min_count] = 0
            bias[:] = np.clip(bias.astype(np.int64) - corr, -(2**31), 2**31 - 1).astype(np.int32)
            shifts.append(float(np.mean(np.abs(delta)) / step))
            if progress:
                progress(len(shifts), len(convs))
    for conv in convs:  # the corrected biases into the model as it was (its own outputs only)
        qobj.buffers[conv.bias_buffer].data = _bias_view(probe, conv.bias_buffer).view(np.uint8).copy()
    return tflite_graph.write(qobj), _report(shifts, len(float_inputs), ops)


def _report(shifts: list[float], images: int, ops: tuple[str, ...]) -> dict[str, Any]:
    return {
        "ops": list(ops),
        "layers": len(shifts),
        "images": int(images),
        "mean_abs_shift_in_steps": round(float(np.mean(shifts)), 4) if shifts else 0.0,
        "max_layer_shift_in_steps": round(float(np.max(shifts)), 4) if shifts else 0.0,
    }


def _convs(qobj: Any, fobj: Any, ops: tuple[str, ...]) -> list[_Conv]:
    """The int8 convolutions with an int32 bias and a float twin of their output, in execution order.

    The layer producing the scores is left alone: its output range is the scores'.
    """

    sub = qobj.subgraphs[0]
    f_index = {tflite_graph.tensor_name(t): i for i, t in enumerate(fobj.subgraphs[0].tensors)}
    final = _score_producer(qobj)
    found = []
    for op in sub.operators:
        if tflite_graph.op_name(qobj, op) not in ops or not _integer_conv(sub, op) or op.outputs[0] == final:
            continue
        name = tflite_graph.tensor_name(sub.tensors[op.outputs[0]])
        if name in f_index:
            bias = sub.tensors[op.inputs[2]]
            scale = np.asarray(bias.quantization.scale, dtype=np.float64)
            size = int(np.prod(sub.tensors[op.outputs[0]].shape))
            found.append(_Conv(int(op.outputs[0]), f_index[name], int(bias.buffer), scale, size))
    return found


def _integer_conv(sub: Any, op: Any) -> bool:
    """An int8 convolution with an int32 bias (convolutions a mixed model keeps float have no integer bias)."""
    return (
        len(op.inputs) > 2
        and op.inputs[2] >= 0
        and sub.tensors[op.inputs[2]].type == _INT32
        and sub.tensors[op.outputs[0]].type in _INT8_TYPES
    )


def _score_producer(qobj: Any) -> int:
    """Tensor index of the scores before any reshape/slice at the end of the graph."""

    sub = qobj.subgraphs[0]
    producer = {op.outputs[0]: op for op in sub.operators if op.outputs is not None and len(op.outputs)}
    tensor = sub.outputs[0]
    passing = ("RESHAPE", "STRIDED_SLICE", "SQUEEZE", "QUANTIZE", "DEQUANTIZE")
    while tensor in producer and tflite_graph.op_name(qobj, producer[tensor]) in passing:
        tensor = producer[tensor].inputs[0]
    return int(tensor)


def _with_outputs(obj: Any, tensors: list[int]) -> bytes:
    """The model serialised with ``tensors`` added to its outputs (the object is left as it was)."""

    sub = obj.subgraphs[0]
    own = [int(t) for t in sub.outputs]
    sub.outputs = own + [t for t in tensors if t not in own]
    try:
        return tflite_graph.write(obj)
    finally:
        sub.outputs = own


def _batches(convs: list[_Conv], images: int) -> list[list[_Conv]]:
    """Consecutive convolutions whose float outputs on every image fit in :data:`FLOAT_BYTES` together
    (at least one each)."""
    batches: list[list[_Conv]] = [[]]
    held = 0
    for conv in convs:
        need = 4 * conv.size * images
        if batches[-1] and held + need > FLOAT_BYTES:
            batches.append([])
            held = 0
        batches[-1].append(conv)
        held += need
    return batches


def _bias_view(model: bytearray, buffer: int) -> np.ndarray:
    """The int32 bias data of ``buffer``, as a writable view into the serialised model."""

    data = tflite_graph._schema().Model.GetRootAs(model, 0).Buffers(buffer).DataAsNumpy()  # noqa: SLF001
    return data.view(np.int32)


def _float_outputs(model: bytes, convs: list[_Conv], inputs: np.ndarray) -> list[np.ndarray]:
    """The float output of each of ``convs`` on every image: ``[N, ...]`` per convolution."""

    m = TFLiteModel(model, num_threads=THREADS)
    outs: list[np.ndarray] = []
    for i, x in enumerate(inputs):
        m.interpreter.set_tensor(m.input.index, x[None])
        m.invoke()
        for k, conv in enumerate(convs):
            value = m.interpreter.get_tensor(conv.float_out)[0]
            if i == 0:
                outs.append(np.empty((len(inputs), *value.shape), np.float32))
            outs[k][i] = value
    return outs


def _measure(
    quant: bytes, out: int, float_out: np.ndarray, quant_inputs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-channel mean output shift of one conv over the images, unclamped positions only."""

    m = TFLiteModel(quant, num_threads=THREADS)
    detail = next(d for d in m.interpreter.get_output_details() if d["index"] == out)
    scale, zp = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    lo, hi = (info.min - zp) * scale, (info.max - zp) * scale
    sums, counts = [], []
    for xq, f32 in zip(quant_inputs, float_out):
        m.interpreter.set_tensor(m.input.index, xq[None])
        m.invoke()
        raw = m.interpreter.get_tensor(out)[0].astype(np.int32)
        f = f32.astype(np.float64)
        mask = (raw > info.min) & (raw < info.max) & (f > lo) & (f < hi)
        diff = np.where(mask, (raw - zp) * scale - f, 0.0)
        channels = diff.shape[-1]
        sums.append(diff.reshape(-1, channels).sum(0))
        counts.append(mask.reshape(-1, channels).sum(0))
    return _significant_mean(np.array(sums), np.array(counts, dtype=np.float64)), np.sum(counts, axis=0), float(scale)


def _significant_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-channel mean shift over the images (``[images, channels]`` sums and counts), zero where it is
    within two standard errors of zero (images as the units: positions of one image are correlated)."""
    n = counts.sum(0)
    mean = sums.sum(0) / np.maximum(n, 1)
    per_image = sums / np.maximum(counts, 1)
    var = np.sum(counts**2 * (per_image - mean) ** 2, axis=0) / np.maximum(n, 1) ** 2
    return np.where(np.abs(mean) > SIGNIFICANCE * np.sqrt(var), mean, 0.0)
