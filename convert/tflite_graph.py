"""Edit TFLite flatbuffers, and the clean-ups that keep converted graphs whole inside XNNPACK.

onnx2tf leaves ops behind for torch exports that XNNPACK cannot take, and every such op
splits the delegate into another partition with copies at each boundary. The clean-ups
here rewrite them into ops XNNPACK runs, on the float TFLite right after onnx2tf; the
convert stage then verifies the result against onnxruntime as it does any conversion.
The editing helpers work on TensorFlow Lite's flatbuffer object API (pure Python).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import numpy as np

#: name -> clean-up(model object) -> number of places changed.
CLEANUPS: dict[str, Callable[[Any], int]] = {}

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8, 7: np.int16}


def cleanup(name: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    def register(fn: Callable[[Any], int]) -> Callable[[Any], int]:
        CLEANUPS[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- editing helpers
def read(model: bytes) -> Any:
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    return fbu.read_model_from_bytearray(bytearray(model))


def write(model: Any) -> bytes:
    """Serialise, dropping operator codes no op uses any more (an interpreter registers every listed one)."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    used = sorted({op.opcodeIndex for sg in model.subgraphs for op in sg.operators})
    remap = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for sg in model.subgraphs:
        for op in sg.operators:
            op.opcodeIndex = remap[op.opcodeIndex]
    return bytes(fbu.convert_object_to_bytearray(model))


def transform(model: bytes, steps: dict[str, Callable[[Any], int]]) -> tuple[bytes, dict[str, int]]:
    """Apply ``steps`` in order; return the model and ``{step: places changed}`` (changed ones only)."""
    obj = read(model)
    counts = {name: fn(obj) for name, fn in steps.items()}
    counts = {k: v for k, v in counts.items() if v}
    return (write(obj) if counts else model), counts


def clean(model: bytes) -> tuple[bytes, dict[str, int]]:
    """Every registered clean-up."""
    return transform(model, CLEANUPS)


def opcode(name: str) -> int:
    from tensorflow.lite.python import schema_py_generated as schema

    return int(getattr(schema.BuiltinOperator, name))


def _code(entry: Any) -> int:
    return max(entry.builtinCode, entry.deprecatedBuiltinCode)


def op_type(model: Any, op: Any) -> int:
    return _code(model.operatorCodes[op.opcodeIndex])


def op_name(model: Any, op: Any) -> str:
    """The builtin op's name (``CONV_2D``...), ``CUSTOM`` for others."""
    return _builtin_names().get(op_type(model, op), "CUSTOM")


@functools.lru_cache(maxsize=1)
def _builtin_names() -> dict[int, str]:
    from tensorflow.lite.python import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def dtype_name(tensor: Any) -> str:
    """A tensor's element type as a numpy dtype name (``int8``...), ``other`` when unknown here."""
    return np.dtype(_DTYPES[tensor.type]).name if tensor.type in _DTYPES else "other"


def ops_of(model: Any, name: str) -> list[Any]:
    code = opcode(name)
    return [op for op in model.subgraphs[0].operators if op_type(model, op) == code]


def opcode_index(model: Any, name: str) -> int:
    """Index of builtin op ``name`` in the model's operator codes (added when missing)."""
    from tensorflow.lite.python import schema_py_generated as schema

    code = opcode(name)
    for i, c in enumerate(model.operatorCodes):
        if _code(c) == code:
            return i
    entry = schema.OperatorCodeT()
    entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), 1
    model.operatorCodes.append(entry)
    return len(model.operatorCodes) - 1


def tensor_name(tensor: Any) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def constant(model: Any, index: int) -> np.ndarray | None:
    """The value of a constant tensor, or None for an activation."""
    t = model.subgraphs[0].tensors[index]
    data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
    if data is None or len(data) == 0 or t.type not in _DTYPES:
        return None
    shape = [int(d) for d in t.shape] if t.shape is not None else []
    return np.frombuffer(bytes(bytearray(data)), dtype=_DTYPES[t.type]).reshape(shape)


def new_constant(model: Any, value: np.ndarray, name: str, dtype: type = np.float32) -> int:
    """Append a constant tensor (float32 or int32); return its index."""
    from tensorflow.lite.python import schema_py_generated as schema

    value = np.asarray(value, dtype=dtype)
    buf = schema.BufferT()
    buf.data = np.frombuffer(value.tobytes(), dtype=np.uint8)
    model.buffers.append(buf)
    t = schema.TensorT()
    t.shape, t.buffer, t.name = np.array(value.shape, dtype=np.int32), len(model.buffers) - 1, name
    t.type = {np.float32: 0, np.int32: 2}[dtype]
    model.subgraphs[0].tensors.append(t)
    return len(model.subgraphs[0].tensors) - 1


