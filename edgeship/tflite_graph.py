"""Edit TFLite flatbuffers, and the clean-ups that keep converted graphs whole inside XNNPACK.

onnx2tf leaves ops behind for torch exports that XNNPACK cannot take, and every such op
splits the delegate into another partition with copies at each boundary. The clean-ups
here rewrite them into ops XNNPACK runs, on the float TFLite right after onnx2tf; the
convert stage then verifies the result against onnxruntime as it does any conversion.
The editing helpers work on TensorFlow Lite's flatbuffer object API (pure Python); quantize's
rewrites edit models through them too.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
from typing import Any, Callable

import numpy as np

from edgeship._deps import require
from edgeship.runtime.native_stderr import native_stderr_to_log

#: name -> clean-up(model object) -> number of places changed.
CLEANUPS: dict[str, Callable[[Any], int]] = {}

_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8, 7: np.int16}


def cleanup(name: str) -> Callable[[Callable[[Any], int]], Callable[[Any], int]]:
    def register(fn: Callable[[Any], int]) -> Callable[[Any], int]:
        CLEANUPS[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- editing helpers
@functools.lru_cache(maxsize=1)
def _import_tensorflow() -> None:
    """Import TensorFlow once, its native start-up lines (CUDA probes, oneDNN notes) sent to the debug log.

    They are not errors, and on a terminal they bury the one line a failed command prints.
    """
    with native_stderr_to_log(logging.DEBUG):
        require("tensorflow", purpose="read and edit TFLite models")


def _fbu() -> Any:
    """TensorFlow Lite's flatbuffer helpers."""
    _import_tensorflow()
    from tensorflow.lite.tools import flatbuffer_utils  # heavy optional dependency: deferred

    return flatbuffer_utils


def _schema() -> Any:
    """TensorFlow Lite's generated flatbuffer schema (the object API)."""
    _import_tensorflow()
    from tensorflow.lite.python import schema_py_generated  # heavy optional dependency: deferred

    return schema_py_generated


def read(model: bytes) -> Any:
    fbu = _fbu()

    return fbu.read_model_from_bytearray(bytearray(model))


def write(model: Any) -> bytes:
    """Serialise, dropping operator codes no op uses any more (an interpreter registers every listed one)."""
    fbu = _fbu()

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
    schema = _schema()

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
    schema = _schema()

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def custom_ops(model: bytes) -> dict[str, int]:
    """Ops outside TFLite's builtin set, over every subgraph: custom op name -> count, most frequent first.

    TensorFlow Select ops are custom ops named ``Flex<TF op>`` (``FlexErf``); the on-device
    interpreters (ai-edge-litert, tflite-runtime) have neither those nor any other custom op.
    """
    obj = read(model)
    custom = opcode("CUSTOM")
    names: list[str] = []
    for sg in obj.subgraphs:
        for op in sg.operators:
            entry = obj.operatorCodes[op.opcodeIndex]
            if _code(entry) == custom:
                code = entry.customCode
                names.append(code.decode() if isinstance(code, bytes) else str(code or "?"))
    return dict(collections.Counter(names).most_common())


def dtype_name(tensor: Any) -> str:
    """A tensor's element type as a numpy dtype name (``int8``...), ``other`` when unknown here."""
    return np.dtype(_DTYPES[tensor.type]).name if tensor.type in _DTYPES else "other"


def ops_of(model: Any, name: str) -> list[Any]:
    code = opcode(name)
    return [op for op in model.subgraphs[0].operators if op_type(model, op) == code]


def opcode_index(model: Any, name: str) -> int:
    """Index of builtin op ``name`` in the model's operator codes (added when missing)."""
    schema = _schema()

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
    schema = _schema()

    value = np.asarray(value, dtype=dtype)
    buf = schema.BufferT()
    buf.data = np.frombuffer(value.tobytes(), dtype=np.uint8)
    model.buffers.append(buf)
    t = schema.TensorT()
    t.shape, t.buffer, t.name = np.array(value.shape, dtype=np.int32), len(model.buffers) - 1, name
    t.type = {np.dtype(np.float32): 0, np.dtype(np.int32): 2}[np.dtype(dtype)]
    model.subgraphs[0].tensors.append(t)
    return len(model.subgraphs[0].tensors) - 1


def new_activation(model: Any, like: int, name: str) -> int:
    """Append an activation tensor shaped and typed like tensor ``like``; return its index."""
    schema = _schema()

    src = model.subgraphs[0].tensors[like]
    t = schema.TensorT()
    t.shape, t.type, t.name = copy.deepcopy(src.shape), src.type, name
    t.shapeSignature = copy.deepcopy(src.shapeSignature)
    t.buffer = 0
    model.subgraphs[0].tensors.append(t)
    return len(model.subgraphs[0].tensors) - 1


