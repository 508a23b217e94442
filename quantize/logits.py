"""Float logits: the layer producing the scores computes them in float from its int8 input and weights.

A full-integer model's scores come out on the int8 grid of the output tensor: 256 levels over
the whole range of the logits. Two classes whose float scores are closer than one step land on
the same level, or swap, however exact the rest of the model is, and the top-1 is then decided by
the index order. Here the last weighted op (a ``FULLY_CONNECTED``, or the 1x1 ``CONV_2D`` of
models exported from TensorFlow) reads its int8 input and int8 per-channel weights through
``DEQUANTIZE`` and writes float scores: the same int8 numbers, no output grid. The ops between it
and the output that only reshape, slice or normalise (``RESHAPE``, ``SQUEEZE``, ``STRIDED_SLICE``,
``SOFTMAX``) compute in float too; a ``DEQUANTIZE``/``QUANTIZE`` that ended the graph is dropped,
so the model's output is float32. XNNPACK runs the ``DEQUANTIZE`` of the constant weights once and
keeps the whole graph in one partition; the weights stay int8 in the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeship import tflite_graph as g

#: Ops between the scores' producer and the model output that also compute in float.
_PASSING = ("RESHAPE", "SQUEEZE", "STRIDED_SLICE", "SOFTMAX")
#: Interface ops at the end of the graph, dropped when the output becomes float.
_INTERFACE = ("DEQUANTIZE", "QUANTIZE")
_HEADS = ("FULLY_CONNECTED", "CONV_2D")
_FLOAT32, _INT32, _INT8 = 0, 2, 9


def float_logits(model: bytes) -> tuple[bytes, str | None]:
    """``model`` with float logits, and the name of the op's output tensor (None: unchanged, no such head)."""
    obj = g.read(model)
    chain = _tail(obj)
    if chain is None:
        return model, None
    head = chain[-1]
    name = g.tensor_name(obj.subgraphs[0].tensors[head.outputs[0]])
    _float_head(obj, head)
    for op in chain:
        _to_float(obj.subgraphs[0].tensors[op.outputs[0]])
    _drop_interface(obj)
    return g.write(obj), name


def _tail(obj: Any) -> list[Any] | None:
    """The ops from the output back to an int8 head with int8 weights and an int32 bias (head last)."""
    sg = obj.subgraphs[0]
    if len(sg.outputs) != 1:
        return None
    producer = {o: op for op in sg.operators for o in op.outputs}
    tensor, chain = sg.outputs[0], list[Any]()
    while tensor in producer:
        op = producer[tensor]
        kind = g.op_name(obj, op)
        if kind in _HEADS:
            return [*chain, op] if _integer_head(sg, op) else None
        if kind not in _PASSING + _INTERFACE or (kind in _INTERFACE and chain):
            return None
        if kind in _PASSING:
            chain.append(op)
        tensor = op.inputs[0]
    return None


def _integer_head(sg: Any, op: Any) -> bool:
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        return False
    x, w, b = (sg.tensors[i] for i in op.inputs[:3])
    return x.type == _INT8 and w.type == _INT8 and b.type == _INT32 and sg.tensors[op.outputs[0]].type == _INT8


def _float_head(obj: Any, head: Any) -> None:
    """``head`` reads its input and weights through DEQUANTIZE and adds a float bias."""
    sg = obj.subgraphs[0]
    x, w, b = head.inputs[:3]
    input_scale = float(sg.tensors[x].quantization.scale[0])
    weight_scales = np.asarray(sg.tensors[w].quantization.scale, dtype=np.float64)
    bias = g.constant(obj, b)
    assert bias is not None  # _integer_head: an int32 constant
    float_bias = g.new_constant(obj, bias.astype(np.float64) * input_scale * weight_scales, f"{_name(sg, b)}/float")
    float_x, float_w = (_float_copy(obj, i) for i in (x, w))
    at = sg.operators.index(head)
    sg.operators[at:at] = [g.new_op(obj, "DEQUANTIZE", [x], [float_x]), g.new_op(obj, "DEQUANTIZE", [w], [float_w])]
    head.inputs = [float_x, float_w, float_bias, *head.inputs[3:]]


def _float_copy(obj: Any, index: int) -> int:
    copy = g.new_activation(obj, index, f"{_name(obj.subgraphs[0], index)}/float")
    _to_float(obj.subgraphs[0].tensors[copy])
    return copy


def _drop_interface(obj: Any) -> None:
    """A DEQUANTIZE/QUANTIZE writing the model output now reads float: its input takes the output's place."""
    sg = obj.subgraphs[0]
    out = sg.outputs[0]
    op = next(op for op in sg.operators if out in op.outputs)
    if g.op_name(obj, op) not in _INTERFACE:
        return
    src = op.inputs[0]
    producer = next(p for p in sg.operators if src in p.outputs)
    producer.outputs = [out if o == src else o for o in producer.outputs]
    sg.operators.remove(op)
    _to_float(sg.tensors[out])


def _to_float(tensor: Any) -> None:
    tensor.type, tensor.quantization = _FLOAT32, None


def _name(sg: Any, index: int) -> str:
    return g.tensor_name(sg.tensors[index])
