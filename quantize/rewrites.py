"""Graph patterns that break int8, rewritten on the calibrated float model before quantizing.

Each rewrite is exact for the int8 model it leads to and registers itself under a name
that the quantize report lists with the number of places it changed. They work on
TensorFlow Lite's flatbuffer object API (pure Python, no interpreter).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

#: name -> rewrite(model object) -> number of places changed.
REWRITES: dict[str, Callable[[Any], int]] = {}


def rewrite(name: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    def register(fn: Callable[[Any], int]) -> Callable[[Any], int]:
        REWRITES[name] = fn
        return fn

    return register


def apply(calibrated: bytes) -> tuple[bytes, dict[str, int]]:
    """Run every rewrite; return the model and ``{rewrite: places changed}`` (changed ones only)."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(calibrated))
    counts = {name: fn(model) for name, fn in REWRITES.items()}
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return calibrated, {}
    return bytes(fbu.convert_object_to_bytearray(model)), counts


def _opcode(model: Any, name: str) -> int:
    from tensorflow.lite.python import schema_py_generated as schema

    return int(getattr(schema.BuiltinOperator, name))


def _ops(model: Any, name: str) -> list[Any]:
    code = _opcode(model, name)
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return [op for op in model.subgraphs[0].operators if codes[op.opcodeIndex] == code]


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
    maximum unchanged: exact for the int8 model.
    """
    sg = model.subgraphs[0]
    changed = 0
    for op in _ops(model, "PADV2"):
        if len(op.inputs) < 3:
            continue
        x, value = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[2]]
        data = model.buffers[value.buffer].data
        span = _range(x)
        if data is None or span is None:
            continue
        pad = np.frombuffer(bytes(bytearray(data)), dtype=np.float32)
        if pad.size != 1 or pad[0] >= span[0]:
            continue
        if span[0] == 0.0:  # after a ReLU: a plain PAD (zeros), which XNNPACK runs inside its partition
            op.inputs = op.inputs[:2]
            op.opcodeIndex = _opcode_index(model, "PAD")
        else:
            op.inputs[2] = _new_constant(model, value, np.array([span[0]], dtype=np.float32).reshape(pad.shape))
        _set_range(sg.tensors[op.outputs[0]], *span)
        changed += 1
    return changed


def _opcode_index(model: Any, name: str) -> int:
    """Index of builtin op ``name`` in the model's operator codes (added when missing)."""
    from tensorflow.lite.python import schema_py_generated as schema

    code = _opcode(model, name)
    for i, c in enumerate(model.operatorCodes):
        if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
            return i
    entry = schema.OperatorCodeT()
    entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), 1
    model.operatorCodes.append(entry)
    return len(model.operatorCodes) - 1


def _new_constant(model: Any, like: Any, value: np.ndarray) -> int:
    """Append a constant tensor shaped like ``like`` holding ``value``; return its index."""
    from tensorflow.lite.python import schema_py_generated as schema

    buf = schema.BufferT()
    buf.data = np.frombuffer(value.astype(np.float32).tobytes(), dtype=np.uint8)
    model.buffers.append(buf)
    tensor = copy.deepcopy(like)
    tensor.buffer = len(model.buffers) - 1
    name = like.name.decode() if isinstance(like.name, bytes) else str(like.name)
    tensor.name = f"{name}/edgeship_range_min_{tensor.buffer}"
    tensor.quantization = None
    sg = model.subgraphs[0]
    sg.tensors.append(tensor)
    return len(sg.tensors) - 1
