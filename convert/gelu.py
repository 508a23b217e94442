"""Fuse the exact-erf GELU that torch's TorchScript exporter writes into one ``Gelu`` node.

Below opset 20 ONNX has no ``Gelu``, so exporters spell it out:
``0.5 * x * (1 + Erf(x / sqrt(2)))`` as ``Div -> Erf -> Add -> Mul -> Mul`` (or the same
product in another order, or with ``Mul`` by ``1/sqrt(2)``). onnx2tf turns that ``Erf``
into a TensorFlow Select op (``FlexErf``), which the on-device interpreters do not have,
and each one also splits the graph out of XNNPACK. A ``Gelu`` node, by contrast, becomes
TFLite's builtin ``GELU`` (exact, not the tanh approximation), which XNNPACK runs.

``Gelu`` exists from opset 20, so an older model is moved to opset 20 first (ONNX's
version converter); onnxruntime runs the result, so the checks that follow still apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeship._deps import require

#: ONNX domain and opset where ``Gelu`` (exact by default) exists.
ONNX_GELU_OPSET = 20
#: How far (relative) an exported constant may be from sqrt(2), 1/sqrt(2), 1 or 0.5: a few float32 ulps.
_REL_TOL = 1e-6


@dataclass(frozen=True)
class GeluMatch:
    """One spelled-out GELU: ``y = gelu(x)`` computed by ``nodes``."""

    x: str
    y: str
    nodes: tuple[Any, ...]


class _Graph:
    """Producers, consumers and constants of a graph's top level."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        # Only one-element constants can be GELU's; the weights are not read.
        tensors = [(t.name, t) for t in graph.initializer]
        tensors += [
            (n.output[0], n.attribute[0].t)
            for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        ]
        self.consts = {name: numpy_helper.to_array(t) for name, t in tensors if math.prod(t.dims) == 1}

    def sole_consumer(self, tensor: str, op_type: str) -> Any | None:
        """The one node reading ``tensor`` if it is an ``op_type`` and nothing else (no graph output) reads it."""
        readers = self.consumers.get(tensor, [])
        if len(readers) != 1 or tensor in self.outputs or readers[0].op_type != op_type:
            return None
        return readers[0]

    def is_scalar(self, tensor: str, value: float) -> bool:
        """Whether ``tensor`` is a one-element float constant equal to ``value`` (within float32 rounding)."""
        c = self.consts.get(tensor)
        if c is None or c.size != 1 or c.ndim > 1 or c.dtype.kind != "f":
            return False
        return abs(float(c.reshape(-1)[0]) - value) <= _REL_TOL * abs(value)

    def other_input(self, node: Any, value: float) -> str | None:
        """For a two-input ``Mul``: the input that is not the constant ``value`` (None if neither is)."""
        if len(node.input) != 2:
            return None
        for i in (0, 1):
            if self.is_scalar(node.input[i], value):
                return node.input[1 - i]
        return None

    def scaled(self, node: Any | None, by: float) -> str | None:
        """The ``t`` of a node computing ``t * by`` (``Mul`` by ``by`` or ``Div`` by ``1/by``), else None."""
        if node is None or len(node.input) != 2:
            return None
        if node.op_type == "Mul":
            return self.other_input(node, by)
        if node.op_type == "Div" and self.is_scalar(node.input[1], 1.0 / by):
            return node.input[0]
        return None


def find_gelus(model: Any) -> list[GeluMatch]:
    """Every exact-erf GELU spelled out in the top-level graph (each ``Erf`` used in at most one)."""
    g = _Graph(model.graph)
    found = (_match(g, node) for node in model.graph.node if node.op_type == "Erf")
    return [m for m in found if m is not None]


def _match(g: _Graph, erf: Any) -> GeluMatch | None:
    """The GELU around ``erf``: ``x/sqrt2 -> Erf -> +1 -> product with x and 0.5`` in any grouping."""
    pre = g.producer.get(erf.input[0])
    x = g.scaled(pre, 1.0 / math.sqrt(2.0))
    if x is None or g.sole_consumer(erf.input[0], "Erf") is None:
        return None
    plus = g.sole_consumer(erf.output[0], "Add")
    if plus is None or g.other_input(plus, 1.0) != erf.output[0]:
        return None
    head = _product(g, x, plus.output[0])
    return None if head is None else GeluMatch(x, head[-1].output[0], (pre, erf, plus, *head))


