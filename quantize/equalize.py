"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For two convolutions in a row, ``Conv A -> ReLU -> Conv B``, scaling output channel ``i``
of A by ``1/s_i`` and the matching input channel of B by ``s_i`` leaves the network's
function unchanged (ReLU is positively homogeneous) and, with
``s_i = sqrt(r_A,i / r_B,i)``, gives both channels the same weight range ``sqrt(r_A r_B)``,
which is what per-tensor weight quantization needs. ReLU6 is not scale-equivariant; the
paper replaces it by ReLU, which changes the float model's answers. edgeship keeps the
function exact instead: ``ReLU6(x) / s`` is ``min(ReLU(x / s), 6 / s)``, a ReLU plus a
per-channel ``Min``. Works on the ONNX graph before conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeship._deps import require


@dataclass(frozen=True)
class _Pair:
    a: Any  # producer Conv node
    act: Any | None  # Relu/Clip node between them
    b: Any  # consumer Conv node
    depthwise_b: bool


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def _pairs(model: Any, weights: dict[str, np.ndarray]) -> list[_Pair]:
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for a in model.graph.node:
        if (
            a.op_type != "Conv"
            or a.input[1] not in weights
            or _attr(a, "group", 1) not in (1, weights[a.input[1]].shape[0])
        ):
            continue
        nxt, act = consumers.get(a.output[0], []), None
        if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip") and a.output[0] not in outputs:
            act = nxt[0]
            if act.op_type == "Clip" and not _is_relu6(act, weights):
                continue
            nxt = consumers.get(act.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Conv" or act is None or (act.output[0] in outputs):
            continue
        b = nxt[0]
        if b.input[1] not in weights:
            continue
        channels = weights[a.input[1]].shape[0]
        group = _attr(b, "group", 1)
        wb = weights[b.input[1]]
        if group == 1 and wb.shape[1] == channels:
            pairs.append(_Pair(a, act, b, False))
        elif group == channels and wb.shape[0] == channels and wb.shape[1] == 1:
            pairs.append(_Pair(a, act, b, True))
    return pairs


def _is_relu6(node: Any, weights: dict[str, np.ndarray]) -> bool:
    lo = weights.get(node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "min", None)
    hi = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else _attr(node, "max", None)
    return lo is not None and hi is not None and float(np.asarray(lo)) == 0.0 and float(np.asarray(hi)) > 0


def equalize(model: Any, *, sweeps: int = 20) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` with cross-layer equalization applied to every Conv-ReLU-Conv pair.

    Returns the model and a report (pairs, ReLU6 replaced, weight-range spread before/after).
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    weights = {name: numpy_helper.to_array(t).astype(np.float64) for name, t in inits.items()}
    pairs = _pairs(m, weights)
    spread_before = _spread(pairs, weights)
    totals = [np.ones(weights[p.a.input[1]].shape[0]) for p in pairs]
    for _ in range(sweeps):
        for k, p in enumerate(pairs):
            totals[k] *= _scale_pair(p, weights)
    replaced = 0
    for k, p in enumerate(pairs):
        if p.act is not None and p.act.op_type == "Clip":
            _clip_to_relu_min(m, p.act, _clip_max(p.act, weights) / totals[k])
            replaced += 1
    touched = (
        {p.a.input[1] for p in pairs}
        | {p.b.input[1] for p in pairs}
        | {p.a.input[2] for p in pairs if len(p.a.input) > 2}
    )
    for name in touched:
        inits[name].CopyFrom(numpy_helper.from_array(weights[name].astype(np.float32), name))
    return m, {
        "pairs": len(pairs),
        "relu6_as_relu_plus_channel_min": replaced,
        "channel_range_spread_before": spread_before,
        "channel_range_spread_after": _spread(pairs, weights),
    }


def _clip_max(node: Any, weights: dict[str, np.ndarray]) -> float:
    hi = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else _attr(node, "max", None)
    return float(np.asarray(hi))


def _clip_to_relu_min(model: Any, clip: Any, limits: np.ndarray) -> None:
    """Clip(0, 6) -> Relu -> Min(x, limits) with per-channel limits (NCHW broadcast)."""
    from onnx import helper, numpy_helper

    out = clip.output[0]
    relu_out = out + "__edgeship_relu"
    const = out + "__edgeship_limit"
    model.graph.initializer.append(numpy_helper.from_array(limits.astype(np.float32).reshape(1, -1, 1, 1), const))
    del clip.input[1:]
    del clip.attribute[:]
    clip.op_type = "Relu"
    clip.output[0] = relu_out
    index = list(model.graph.node).index(clip)
    model.graph.node.insert(index + 1, helper.make_node("Min", [relu_out, const], [out], name=out + "__edgeship_min"))


def _scale_pair(p: _Pair, w: dict[str, np.ndarray]) -> np.ndarray:
    wa, wb = w[p.a.input[1]], w[p.b.input[1]]
    ra = np.abs(wa).reshape(wa.shape[0], -1).max(1)
    rb = (
        np.abs(wb).reshape(wb.shape[0], -1).max(1)
        if p.depthwise_b
        else np.abs(wb).transpose(1, 0, 2, 3).reshape(wb.shape[1], -1).max(1)
    )
    ok = (ra > 0) & (rb > 0)
    s = np.ones_like(ra)
    s[ok] = np.sqrt(ra[ok] / rb[ok])
    w[p.a.input[1]] = wa / s[:, None, None, None]
    if len(p.a.input) > 2 and p.a.input[2] in w:
        w[p.a.input[2]] = w[p.a.input[2]] / s
    w[p.b.input[1]] = wb * (s[:, None, None, None] if p.depthwise_b else s[None, :, None, None])
    return s


def _spread(pairs: list[_Pair], w: dict[str, np.ndarray]) -> float:
    """Mean over equalized weight tensors of (max channel range / median channel range)."""
    ratios = []
    for name in {p.a.input[1] for p in pairs}:
        r = np.abs(w[name]).reshape(w[name].shape[0], -1).max(1)
        if np.median(r) > 0:
            ratios.append(float(r.max() / np.median(r)))
    return round(float(np.mean(ratios)), 3) if ratios else 1.0
