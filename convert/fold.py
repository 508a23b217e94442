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
from edgeship.runtime.card import Preprocessing

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


def fold_input_affine(model: Any, input_name: str, prep: Preprocessing, channels: int
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
    new_prep = replace(prep, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    ops = "+".join(n.op_type for n in removed)
    note = (f"leading {ops} on the input folded into preprocessing: mean {_fmt(prep.mean)} -> {_fmt(new_prep.mean)}, "
            f"std {_fmt(prep.std)} -> {_fmt(new_prep.std)}")
    return m, new_prep, [note]


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ",".join(f"{v:.4g}" for v in values) + "]"
