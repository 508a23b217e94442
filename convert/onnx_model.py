"""Load, check and prepare an ONNX image classifier for conversion.

Old models are normalised on the way: IR-3 graphs that list every initializer as a
graph input get those inputs removed, opsets below 13 are upgraded with the ONNX
version converter, and dynamic dimensions are fixed.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship._deps import require
from edgeship._paths import is_inside
from edgeship.errors import ConversionError, InputError
from edgeship.reference import MAX_IR_VERSION as MAX_IR_VERSION
from edgeship.runtime.card import MAX_SIDE, Layout, Postprocessing

log = logging.getLogger(__name__)

#: Opset the converter normalises older models to (well supported by onnxsim and onnx2tf).
TARGET_OPSET = 13
#: Op domains of the ONNX standard (any other is a custom op set).
STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class ModelInfo:
    """What edgeship needs to know about an image classifier's interface."""

    input_name: str
    input_shape: tuple[int | str, ...]  # as declared; strings are dynamic dimensions
    layout: Layout
    output_name: str
    output_shape: tuple[int | str, ...]
    opset: int
    ir_version: int
    initializer_inputs: int

    @property
    def channels(self) -> int:
        dim = self.input_shape[1] if self.layout == Layout.NCHW else self.input_shape[3]
        return int(dim) if isinstance(dim, int) else 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_name": self.input_name,
            "input_shape": list(self.input_shape),
            "layout": self.layout.value,
            "output_name": self.output_name,
            "output_shape": list(self.output_shape),
            "opset": self.opset,
            "ir_version": self.ir_version,
            "initializer_inputs": self.initializer_inputs,
        }


