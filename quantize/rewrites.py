"""Graph patterns that break int8, rewritten on the calibrated float model before quantizing.

Each rewrite is exact for the int8 model it leads to and registers itself under a name
that the quantize report lists with the number of places it changed. They edit the
flatbuffer with :mod:`edgeship.tflite_graph` (no interpreter).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgeship import tflite_graph as g

#: name -> rewrite(model object) -> number of places changed.
REWRITES: dict[str, Callable[[Any], int]] = {}


def rewrite(name: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    def register(fn: Callable[[Any], int]) -> Callable[[Any], int]:
        REWRITES[name] = fn
        return fn

    return register


def apply(calibrated: bytes) -> tuple[bytes, dict[str, int]]:
    """Run every rewrite; return the model and ``{rewrite: places changed}`` (changed ones only)."""
    return g.transform(calibrated, REWRITES)


def _range(tensor: Any) -> tuple[float, float] | None:
    q = tensor.quantization
    if q is None or q.min is None or q.max is None or len(q.min) != 1:
        return None
    return float(q.min[0]), float(q.max[0])


def _set_range(tensor: Any, lo: float, hi: float) -> None:
    tensor.quantization.min = np.array([lo], dtype=np.float32)
    tensor.quantization.max = np.array([hi], dtype=np.float32)


@rewrite("max_pool_padding_to_range_min")
def pad_value_to_range_min(model: Any) -> int:
    """``PADV2(x, pads, -inf or -FLT_MAX)`` (torch's padded max-pool) pads with min(x) instead.

    An int8 tensor cannot hold -inf: TensorFlow's quantizer makes a model that neither
    XNNPACK nor the reference kernels can prepare. Every int8 value of ``x`` is >= the
    bottom of its range, so padding with that bottom leaves every max-pool window's
    maximum unchanged: exact for the int8 model. After a ReLU the bottom is 0 and the op
    becomes a plain PAD, which XNNPACK runs inside its partition.
    """
    sg = model.subgraphs[0]
    changed = 0
    for op in g.ops_of(model, "PADV2"):
        pad = g.constant(model, op.inputs[2]) if len(op.inputs) > 2 else None
        span = _range(sg.tensors[op.inputs[0]])
        if pad is None or pad.size != 1 or span is None or float(pad.reshape(-1)[0]) >= span[0]:
            continue
        if span[0] == 0.0:
            op.inputs = op.inputs[:2]
            op.opcodeIndex = g.opcode_index(model, "PAD")
        else:
            name = g.tensor_name(sg.tensors[op.inputs[2]])
            op.inputs[2] = g.new_constant(model, np.full(pad.shape, span[0]), f"{name}/edgeship_range_min")
        _set_range(sg.tensors[op.outputs[0]], *span)
        changed += 1
    return changed
