"""Op groups the budget search may keep float: the float model's ops read from its flatbuffer, their
estimated latency cost, and the candidates built from them (elementwise runs, normalisations, graph
segments, large depthwise convolutions).

Keeping a whole connected run of elementwise ops float keeps the tensors *inside* it float, which is
where int8 loses; one op alone still reads and writes int8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeship import tflite_graph as g
from edgeship.quantize.tflite_quant import op_names
from edgeship.tflite_graph import tensor_name

#: Op types that may stay float inside XNNPACK, by kind. Elementwise kinds cost their
#: output's size; matrix kinds cost their multiply-adds (kept float only when nothing cheaper works).
ELEMENTWISE = (
    "HARD_SWISH",
    "LOGISTIC",
    "MUL",
    "ADD",
    "SUB",
    "DIV",
    "SOFTMAX",
    "MEAN",
    "SQUARED_DIFFERENCE",
    "RSQRT",
    "SQRT",
    "POW",
    "GELU",
    "TANH",
    "SUM",
    "MAXIMUM",
    "MINIMUM",
    "EXP",
    "HARD_SIGMOID",
)
MATRIX = ("FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D")
#: Relative latency of one float-island element (QUANTIZE + float op + DEQUANTIZE, memory bound)
#: against one float multiply-add kept instead of an int8 one.
ELEMENT_COST = 4.0
MAC_COST = 0.25
#: Matrix ops with at most this many outputs (squeeze-excite FCs, the classifier) are cheap
#: enough to join elementwise runs.
VECTOR_ELEMENTS = 4096


@dataclass(frozen=True)
class Candidate:
    """A group of ops that may be kept float together.

    Attributes:
        name: ``OP_TYPE part/parts`` (e.g. ``HARD_SWISH 2/2``: the late half's HARD_SWISHes).
        nodes: Output tensor names of the ops (what TensorFlow's quantizer denylists).
        cost: Estimated latency cost of keeping them float (arbitrary units, see :func:`op_cost`).
    """

    name: str
    nodes: tuple[str, ...]
    cost: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ops": len(self.nodes), "cost": round(self.cost, 1), "nodes": list(self.nodes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidate:
        return cls(str(d["name"]), tuple(d["nodes"]), float(d["cost"]))


@dataclass(frozen=True)
class OpInfo:
    """One op of the float model, as the search sees it."""

    op: str
    output: str
    out_elements: int
    macs: int
    #: Tensor indices the op reads and writes (for finding connected runs of ops).
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()


def op_cost(info: OpInfo) -> float:
    """Estimated latency cost of keeping this op float instead of int8."""
    return MAC_COST * info.macs if info.op in MATRIX else ELEMENT_COST * info.out_elements


def candidates(ops: Sequence[OpInfo], parts: int = 2, segments: int = 6) -> list[Candidate]:
    """Elementwise runs grouped by kind and part of the graph (:func:`elementwise_runs`), then segments."""
    return [*elementwise_runs(ops, parts), *graph_segments(ops, segments)]


def elementwise_runs(ops: Sequence[OpInfo], parts: int = 2) -> list[Candidate]:
    """Connected runs of elementwise (and vector-sized matrix) ops; runs of the same kind (op-type set) in one
    part of the graph form a candidate."""
    cheap = [
        i
        for i, o in enumerate(ops)
        if o.op in ELEMENTWISE or (o.op in MATRIX and 0 < o.out_elements <= VECTOR_ELEMENTS)
    ]
    runs = _components(cheap, ops)
    groups: dict[tuple[int, str], list[list[int]]] = {}
    for run in runs:
        kind = "+".join(sorted({ops[i].op for i in run}))
        groups.setdefault((min(run[0] * parts // max(len(ops), 1), parts - 1), kind), []).append(run)
    return [
        Candidate(
            f"{kind} x{len(members)} {part + 1}/{parts}",
            tuple(ops[i].output for r in members for i in r),
            sum(op_cost(ops[i]) for r in members for i in r),
        )
        for (part, kind), members in sorted(groups.items())
    ]


def graph_segments(ops: Sequence[OpInfo], segments: int = 6) -> list[Candidate]:
    """The graph cut into ``segments`` runs of consecutive ops, each kept float whole."""
    bounds = np.linspace(0, len(ops), segments + 1).astype(int)
    return [
        Candidate(f"ops {a}-{b - 1}", tuple(o.output for o in ops[a:b]), sum(map(op_cost, ops[a:b])))
        for a, b in zip(bounds[:-1], bounds[1:])
        if b > a
    ]


#: Ops that mark a normalisation decomposed into elementwise pieces (LayerNorm, RMSNorm, GroupNorm
#: as onnx2tf writes them: MEAN, SQUARED_DIFFERENCE, MEAN, ADD eps, RSQRT, MUL, SUB, ADD).
NORM_MARKERS = ("RSQRT", "SQRT")


def normalization_groups(ops: Sequence[OpInfo]) -> list[Candidate]:
    """Connected runs of elementwise ops that hold a normalisation (an ``RSQRT``/``SQRT``).

    onnxruntime's QDQ quantizer computes a LayerNormalization in float between one
    dequantize and one quantize; TFLite's int8 graph quantizes each of its ~10 pieces
    (the variance and its reciprocal square root included) and, in a transformer, the
    residual stream the pieces hang off. Keeping these runs float inside the XNNPACK
    partition keeps a transformer's normalisations at float precision, as onnxruntime's QDQ does.
    Runs without a marker (SE gates, activations) are not normalisations and are left out.
    """
    cheap = [i for i, o in enumerate(ops) if o.op in ELEMENTWISE]
    runs = [r for r in _components(cheap, ops) if any(ops[i].op in NORM_MARKERS for i in r)]
    return [
        Candidate(
            f"normalisation x{sum(ops[i].op in NORM_MARKERS for i in r)}",
            tuple(ops[i].output for i in r),
            sum(op_cost(ops[i]) for i in r),
        )
        for r in runs
    ]


def normalization_nodes(calibrated: bytes) -> list[str]:
    """Output tensor names of every op of :func:`normalization_groups` of a float TFLite model."""
    return [n for c in normalization_groups(read_ops(calibrated)) for n in c.nodes]


#: Depthwise convolutions with more kernel taps than this are candidates for timed placement:
#: XNNPACK's int8 kernel for larger windows can be slower than its float one (timed per machine).
SLOW_DEPTHWISE_TAPS = 9


def slow_int8_candidates(model: bytes) -> list[str]:
    """Output names of the ops whose int8 XNNPACK kernel may be slower than the float one: depthwise
    convolutions with large kernels (ConvNeXt's 7x7, EfficientNet's and MobileNetV3's 5x5).
    Whether keeping them float pays is measured by the pipeline, on the machine that runs the model."""
    m = g.read(model)
    sg = m.subgraphs[0]
    found = []
    for op in g.ops_of(m, "DEPTHWISE_CONV_2D"):
        kernel = sg.tensors[op.inputs[1]].shape
        if kernel is not None and len(kernel) == 4 and int(kernel[1]) * int(kernel[2]) > SLOW_DEPTHWISE_TAPS:
            found.append(g.tensor_name(sg.tensors[op.outputs[0]]))
    return found


def _components(members: Sequence[int], ops: Sequence[OpInfo]) -> list[list[int]]:
    """Connected components (producer -> consumer edges) of the listed ops, each in graph order."""
    parent = {i: i for i in members}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {t: i for i in members for t in ops[i].outputs}
    for j in members:
        for t in ops[j].inputs:
            if t in producer:
                parent[root(j)] = root(producer[t])
    comps: dict[int, list[int]] = {}
    for i in members:
        comps.setdefault(root(i), []).append(i)
    return sorted(comps.values())


def float_except_matrix(ops: Sequence[OpInfo]) -> list[str]:
    """Output names of every op but the matrix ops with more than :data:`VECTOR_ELEMENTS` outputs.

    The most a mixed model can keep float while its convolutions and matrix multiplies (its
    time) stay int8: their int8 inputs, outputs and weights remain. A budget this model misses
    needs convolutions float, which costs their speed (``benchmarks/int8_ceiling.py`` measures it
    per model).
    """
    return [o.output for o in ops if not (o.op in MATRIX and o.out_elements > VECTOR_ELEMENTS)]


def read_ops(model: bytes) -> list[OpInfo]:
    """The float model's ops in graph order: type, output name, output size and multiply-adds."""
    m = g.read(model)
    sg = m.subgraphs[0]
    const = {
        i
        for i, t in enumerate(sg.tensors)
        if t.buffer and m.buffers[t.buffer].data is not None and len(m.buffers[t.buffer].data)
    }
    found = []
    for op, name in zip(sg.operators, op_names(model)):
        if not len(op.outputs):
            continue
        out = sg.tensors[op.outputs[0]]
        elements = int(np.prod(out.shape)) if out.shape is not None else 0
        found.append(
            OpInfo(
                name,
                tensor_name(out),
                elements,
                _macs(name, op, sg, const, elements),
                tuple(int(i) for i in op.inputs if i >= 0),
                tuple(int(i) for i in op.outputs),
            )
        )
    return found


def _macs(name: str, op: Any, sg: Any, const: set[int], out_elements: int) -> int:
    """Multiply-adds of a matrix op: output size times the reduction length."""
    if name not in MATRIX:
        return 0
    ins = [i for i in op.inputs if i >= 0]
    if name == "BATCH_MATMUL":
        shape = sg.tensors[ins[0]].shape
        return out_elements * int(shape[-1]) if shape is not None and len(shape) else 0
    weights = [i for i in ins if i in const and sg.tensors[i].shape is not None and len(sg.tensors[i].shape) >= 2]
    if not weights:
        return 0
    shape = sg.tensors[weights[0]].shape
    reduce = int(np.prod(shape[1:])) if name != "DEPTHWISE_CONV_2D" else int(np.prod(shape[1:3]))
    return out_elements * reduce
