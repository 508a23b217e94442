"""A quantized model's interface rewritten: the same int8 model with uint8 input and output.

What TFLite's ``modify_model_interface`` does for a uint8 interface: a QUANTIZE op at each
end requantizes between the uint8 tensor the app feeds or reads and the int8 tensor the
model computes with. Both sides share the scale and the uint8 zero point is the int8 one
plus 128, so every value maps to exactly one value: the rewrite is exact, and a target
that needs uint8 I/O gets the calibrated int8 model, not a second calibration. Float logits
(:mod:`edgeship.quantize.logits`) stay float: only the input is rewritten then.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeship import tflite_graph as g
from edgeship.errors import InputError

#: I/O dtypes an int8-interface model can be rewritten to exactly.
EXACT = ("int8", "uint8")
_UINT8 = 3  # TFLite's TensorType.UINT8
_INT8 = 9
_FLOAT32 = 0


def with_io_dtype(model: bytes, io_dtype: str) -> bytes:
    """``model`` (int8 input, int8 or float output) with ``io_dtype`` input and output; unchanged for ``int8``.

    Raises:
        InputError: ``io_dtype`` is not one the rewrite keeps exact, or the model's interface is not int8.
    """
    if io_dtype not in EXACT:
        raise InputError(f"an int8 model's interface can be rewritten to {' or '.join(EXACT)}, not {io_dtype}")
    if io_dtype == "int8":
        return model
    obj = g.read(model)
    sg = obj.subgraphs[0]
    if len(sg.inputs) != 1 or len(sg.outputs) != 1:
        raise InputError(f"interface rewrite needs one input and one output, not {len(sg.inputs)}/{len(sg.outputs)}")
    for index, allowed in ((sg.inputs[0], (_INT8,)), (sg.outputs[0], (_INT8, _FLOAT32))):
        if sg.tensors[index].type not in allowed:
            raise InputError(
                f"interface rewrite needs an int8 model; tensor {g.tensor_name(sg.tensors[index])} is "
                f"{g.dtype_name(sg.tensors[index])}"
            )
    _uint8_input(obj)
    if sg.tensors[sg.outputs[0]].type == _INT8:  # float logits (edgeship.quantize.logits) stay float
        _uint8_output(obj)
    return g.write(obj)


def _uint8_input(model: Any) -> None:
    """The input tensor becomes uint8; a QUANTIZE op feeds a new int8 copy to every op that read it."""
    sg = model.subgraphs[0]
    outer = sg.inputs[0]
    inner = g.new_activation(model, outer, "tfl.quantize")
    sg.tensors[inner].quantization = _copy_quantization(sg.tensors[outer].quantization)
    for op in sg.operators:
        op.inputs = [inner if i == outer else i for i in op.inputs]
    _to_uint8(sg.tensors[outer])
    sg.operators.insert(0, g.new_op(model, "QUANTIZE", [outer], [inner]))


def _uint8_output(model: Any) -> None:
    """A QUANTIZE op writes the int8 output to a new uint8 tensor, which takes over the output's name."""
    sg = model.subgraphs[0]
    inner = sg.outputs[0]
    outer = g.new_activation(model, inner, g.tensor_name(sg.tensors[inner]))
    sg.tensors[inner].name = f"{g.tensor_name(sg.tensors[inner])}/int8"
    sg.tensors[outer].quantization = _copy_quantization(sg.tensors[inner].quantization)
    _to_uint8(sg.tensors[outer])
    sg.operators.append(g.new_op(model, "QUANTIZE", [inner], [outer]))
    sg.outputs = [outer]
    for sig in model.signatureDefs or []:
        for entry in sig.outputs or []:
            if entry.tensorIndex == inner:
                entry.tensorIndex = outer


def _to_uint8(tensor: Any) -> None:
    tensor.type = _UINT8
    q = tensor.quantization
    q.zeroPoint = (np.asarray(q.zeroPoint, dtype=np.int64) + 128).astype(np.int64)


def _copy_quantization(q: Any) -> Any:
    from tensorflow.lite.python import schema_py_generated as schema

    copy = schema.QuantizationParametersT()
    for field in ("min", "max", "scale", "zeroPoint"):
        value = getattr(q, field)
        setattr(copy, field, None if value is None else np.array(value))
    copy.quantizedDimension = q.quantizedDimension
    return copy