def new_op(model: Any, name: str, inputs: list[int], outputs: list[int], options: tuple[int, Any] | None = None) -> Any:
    schema = _schema()

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
    schema = _schema()

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
            sg.operators[sg.operators.index(op)] = new_op(
                model, "RESHAPE", [op.inputs[0], shape], op.outputs, (schema.BuiltinOptions.ReshapeOptions, options)
            )
            changed += 1
    return changed


@cleanup("relu_0_to_1_as_relu6")
def relu_0_to_1_as_relu6(model: Any) -> int:
    """``RELU_0_TO_1(x)`` (a hard sigmoid) becomes ``MUL(RELU6(MUL(x, 6)), 1/6)``.

    XNNPACK runs neither float nor int8 RELU_0_TO_1; it runs MUL and RELU6 in both. The
    hard sigmoids of squeeze-excite blocks act on ``[1, 1, 1, C]`` vectors: two tiny MULs
    cost far less than the partition break.
    """
    schema = _schema()

    sg = model.subgraphs[0]
    changed = 0
    for op in ops_of(model, "RELU_0_TO_1"):
        if sg.tensors[op.inputs[0]].type != 0:
            continue  # float graphs only; quantized ones are made from the float graph
        x, y = op.inputs[0], op.outputs[0]
        base = tensor_name(sg.tensors[y])
        six = new_constant(model, np.array(6.0), f"{base}/edgeship_six")
        sixth = new_constant(model, np.array(1.0 / 6.0), f"{base}/edgeship_sixth")
        scaled = new_activation(model, x, f"{base}/edgeship_x6")
        clipped = new_activation(model, x, f"{base}/edgeship_relu6")
        mul = (schema.BuiltinOptions.MulOptions, schema.MulOptionsT())
        at = sg.operators.index(op)
        sg.operators[at : at + 1] = [
            new_op(model, "MUL", [x, six], [scaled], mul),
            new_op(model, "RELU6", [scaled], [clipped]),
            new_op(model, "MUL", [clipped, sixth], [y], copy.deepcopy(mul)),
        ]
        changed += 1
    return changed


@cleanup("constant_gather_as_slice")
def constant_gathers_as_slices(model: Any) -> int:
    """``GATHER(x, k)`` or ``GATHER(x, [k, ..., k+n-1])`` on one axis becomes a SLICE (+ RESHAPE).

    A ViT reads its class token as ``x[:, 0]``, which onnx2tf writes as a GATHER with the
    scalar index 0 right before the classifier; XNNPACK has no GATHER, so the classifier
    ran in a second partition. A scalar index drops the axis: SLICE of size 1 on it, then
    a RESHAPE to the GATHER's output shape. A run of consecutive indices is a SLICE alone.
    Identity GATHERs are ``identity_gather``'s (registered first).
    """
    schema = _schema()

    sg = model.subgraphs[0]
    changed = 0
    for op in ops_of(model, "GATHER"):
        indices, x = constant(model, op.inputs[1]), sg.tensors[op.inputs[0]]
        if indices is None or indices.ndim > 1 or x.shape is None or not len(x.shape) or min(x.shape) < 1:
            continue
        if x.type != 0 or int(getattr(op.builtinOptions, "batchDims", 0) or 0) or _dynamic(x):
            continue  # float graphs only (quantized ones are made from them); static shapes only
        shape = [int(d) for d in x.shape]
        axis = int(getattr(op.builtinOptions, "axis", 0) or 0) % len(shape)
        flat = indices.reshape(-1).astype(np.int64)
        if not flat.size or np.any(flat < 0) or np.any(flat >= shape[axis]):
            continue  # TFLite's GATHER fails on these: keep that behaviour
        if not np.array_equal(flat, flat[0] + np.arange(flat.size)):
            continue
        begin, size = [0] * len(shape), list(shape)
        begin[axis], size[axis] = int(flat[0]), int(flat.size)
        base = tensor_name(sg.tensors[op.outputs[0]])
        sliced = op.outputs[0] if indices.ndim == 1 else new_activation(model, op.inputs[0], f"{base}/edgeship_slice")
        if sliced != op.outputs[0]:
            sg.tensors[sliced].shape = np.array(size, dtype=np.int32)
            sg.tensors[sliced].shapeSignature = None
        at = sg.operators.index(op)
        bounds = [
            new_constant(model, np.array(v), f"{base}/edgeship_{k}", np.int32)
            for k, v in (("begin", begin), ("size", size))
        ]
        new = [
            new_op(
                model,
                "SLICE",
                [op.inputs[0], *bounds],
                [sliced],
                (schema.BuiltinOptions.SliceOptions, schema.SliceOptionsT()),
            )
        ]
        if indices.ndim == 0:
            options = schema.ReshapeOptionsT()
            options.newShape = [int(d) for d in sg.tensors[op.outputs[0]].shape]
            target = new_constant(model, np.array(options.newShape), f"{base}/edgeship_shape", np.int32)
            new.append(
                new_op(model, "RESHAPE", [sliced, target], op.outputs, (schema.BuiltinOptions.ReshapeOptions, options))
            )
        sg.operators[at : at + 1] = new
        changed += 1
    return changed


