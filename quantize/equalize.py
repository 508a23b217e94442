"""Cross-layer equalization for per-tensor weights, and DFQ's bias absorption (Nagel et al. 2019,
"Data-Free Quantization", 4.1 and 4.2).

For two convolutions in a row, ``Conv A -> ReLU -> Conv B``, dividing output channel ``i`` of A by
``s_i`` and multiplying the matching input channel of B by ``s_i`` leaves the network's function
unchanged (ReLU is positively homogeneous). Per-tensor weights give every channel of a tensor the step
of its widest channel, so a few wide channels (batch-norm folding leaves some depthwise channels 30x
wider than the median) cost every other channel its precision. Two ways to choose ``s``:

- ``method="headroom"`` (default): only A's widest channels shrink (``s >= 1``), down to the 90th
  percentile of A's channel ranges, each as far as B's matching input channel can grow without
  widening B's widest channel. B's step is unchanged, A's falls; what it costs is the shrunk channels'
  activation precision (they span ``1/s`` of their tensor's int8 range). On the shared MobileNetV2 this
  measured better than DFQ's square root (docs/benchmarks.md, "Per-tensor weights").
- ``method="dfq"``: DFQ's ``s_i = sqrt(r_A,i / r_B,i)`` (both channels get the range ``sqrt(r_A r_B)``),
  repeated ``sweeps`` times; every channel's activation moves.

ReLU6 is not scale-equivariant. Two ways:

- ``relu6="exact"`` (default): ``ReLU6(x) / s`` is ``min(ReLU6(x / s), 6 / s)`` when ``s >= 1``
  (``dfq`` multiplies each pair's scales by one constant so that the smallest is 1); the convolution
  keeps its fused ReLU6 and a per-channel ``Min`` with limits ``6 / s <= 6`` follows (only in pairs
  where some ``s > 1``). The function is unchanged, and the int8 tensor before the ``Min`` stays within
  [0, 6]. A ``Min`` is a MINIMUM op in TFLite: NNAPI runs it from Android 10 (feature level 3);
  XNNPACK has no int8 MINIMUM, so a per-tensor model runs on LiteRT's own kernels on a CPU.
- ``relu6="relu"`` (DFQ's way, ``dfq`` only): ReLU6 between the pair becomes ReLU. This changes the
  float model wherever an activation exceeded 6: on the shared MobileNetV2 (trained with ReLU6 that
  clips often) the float model's top-1 agreement with itself falls to 81 % (docs/benchmarks.md).

With channel statistics (``stats``), channels that never fire on the calibration images are zeroed
first: that is not exact where such a channel would fire, and quantize measures and reports the float
model's change (``equalization.float_change``).

Bias absorption (DFQ 4.2, with the pre-activation statistics measured on calibration images instead
of read from batch norms, which converted models have folded): a channel whose pre-activation ``x``
stays above ``c = max(0, mean - 3 std)`` passes ``ReLU(x - c) + c``; ``c`` leaves A's bias and B's
bias takes ``W_B c``. It narrows the activation ranges CLE widened. Exact where ``x >= c`` (and, for a
padded depthwise B, away from the border). Works on the ONNX graph before conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


#: A channel is dead when its pre-activation stays this many of its standard deviations below 0 on every
#: calibration image: then a ReLU/ReLU6 passes 0 and zeroing its weights changes nothing there.
DEAD_MARGIN = 1.0
#: How ReLU6 between an equalized pair is handled (see the module docstring).
RELU6_MODES = ("relu", "exact")
#: How the scales are chosen (see the module docstring).
METHODS = ("headroom", "dfq")
#: ``headroom``: a producer's output channels are shrunk down to this quantile of their ranges.
SHRINK_QUANTILE = 0.9


#: Per-channel statistics of the named tensors on calibration images: ``stats(model, names)`` gives one
#: (mean, std, max) triple of arrays per name (NCHW channels).
ChannelStats = Callable[[Any, list[str]], list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def equalize(
    model: Any,
    *,
    method: str = "headroom",
    sweeps: int = 20,
    relu6: str = "exact",
    stats: ChannelStats | None = None,
    absorb: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """A copy of ``model`` with its Conv-ReLU-Conv pairs equalized.

    ``method``: ``"headroom"`` (default, see the module docstring) or ``"dfq"`` (DFQ's square-root
    scales, ``sweeps`` times). ``relu6`` (``"dfq"`` only): ``"exact"`` or ``"relu"`` (DFQ's).
    ``stats``: measures the pairs' pre-activations on calibration images; with it, channels that never
    fire (pre-activation <= 0 on every image: their weights are whatever batch-norm folding left, often
    the largest of the tensor) are zeroed in the producer and the consumer first (exact wherever the
    channel stays dead), and with ``absorb`` and ``relu6="relu"`` bias absorption follows equalization.
    Returns the model and a report (pairs, dead channels, ReLU6 handling, weight-range spread, absorption).
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if relu6 not in RELU6_MODES or (method == "headroom" and relu6 != "exact"):
        raise ValueError(f"relu6 must be one of {RELU6_MODES} ('exact' with method 'headroom'), got {relu6!r}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    weights = {name: numpy_helper.to_array(t).astype(np.float64) for name, t in inits.items()}
    pairs = _pairs(m, weights)
    spread_before = _spread(pairs, weights)
    dead = _zero_dead(pairs, weights, stats(m, [p.a.output[0] for p in pairs])) if stats is not None else 0
    totals = [np.ones(weights[p.a.input[1]].shape[0]) for p in pairs]
    for _ in range(sweeps if method == "dfq" else 1):
        for k, p in enumerate(pairs):
            totals[k] *= _scale_pair(p, weights) if method == "dfq" else _shrink_pair(p, weights)
    clips = [(k, p) for k, p in enumerate(pairs) if p.act is not None and p.act.op_type == "Clip"]
    for k, p in clips:
        if relu6 == "exact" and method == "dfq":
            totals[k] = _at_least_one(p, weights, totals[k])
        if relu6 == "exact" and np.any(totals[k] != 1.0):
            _clip_then_min(m, p.act, _clip_max(p.act, weights) / totals[k])
        elif relu6 == "relu":
            _clip_to_relu(p.act)
    _write_back(inits, weights, pairs)
    info = {
        "method": method,
        "pairs": len(pairs),
        "dead_channels_zeroed": dead,
        "relu6": relu6,
        "relu6_changed": sum(1 for k, _ in clips if relu6 == "relu" or np.any(totals[k] != 1.0)),
        "largest_shrink": round(float(max((t.max() for t in totals), default=1.0)), 3),
        "channel_range_spread_before": spread_before,
        "channel_range_spread_after": _spread(pairs, weights),
    }
    if stats is not None and absorb and relu6 == "relu":
        _write_back(inits, weights, pairs)
        measured = [(mean, std) for mean, std, _ in stats(m, [p.a.output[0] for p in pairs])]
        info["bias_absorption"] = _absorb(m, pairs, weights, measured)
        _write_back({t.name: t for t in m.graph.initializer}, weights, pairs)
    return m, info


def _zero_dead(
    pairs: list[_Pair], w: dict[str, np.ndarray], stats: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> int:
    """Zero the channels whose pre-activation never exceeds 0 (a ReLU/ReLU6 passes 0): A's row and bias,
    B's input channel. Returns how many (a channel shared by two pairs counts once per pair)."""
    count = 0
    for p, (_, std, peak) in zip(pairs, stats):
        dead = peak < -DEAD_MARGIN * std
        if not np.any(dead):
            continue
        w[p.a.input[1]] = np.where(dead[:, None, None, None], 0.0, w[p.a.input[1]])
        if len(p.a.input) > 2 and p.a.input[2] in w:
            w[p.a.input[2]] = np.where(dead, 0.0, w[p.a.input[2]])
        mask = dead[:, None, None, None] if p.depthwise_b else dead[None, :, None, None]
        w[p.b.input[1]] = np.where(mask, 0.0, w[p.b.input[1]])
        count += int(dead.sum())
    return count


def channel_stats(inputs: np.ndarray) -> ChannelStats:
    """A :data:`ChannelStats` measuring with onnxruntime on ``inputs`` (the ONNX model's own input layout)."""

    def measure(model: Any, names: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        onnx, ort = require("onnx"), require("onnxruntime")
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        feed, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
        fixed = isinstance(batch, int) and batch > 0  # convert fixes the batch to 1
        step = batch if fixed else 8
        counts = [0.0 for _ in names]
        acc: list[list[np.ndarray]] = [[] for _ in names]
        for i in range(0, len(inputs) - len(inputs) % step if fixed else len(inputs), step):
            for k, out in enumerate(session.run(None, {feed: inputs[i : i + step]})):
                o = out.astype(np.float64)
                acc[k].append(np.stack([o.sum((0, 2, 3)), (o**2).sum((0, 2, 3)), o.max((0, 2, 3))]))
                counts[k] += o.shape[0] * o.shape[2] * o.shape[3]
        return [_moments(np.stack(a), n) for a, n in zip(acc, counts)]

    return measure


def _moments(batches: np.ndarray, count: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, max) per channel from per-batch (sum, sum of squares, max)."""
    mean = batches[:, 0].sum(0) / count
    var = batches[:, 1].sum(0) / count - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0)), batches[:, 2].max(0)


def _write_back(inits: dict[str, Any], weights: dict[str, np.ndarray], pairs: list[_Pair]) -> None:
    from onnx import numpy_helper

    touched = {p.a.input[1] for p in pairs} | {p.b.input[1] for p in pairs}
    touched |= {p.a.input[2] for p in pairs if len(p.a.input) > 2} | {p.b.input[2] for p in pairs if len(p.b.input) > 2}
    for name in touched & set(inits):
        inits[name].CopyFrom(numpy_helper.from_array(weights[name].astype(np.float32), name))


def _at_least_one(p: _Pair, w: dict[str, np.ndarray], total: np.ndarray) -> np.ndarray:
    """Scale the pair by one more factor so that every channel's total scale is >= 1: then each channel's
    clip ``6 / s`` is at most 6, and the convolution keeps its fused ReLU6 (a bounded int8 range) before
    the per-channel ``Min``. A whole tensor's scale is free under per-tensor quantization."""
    g = 1.0 / float(total.min()) if total.min() > 0 else 1.0
    w[p.a.input[1]] = w[p.a.input[1]] / g
    if len(p.a.input) > 2 and p.a.input[2] in w:
        w[p.a.input[2]] = w[p.a.input[2]] / g
    w[p.b.input[1]] = w[p.b.input[1]] * g
    return total * g


def _clip_then_min(model: Any, clip: Any, limits: np.ndarray) -> None:
    """Clip(0, 6) -> Clip(0, 6) then Min(x, limits) with per-channel limits <= 6 (NCHW broadcast): exact."""
    from onnx import helper, numpy_helper

    out = clip.output[0]
    clipped = out + "__edgeship_relu6"
    const = out + "__edgeship_limit"
    model.graph.initializer.append(numpy_helper.from_array(limits.astype(np.float32).reshape(1, -1, 1, 1), const))
    clip.output[0] = clipped
    index = list(model.graph.node).index(clip)
    model.graph.node.insert(index + 1, helper.make_node("Min", [clipped, const], [out], name=out + "__edgeship_min"))


def _clip_to_relu(clip: Any) -> None:
    """Clip(0, 6) -> Relu (DFQ's replacement)."""
    del clip.input[1:]
    del clip.attribute[:]
    clip.op_type = "Relu"


def _absorb(
    model: Any, pairs: list[_Pair], w: dict[str, np.ndarray], stats: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """DFQ's bias absorption on every pair whose A has a bias and B a bias (added when missing)."""
    moved, channels = 0, 0
    for p, (mean, std) in zip(pairs, stats):
        c = np.maximum(0.0, mean - 3.0 * std)
        if len(p.a.input) < 3 or p.a.input[2] not in w or not np.any(c > 0):
            continue
        bias_b = _bias_of(model, p.b, w)
        w[p.a.input[2]] = w[p.a.input[2]] - c
        wb = w[p.b.input[1]]
        shift = wb.reshape(wb.shape[0], -1).sum(1) * c if p.depthwise_b else wb.sum((2, 3)) @ c
        w[bias_b] = w[bias_b] + shift
        moved += 1
        channels += int(np.sum(c > 0))
    return {"pairs": moved, "channels": channels, "rule": "c = max(0, mean - 3 std) of the pre-activation"}


def _bias_of(model: Any, conv: Any, w: dict[str, np.ndarray]) -> str:
    """The name of ``conv``'s bias initializer, made (zeros) when it has none."""
    from onnx import numpy_helper

    if len(conv.input) > 2 and conv.input[2] in w:
        return str(conv.input[2])
    name = conv.output[0] + "__edgeship_bias"
    w[name] = np.zeros(w[conv.input[1]].shape[0])
    model.graph.initializer.append(numpy_helper.from_array(w[name].astype(np.float32), name))
    conv.input.append(name)
    return name


def _clip_max(node: Any, weights: dict[str, np.ndarray]) -> float:
    hi = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else _attr(node, "max", None)
    return float(np.asarray(hi))


def _shrink_pair(p: _Pair, w: dict[str, np.ndarray]) -> np.ndarray:
    """Shrink A's output channels wider than its :data:`SHRINK_QUANTILE` range down to it, each as far as
    B's matching input channel can grow without widening B's widest channel (its headroom)."""
    wa, wb = w[p.a.input[1]], w[p.b.input[1]]
    ra = np.abs(wa).reshape(wa.shape[0], -1).max(1)
    rb = np.abs(wb).reshape(wb.shape[0], -1).max(1) if p.depthwise_b else np.abs(wb).max((0, 2, 3))
    live = (ra > 0) & (rb > 0)
    if not np.any(live):
        return np.ones_like(ra)
    target = np.quantile(ra[live], SHRINK_QUANTILE)
    s = np.ones_like(ra)
    s[live] = np.maximum(1.0, np.minimum(ra[live] / target, rb.max() / rb[live]))
    _apply(p, w, s)
    return s


def _apply(p: _Pair, w: dict[str, np.ndarray], s: np.ndarray) -> None:
    """A's output channel ``i`` divided by ``s_i`` (weights and bias), B's input channel ``i`` multiplied."""
    w[p.a.input[1]] = w[p.a.input[1]] / s[:, None, None, None]
    if len(p.a.input) > 2 and p.a.input[2] in w:
        w[p.a.input[2]] = w[p.a.input[2]] / s
    w[p.b.input[1]] = w[p.b.input[1]] * (s[:, None, None, None] if p.depthwise_b else s[None, :, None, None])


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
    _apply(p, w, s)
    return s


def _spread(pairs: list[_Pair], w: dict[str, np.ndarray]) -> float:
    """Mean over equalized weight tensors of (max channel range / median channel range)."""
    ratios = []
    for name in {p.a.input[1] for p in pairs}:
        r = np.abs(w[name]).reshape(w[name].shape[0], -1).max(1)
        if np.median(r) > 0:
            ratios.append(float(r.max() / np.median(r)))
    return round(float(np.mean(ratios)), 3) if ratios else 1.0