def load_model(path: str | os.PathLike[str]) -> Any:
    """Read and structurally check an ONNX file; raise :class:`InputError` if it is not one."""
    onnx = require("onnx", purpose="read ONNX models")
    path = Path(path)
    if not path.exists():
        raise InputError(f"model {path} does not exist")
    if not path.is_file():
        raise InputError(f"model {path} is not a file")
    if path.stat().st_size == 0:
        raise InputError(f"model {path} is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises various
        raise InputError(
            f"{path} is not a readable ONNX model (truncated or another format?): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    _load_external_data(model, path)
    if not model.graph.node:
        raise InputError(f"{path} is not an ONNX model: its graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(f"{path} failed the ONNX checker: {str(exc).splitlines()[0][:300]}") from exc
    _check_opset(model, path, onnx.defs.onnx_opset_version())
    return model


def _check_opset(model: Any, path: Path, newest: int) -> None:
    """Refuse an opset of the standard domain newer than the installed onnx knows (its ops are unknown)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise InputError(
                f"{path} uses ONNX opset {o.version}, newer than the {newest} this onnx knows: export the model "
                f"with opset {newest} or lower (e.g. torch.onnx.export(..., opset_version=17))"
            )


def _load_external_data(model: Any, path: Path) -> None:
    """Read the tensors stored beside the model, only from files inside the model's folder.

    onnx refuses ``..`` and absolute locations but follows a symbolic link, so a link
    inside the folder could pull any file of the machine into the converted model.
    """
    from onnx.external_data_helper import (
        ExternalDataInfo,
        _get_all_tensors,
        load_external_data_for_model,
        uses_external_data,
    )

    for tensor in (t for t in _get_all_tensors(model) if uses_external_data(t)):
        location = ExternalDataInfo(tensor).location
        data = path.parent / location
        if not is_inside(data, path.parent):
            raise InputError(
                f"{path}: tensor '{tensor.name}' stores its data in {location}, which leads outside "
                f"the model's folder (to {data.resolve()}); keep external data files beside the model"
            )
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # a missing or short data file
        raise InputError(f"{path}: cannot read its external data: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _refuse_custom_ops(model: Any, source: str) -> None:
    """Ops of a custom domain (``com.example``, onnxruntime's ``com.microsoft``) have no TFLite conversion."""
    custom = sorted({(n.domain, n.op_type) for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if custom:
        ops = ", ".join(f"{domain}.{op}" for domain, op in custom[:5]) + (" ..." if len(custom) > 5 else "")
        raise InputError(
            f"{source} uses {len(custom)} op type(s) of a custom domain ({ops}) that edgeship cannot "
            "convert; export the model with standard ONNX ops only"
        )


def _dims(value_info: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def inspect_model(model: Any, source: str = "model") -> ModelInfo:
    """Find the single 4-D image input and the class-score output, or raise InputError."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise InputError(f"{source} must have exactly one image input, found {len(inputs)} ({names})")
    inp = inputs[0]
    shape = _dims(inp)
    if len(shape) != 4:
        raise InputError(f"{source} input '{inp.name}' must be 4-D [N,C,H,W], got shape {list(shape)}")
    elem = inp.type.tensor_type.elem_type
    if elem != 1:  # FLOAT
        raise InputError(f"{source} input '{inp.name}' must be float32, got ONNX element type {elem}")
    if shape[1] == 1:
        raise InputError(
            f"{source} input '{inp.name}' is single-channel (grey); edgeship handles RGB/BGR "
            "3-channel image classifiers"
        )
    if shape[1] == 3:
        layout = Layout.NCHW
    elif shape[3] in (1, 3):
        raise InputError(
            f"{source} input '{inp.name}' looks NHWC {list(shape)}; edgeship expects NCHW "
            "ONNX image classifiers (channels second)"
        )
    else:
        raise InputError(f"{source} input '{inp.name}' has {shape[1]} channels; expected 1 or 3 (NCHW)")
    if len(model.graph.output) != 1:
        raise InputError(f"{source} must have exactly one output (class scores), found {len(model.graph.output)}")
    _refuse_custom_ops(model, source)
    out = model.graph.output[0]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return ModelInfo(
        inp.name, shape, layout, out.name, _dims(out), opset, model.ir_version, len(model.graph.input) - len(inputs)
    )


def resolve_shape(info: ModelInfo, override: Sequence[int] | None) -> tuple[tuple[int, ...], list[str]]:
    """The static input shape to convert with, and notes on what was fixed."""
    notes: list[str] = []
    if override is not None:
        shape = tuple(int(v) for v in override)
        if len(shape) != 4 or min(shape) <= 0:
            raise InputError(f"--input-shape must be 4 positive integers N,C,H,W, got {list(override)}")
        for i, (want, have) in enumerate(zip(shape, info.input_shape)):
            if isinstance(have, int) and have != want:
                raise InputError(
                    f"--input-shape {list(shape)} contradicts the model's static dimension "
                    f"{i} = {have} (declared {list(info.input_shape)})"
                )
        notes.append(f"input shape set to {list(shape)} by --input-shape (declared {list(info.input_shape)})")
        return _checked_size(shape, info, batch=shape[0]), notes
    shape_list: list[int] = []
    for i, d in enumerate(info.input_shape):
        if isinstance(d, int):
            shape_list.append(d)
        elif i == 0:
            shape_list.append(1)
            notes.append(f"dynamic batch dimension '{d}' fixed to 1")
        else:
            raise InputError(
                f"input dimension {i} ('{d}') is dynamic; give the size with "
                f"--input-shape N,C,H,W (declared {list(info.input_shape)})"
            )
    return _checked_size(tuple(shape_list), info), notes


def _checked_size(shape: tuple[int, ...], info: ModelInfo, batch: int = 1) -> tuple[int, ...]:
    """``shape`` when edgeship can convert it: batch 1 (or the one ``--input-shape`` asked for), and an
    image of at most ``MAX_SIDE`` pixels a side."""
    declared = list(info.input_shape)
    if shape[0] != batch:
        raise InputError(
            f"the model's batch dimension is fixed to {shape[0]} (declared {declared}); edgeship "
            "converts batch 1: export the model with batch 1 or a dynamic batch"
        )
    if max(shape[2:4]) > MAX_SIDE:  # NCHW (inspect_model refuses other layouts)
        raise InputError(
            f"input shape {list(shape)} is too large for an image classifier (at most {MAX_SIDE} "
            f"pixels a side; declared {declared})"
        )
    return shape


def node_counts(model: Any) -> dict[str, int]:
    """Number of nodes per op type, most frequent first."""
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def normalise(model: Any, info: ModelInfo, shape: Sequence[int]) -> tuple[Any, list[str]]:
    """Return a copy with initializer inputs removed, opset >= 13 and a static input shape."""
    onnx = require("onnx")
    notes: list[str] = []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if info.opset < TARGET_OPSET:
        from onnx import version_converter

        try:
            m = version_converter.convert_version(m, TARGET_OPSET)
        except Exception as exc:
            raise ConversionError(f"could not upgrade opset {info.opset} to {TARGET_OPSET}: {exc}") from exc
        notes.append(f"opset {info.opset} upgraded to {TARGET_OPSET}")
    inits = {i.name for i in m.graph.initializer}
    stale = [i for i in m.graph.input if i.name in inits]
    for i in stale:
        m.graph.input.remove(i)
    if stale:
        notes.append(
            f"{len(stale)} initializers listed as graph inputs (IR {info.ir_version} style) removed from inputs"
        )
    min_ir = onnx.helper.find_min_ir_version_for([o for o in m.opset_import if o.domain in STANDARD_DOMAINS])
    if m.ir_version < min_ir:
        notes.append(f"IR version {m.ir_version} raised to {min_ir}")
        m.ir_version = min_ir
    elif m.ir_version > MAX_IR_VERSION >= min_ir:
        # onnxsim 0.4.36 bundles an ONNX checker that stops at IR 10 (newer exporters write 11+).
        notes.append(f"IR version {m.ir_version} lowered to {MAX_IR_VERSION} for onnxsim")
        m.ir_version = MAX_IR_VERSION
    inp = next(i for i in m.graph.input if i.name == info.input_name)
    for dim, value in zip(inp.type.tensor_type.shape.dim, shape):
        dim.Clear()
        dim.dim_value = int(value)
    # Drop stale intermediate shapes; onnxsim re-infers them for the static input.
    del m.graph.value_info[:]
    for out in m.graph.output:
        for dim in out.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    try:
        onnx.checker.check_model(m)
    except Exception as exc:
        raise ConversionError(f"model is invalid after normalisation: {str(exc).splitlines()[0]}") from exc
    return m, notes


#: What TensorFlow accepts as an op/scope name (its ``_VALID_OP_NAME_REGEX``).
_TF_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*$")
_TF_BAD_CHAR = re.compile(r"[^A-Za-z0-9_.\\/>-]")


def sanitise_names(model: Any) -> dict[str, str]:
    """Rename, in place, nodes and tensors whose names TensorFlow rejects as scope names.

    paddle2onnx and tf2onnx exports carry names such as ``Softmax@0`` or ``conv:1``;
    onnx2tf turns node and tensor names into TensorFlow op names, which fail on them.
    Returns ``{old tensor name: new}`` (node renames are not listed).
    """
    taken = {n.name for n in model.graph.node} | _tensor_names(model)
    for node in model.graph.node:
        if node.name and not _TF_NAME.match(node.name):
            node.name = _fresh(node.name, taken)
    renames = {name: _fresh(name, taken) for name in sorted(_tensor_names(model)) if name and not _TF_NAME.match(name)}
    if renames:
        _rename_tensors(model.graph, renames)
    return renames


def _tensor_names(model: Any) -> set[str]:
    g = model.graph
    names = {v.name for v in (*g.input, *g.output, *g.value_info, *g.initializer)}
    return names | {t for n in g.node for t in (*n.input, *n.output)}


def _fresh(name: str, taken: set[str]) -> str:
    base = _TF_BAD_CHAR.sub("_", name)
    base = base if _TF_NAME.match(base) else f"n{base}"
    candidate, k = base, 1
    while candidate in taken:
        candidate, k = f"{base}_{k}", k + 1
    taken.add(candidate)
    return candidate


def _rename_tensors(graph: Any, renames: dict[str, str]) -> None:
    for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        v.name = renames.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [renames.get(t, t) for t in node.input]
        node.output[:] = [renames.get(t, t) for t in node.output]


#: Ops that only move or reshape values: a Softmax before them still makes probabilities.
_SHAPE_ONLY = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


def output_kind(model: Any) -> Postprocessing:
    """What the class-score output is: logits, or probabilities from a final (Log)Softmax."""
    producers = {out: n for n in model.graph.node for out in n.output}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type in _SHAPE_ONLY:
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Softmax":
        return Postprocessing.NONE
    if node is not None and node.op_type == "LogSoftmax":
        return Postprocessing.EXP
    return Postprocessing.SOFTMAX


#: Control flow onnx2tf cannot turn into a TFLite graph (and XNNPACK could not run).
LOOPS = ("Loop", "Scan")


def check_no_loops(model: Any, source: str = "model") -> None:
    """Refuse a (simplified) model that still loops: onnxsim unrolls nothing, and onnx2tf fails deep inside."""
    for node in model.graph.node:
        if node.op_type in LOOPS:
            raise InputError(
                f"{source} has a {node.op_type} node ({node.name or 'unnamed'}) after simplification: edgeship "
                "converts graphs without loops; export the model with the loop unrolled (trace a fixed number "
                "of steps) or remove it from the classifier"
            )


def check_scores_output(model: Any, source: str = "model") -> int:
    """The number of classes of a (shape-inferred) model whose output is ``[N, classes]``; else InputError.

    ``[N, classes, 1, 1]`` (a 1x1 convolution head) is accepted too. Checked before onnx2tf,
    so a detector or segmenter is refused at once, not after a minute of conversion.
    """
    shape = _dims(model.graph.output[0])
    if any(isinstance(d, str) for d in shape[1:]):
        return 0  # not inferred: the float verification after onnx2tf still checks the scores
    head = [d for d in shape[2:] if d != 1]
    if len(shape) < 2 or head:
        raise InputError(
            f"{source} output '{model.graph.output[0].name}' has shape {list(shape)}; an image "
            "classifier's output is [N, classes] (class scores)"
        )
    return int(shape[1])