def _dynamic(tensor: Any) -> bool:
    """Whether a tensor's signature has an unknown dimension (its static shape is then a placeholder)."""
    sig = tensor.shapeSignature
    return sig is not None and len(sig) > 0 and any(int(d) < 0 for d in sig)


@cleanup("grouped_conv_as_depthwise")
def grouped_convs_as_depthwise(model: Any) -> int:
    """A CONV_2D with one input channel per group (filter ``[C*m, kh, kw, 1]`` on C channels) is depthwise.

    onnx2tf writes most of a torch ConvNeXt's 7x7 depthwise convs (``Conv`` with
    ``group=C``) this way; XNNPACK runs them as C one-channel convolutions, far slower
    than its depthwise kernels, in float and more so in int8. The same sums as a
    DEPTHWISE_CONV_2D with depth multiplier m and the filter as ``[1, kh, kw, C*m]``.
    """
    schema = _schema()

    sg = model.subgraphs[0]
    changed = 0
    for op in ops_of(model, "CONV_2D"):
        x, w = sg.tensors[op.inputs[0]], sg.tensors[op.inputs[1]]
        weights = constant(model, op.inputs[1])
        if weights is None or w.type != 0 or weights.ndim != 4 or weights.shape[3] != 1 or x.shape is None:
            continue  # float filters only (quantized models are made from the float graph)
        channels, out = int(x.shape[-1]), int(weights.shape[0])
        if channels < 2 or out % channels or _readers(sg, op.inputs[1]) != 1:
            continue
        conv = op.builtinOptions
        options = schema.DepthwiseConv2DOptionsT()
        options.padding, options.strideW, options.strideH = conv.padding, conv.strideW, conv.strideH
        options.dilationWFactor, options.dilationHFactor = conv.dilationWFactor, conv.dilationHFactor
        options.fusedActivationFunction, options.depthMultiplier = conv.fusedActivationFunction, out // channels
        depthwise = np.ascontiguousarray(weights.transpose(3, 1, 2, 0))
        model.buffers[w.buffer].data = np.frombuffer(depthwise.tobytes(), dtype=np.uint8)
        w.shape = np.array(depthwise.shape, dtype=np.int32)
        w.shapeSignature = None
        sg.operators[sg.operators.index(op)] = new_op(
            model, "DEPTHWISE_CONV_2D", op.inputs, op.outputs, (schema.BuiltinOptions.DepthwiseConv2DOptions, options)
        )
        changed += 1
    return changed


def _readers(sg: Any, tensor: int) -> int:
    return sum(tensor in op.inputs for op in sg.operators)


#: Fused activations whose output is >= 0 (RELU, RELU6).
_NON_NEGATIVE_FUSED = (1, 3)


@cleanup("max_pool_pad_after_relu")
def max_pool_pads_after_relu(model: Any) -> int:
    """``PADV2(x, pads, -inf or -FLT_MAX)`` before MAX_POOL_2D becomes a zero PAD when ``x >= 0``.

    torch's padded max-pool (ResNet's stem) reaches TFLite as PADV2 with the lowest float;
    XNNPACK leaves it outside, a second partition. After a ReLU every window's maximum is
    >= 0 and every window holds at least one real value (pads < pool size), so padding
    with 0 gives the same maxima, and a zero PAD runs inside XNNPACK.
    """
    sg = model.subgraphs[0]
    changed = 0
    producers = {o: op for op in sg.operators for o in op.outputs}
    for op in ops_of(model, "PADV2"):
        value = constant(model, op.inputs[2]) if len(op.inputs) > 2 else None
        pads = constant(model, op.inputs[1])
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) > -3.0e38 or pads is None:
            continue
        readers = [o for o in sg.operators if op.outputs[0] in o.inputs]
        if op.outputs[0] in sg.outputs or not readers or any(op_name(model, r) != "MAX_POOL_2D" for r in readers):
            continue
        if any(
            int(pads.reshape(-1, 2)[1:3].max()) >= min(r.builtinOptions.filterHeight, r.builtinOptions.filterWidth)
            for r in readers
        ):
            continue  # a window of padding only would read 0 instead of -inf
        if not _non_negative(model, producers.get(op.inputs[0])):
            continue
        op.inputs = op.inputs[:2]
        op.opcodeIndex = opcode_index(model, "PAD")
        op.builtinOptionsType, op.builtinOptions = 0, None
        changed += 1
    return changed


def _non_negative(model: Any, producer: Any) -> bool:
    """Whether an op's output is >= 0 by construction (RELU, RELU6, or a fused RELU/RELU6)."""
    if producer is None:
        return False
    if op_name(model, producer) in ("RELU", "RELU6"):
        return True
    return int(getattr(producer.builtinOptions, "fusedActivationFunction", 0) or 0) in _NON_NEGATIVE_FUSED