def new_activation(model: Any, like: int, name: str) -> int:
    """Append an activation tensor shaped and typed like tensor ``like``; return its index."""
    from tensorflow.lite.python import schema_py_generated as schema

    src = model.subgraphs[0].tensors[like]
    t = schema.TensorT()
    t.shape, t.type, t.name = copy.deepcopy(src.shape), src.type, name
    t.shapeSignature = copy.deepcopy(src.shapeSignature)
    t.buffer = 0
    model.subgraphs[0].tensors.append(t)
    return len(model.subgraphs[0].tensors) - 1


def new_op(model: Any, name: str, inputs: list[int], outputs: list[int], options: tuple[int, Any] | None = None) -> Any:
    from tensorflow.lite.python import schema_py_generated as schema

    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode_index(model, name), list(inputs), list(outputs)
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options
    return op


def bypass(model: Any, op: Any) -> bool:
    """Drop an op whose output equals its first input; its readers read that input. False when not possible."""
    sg = model.subgraphs[0]
    out, src = op.outputs[0], op.inputs[0]
    if out in sg.outputs:
        return False  # the signature names this tensor: keep it
    for other in sg.operators:
        other.inputs = [src if i == out else i for i in other.inputs]
    sg.operators.remove(op)
    return True


# ----------------------------------------------------------------------------- clean-ups
@cleanup("identity_gather")
def drop_identity_gathers(model: Any) -> int:
    """``GATHER(x, [0, 1, ..., n-1], axis)`` over a whole axis of size n is ``x`` (or a reshape of it).

    onnx2tf leaves these after layout changes (every squeeze-excite block of a torch
    MobileNetV3 reads one, a ConvNeXt's head another, with the indices shaped
    ``[1, n, 1, 1]``); XNNPACK has no GATHER, so each costs a partition break. 1-D
    indices make the op an identity; other shapes on a 1-D ``x`` make it a RESHAPE.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    sg = model.subgraphs[0]
    changed = 0
    for op in ops_of(model, "GATHER"):
        indices = constant(model, op.inputs[1])
        x = sg.tensors[op.inputs[0]]
        if indices is None or x.shape is None or not len(x.shape):
            continue
        axis = int(getattr(op.builtinOptions, "axis", 0) or 0) % len(x.shape)
        if indices.size != int(x.shape[axis]) or not np.array_equal(indices.reshape(-1), np.arange(indices.size)):
            continue
        if indices.ndim == 1:
            changed += bypass(model, op)
        elif len(x.shape) == 1:
            shape = new_constant(model, np.array(indices.shape), f"{tensor_name(x)}/edgeship_shape", np.int32)
            options = schema.ReshapeOptionsT()
            options.newShape = [int(d) for d in indices.shape]
            sg.operators[sg.operators.index(op)] = new_op(model, "RESHAPE", [op.inputs[0], shape], op.outputs,
                                                          (schema.BuiltinOptions.ReshapeOptions, options))
            changed += 1
    return changed


@cleanup("relu_0_to_1_as_relu6")
def relu_0_to_1_as_relu6(model: Any) -> int:
    """``RELU_0_TO_1(x)`` (a hard sigmoid) becomes ``MUL(RELU6(MUL(x, 6)), 1/6)``.

    XNNPACK runs neither float nor int8 RELU_0_TO_1; it runs MUL and RELU6 in both. The
    hard sigmoids of squeeze-excite blocks act on ``[1, 1, 1, C]`` vectors: two tiny MULs
    cost far less than the partition break.
    """
    from tensorflow.lite.python import schema_py_generated as schema

    sg = model.subgraphs[0]
    changed = 0
    for op in ops_of(model, "RELU_0_TO_1"):
        if sg.tensors[op.inputs[0]].type != 0:
            continue  # float graphs only; quantized ones are made from the float graph
        x, y = op.inputs[0], op.outputs[0]
        base = tensor_name(sg.tensors[y])
        six = new_constant(model, np.array(6.0), f"{base}/edgeship_six")
        sixth = new_constant(model, np.array(1.0 / 6.0), f"{base}/edgeship_sixth")
        scaled, clipped = new_activation(model, x, f"{base}/edgeship_x6"), new_activation(model, x, f"{base}/edgeship_relu6")
        mul = (schema.BuiltinOptions.MulOptions, schema.MulOptionsT())
        at = sg.operators.index(op)
        sg.operators[at:at + 1] = [new_op(model, "MUL", [x, six], [scaled], mul),
                                   new_op(model, "RELU6", [scaled], [clipped]),
                                   new_op(model, "MUL", [clipped, sixth], [y], copy.deepcopy(mul))]
        changed += 1
    return changed
