"""Fold a model's leading per-channel affine ops into its preprocessing.

Many exported classifiers start with ``Mul``/``Add``/``Sub``/``Div`` by constants on the
input (a normalisation baked into the graph). Preprocessing is already an affine map per
channel, so the two compose exactly into one: the ops are removed and the model card's
mean/std absorb them. The model then has fewer ops, and an int8 model quantizes its
input once instead of re-quantizing it through each elementwise op.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from edgeship._deps import require
from edgeship.runtime.card import Preprocessing, simple_value

_FOLDABLE = ("Mul", "Add", "Sub", "Div")


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """The constant as ``channels`` values if it broadcasts per channel on NCHW, else None."""
    v = np.asarray(value, dtype=np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(-1)[0]))
    if v.ndim < 3 or v.size != channels:
        return None
    if v.shape[-3] != channels or any(d != 1 for i, d in enumerate(v.shape) if i != v.ndim - 3):
        return None
    return v.reshape(-1)


def fold_input_affine(
    model: Any, input_name: str, prep: Preprocessing, channels: int
) -> tuple[Any, Preprocessing, list[str]]:
    """Remove leading affine ops on ``input_name`` and return the adjusted preprocessing.

    Returns the (copied) model, the new preprocessing and notes; the model is returned
    unchanged when nothing can be folded.
    """
    onnx = require("onnx")
    consts = _constants(model)
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    mean = np.array(prep.mean if len(prep.mean) == channels else prep.mean * channels, dtype=np.float64)
    std = np.array(prep.std if len(prep.std) == channels else prep.std * channels, dtype=np.float64)
    removed: list[Any] = []
    tensor = input_name
    while len(consumers.get(tensor, [])) == 1 and tensor not in graph_outputs:
        node = consumers[tensor][0]
        if node.op_type not in _FOLDABLE or len(node.input) != 2 or node.input[0] != tensor:
            break
        const = consts.get(node.input[1])
        values = _per_channel(const, channels) if const is not None else None
        if values is None or (node.op_type in ("Mul", "Div") and np.any(values == 0)):
            break
        # y = (p*ps - mean) / std  composed with the op, written back in the same form.
        if node.op_type == "Mul":
            std = std / values
        elif node.op_type == "Div":
            std = std * values
        elif node.op_type == "Add":
            mean = mean - values * std
        else:  # Sub
            mean = mean + values * std
        removed.append(node)
        tensor = node.output[0]
    if not removed:
        return model, prep, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    drop = {id_ for id_ in (n.output[0] for n in removed)}
    keep = [n for n in m.graph.node if not (n.output and n.output[0] in drop)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = input_name
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {name for n in keep for name in n.input}
    unused = [t for t in m.graph.initializer if t.name not in used]
    for t in unused:
        m.graph.initializer.remove(t)
    new_prep = replace(prep, mean=tuple(simple_value(v) for v in mean), std=tuple(simple_value(v) for v in std))
    ops = "+".join(n.op_type for n in removed)
    note = (
        f"leading {ops} on the input folded into preprocessing: mean {_fmt(prep.mean)} -> {_fmt(new_prep.mean)}, "
        f"std {_fmt(prep.std)} -> {_fmt(new_prep.std)}"
    )
    return m, new_prep, [note]


def per_tensor(prep: Preprocessing) -> bool:
    """Whether the normalisation is one mean and one std for all channels (what clients express)."""
    return len(set(prep.mean)) == 1 and len(set(prep.std)) == 1


def normalization_into_graph(
    model: Any, input_name: str, prep: Preprocessing, channels: int
) -> tuple[Any, Preprocessing, list[str]]:
    """Put a per-channel normalisation inside the graph so the model takes 0..255 pixels.

    Clients such as MediaPipe Tasks express only one mean/std for all channels. The
    cheaper exact form is used: when the input feeds one ``Conv`` only, a per-channel
    ``Sub`` of the mean (in pixel units) and the ``1/std`` scale folded into that conv's
    weights (exact: the conv's zero padding still pads the normalised image with zeros);
    otherwise ``Mul`` + ``Add``. Returns the model unchanged when the normalisation is
    per-tensor already.
    """
    onnx = require("onnx")

    if per_tensor(prep) or len(prep.mean) != channels:
        return model, prep, []
    scale = prep.pixel_scale / np.asarray(prep.std, dtype=np.float64)  # x_norm = (p - m_pix) * scale
    m_pix = np.asarray(prep.mean, dtype=np.float64) / prep.pixel_scale
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consumers = [n for n in m.graph.node if input_name in n.input]
    centred = f"{input_name}__centred"
    nodes = _sub_into_conv(m, consumers, input_name, centred, m_pix, scale)
    form = "Sub of the mean in pixel units + 1/std folded into the first Conv's weights"
    if nodes is None:
        nodes, form = _mul_add(m, input_name, centred, m_pix, scale), "Mul + Add"
    for node in consumers:
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = centred
    old = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes + old)
    new_prep = replace(prep, pixel_scale=1.0, mean=(0.0,), std=(1.0,))
    note = (
        f"per-channel normalisation folded into the graph ({form}): the model takes 0..255 pixels; "
        f"was mean {_fmt(prep.mean)}, std {_fmt(prep.std)} after pixel_scale {prep.pixel_scale:.6g}"
    )
    return m, new_prep, [note]


def _sub_into_conv(
    m: Any, consumers: list[Any], input_name: str, out: str, m_pix: np.ndarray, scale: np.ndarray
) -> list[Any] | None:
    """``Sub`` node of the pixel mean, with ``scale`` folded into the lone consumer conv's weights.

    None if the consumer is not a conv.
    """
    from onnx import helper, numpy_helper

    conv = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "Conv" else None
    if conv is None or conv.input[0] != input_name or any(a.name == "group" and a.i != 1 for a in conv.attribute):
        return None
    weight = next((t for t in m.graph.initializer if t.name == conv.input[1]), None)
    if (
        weight is None
        or sum(i == weight.name for n in m.graph.node for i in n.input) != 1
        or weight.name in {o.name for o in m.graph.output}
    ):
        return None
    w = numpy_helper.to_array(weight).astype(np.float64) * scale.reshape(1, -1, 1, 1)
    weight.CopyFrom(numpy_helper.from_array(w.astype(np.float32), weight.name))
    mean_name = f"{input_name}__mean_px"
    m.graph.initializer.append(numpy_helper.from_array(m_pix.reshape(1, -1, 1, 1).astype(np.float32), mean_name))
    return [helper.make_node("Sub", [input_name, mean_name], [out], name=f"{input_name}__normalize")]


def _mul_add(m: Any, input_name: str, out: str, m_pix: np.ndarray, scale: np.ndarray) -> list[Any]:
    from onnx import helper, numpy_helper

    k, b = f"{input_name}__scale", f"{input_name}__shift"
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(scale.reshape(1, -1, 1, 1).astype(np.float32), k),
            numpy_helper.from_array((-m_pix * scale).reshape(1, -1, 1, 1).astype(np.float32), b),
        ]
    )
    return [
        helper.make_node("Mul", [input_name, k], [f"{input_name}__scaled"], name=f"{input_name}__normalize_mul"),
        helper.make_node("Add", [f"{input_name}__scaled", b], [out], name=f"{input_name}__normalize_add"),
    ]


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ",".join(f"{v:.4g}" for v in values) + "]"