def _product(g: _Graph, x: str, a: str) -> tuple[Any, ...] | None:
    """The nodes computing ``0.5 * x * a`` from ``a`` (read only there), the last one giving the GELU."""
    first = g.sole_consumer(a, "Mul") or g.sole_consumer(a, "Div")
    if first is None or len(first.input) != 2:
        return None
    if first.op_type == "Mul" and a in first.input:
        other = first.input[1] if first.input[0] == a else first.input[0]
        if other == x:  # (x * a) * 0.5
            half = g.sole_consumer(first.output[0], "Mul") or g.sole_consumer(first.output[0], "Div")
            return (first, half) if g.scaled(half, 0.5) == first.output[0] else None
        pre_half = g.producer.get(other)  # (0.5 * x) * a
        if g.scaled(pre_half, 0.5) == x and g.sole_consumer(other, "Mul") is first:
            return (pre_half, first)
    if g.scaled(first, 0.5) == a:  # x * (a * 0.5)
        last = g.sole_consumer(first.output[0], "Mul")
        if last is not None and sorted(last.input) == sorted([x, first.output[0]]):
            return (first, last)
    return None


def fuse_gelu(model: Any) -> tuple[Any, list[str]]:
    """A copy of ``model`` with every spelled-out exact-erf GELU replaced by one ONNX ``Gelu`` node.

    A model below opset 20 is first moved to opset 20 with ONNX's version converter (the
    one opset that has ``Gelu``). Returns the model (unchanged when there is no GELU, or
    when the opset cannot be moved: its ``Erf`` then stays) and notes for the report.
    """
    if _has_subgraphs(model) or not find_gelus(model):  # If/Loop bodies read tensors this matcher cannot see
        return model, []
    m, notes = _at_gelu_opset(model)
    if m is None:
        return model, notes
    matches = find_gelus(m)
    if not matches:  # the version converter rewrote the pattern: keep the model as it came
        return model, []
    replaced = {id(n): match for match in matches for n in match.nodes}
    nodes: list[Any] = []
    for node in m.graph.node:
        match = replaced.get(id(node))
        if match is None:
            nodes.append(node)
        elif node is match.nodes[-1]:  # the node giving y: everything y needs is computed before it
            nodes.append(_gelu_node(match, node.name))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _drop_unused(
        m,
        gone={t for match in matches for n in match.nodes for t in n.output if t != match.y},
        inputs={t for match in matches for n in match.nodes for t in n.input},
    )
    note = (
        f"{len(matches)} exact-erf GELU(s) spelled out as Div/Erf/Add/Mul fused into ONNX Gelu "
        "(TFLite GELU instead of a TensorFlow Select FlexErf)"
    )
    return m, notes + [note]


def _has_subgraphs(model: Any) -> bool:
    return any(a.type in (5, 10) for n in model.graph.node for a in n.attribute)  # GRAPH, GRAPHS


def _gelu_node(match: GeluMatch, name: str) -> Any:
    helper = require("onnx").helper
    return helper.make_node("Gelu", [match.x], [match.y], name=f"{name or match.y}_gelu")


def _at_gelu_opset(model: Any) -> tuple[Any | None, list[str]]:
    """A copy at opset >= 20 (None if the version converter fails), and a note when the opset moved.

    Not onnxruntime's ``com.microsoft`` ``Gelu`` at the model's own opset: onnx2tf runs the
    model through onnxruntime to learn its shapes and drops node domains on the way, so a
    contrib op there costs it every shape, and with them its NCHW -> NHWC layout decisions.
    """
    onnx = require("onnx")
    opset = _onnx_opset(model)
    if opset >= ONNX_GELU_OPSET:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, []
    from onnx import version_converter

    try:
        moved = version_converter.convert_version(model, ONNX_GELU_OPSET)
        moved.ir_version = max(moved.ir_version, onnx.helper.find_min_ir_version_for(moved.opset_import))
        onnx.checker.check_model(moved)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors on ops it cannot adapt
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return None, [f"exact-erf GELU(s) left spelled out: could not move opset {opset} to {ONNX_GELU_OPSET} ({why})"]
    return moved, [f"opset {opset} moved to {ONNX_GELU_OPSET} (ONNX version converter) for ONNX Gelu"]


def _onnx_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _drop_unused(model: Any, *, gone: set[str], inputs: set[str]) -> None:
    """Remove the value infos of the ``gone`` tensors, and those of the fused nodes' ``inputs``
    that are constants nothing reads any more."""
    g = model.graph
    for info in [v for v in g.value_info if v.name in gone]:
        g.value_info.remove(info)
    unread = inputs - {name for n in g.node for name in n.input} - {o.name for o in g.output}
    for node in [n for n in g.node if n.op_type == "Constant" and n.output[0] in unread]:
        g.node.remove(node)
    for t in [t for t in g.initializer if t.name in unread]:
        g.initializer.remove(t)


def lone_erf_notes(model: Any) -> list[str]:
    """A note on the ``Erf`` nodes left outside a GELU (onnx2tf computes them with builtin ops)."""
    count = sum(n.op_type == "Erf" for n in model.graph.node)
    if not count:
        return []
    note = (
        f"{count} Erf op(s) outside a GELU computed with onnx2tf's polynomial erf (builtin ops, "
        "abs error about 1e-7) instead of a TensorFlow Select FlexErf"
    )
    return [note]
