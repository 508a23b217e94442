"""The native worker adapter: TensorFlow's quantizer and a model's first runs, in edgeship's child process.

A model TensorFlow's quantizer wrote but no interpreter has run yet can abort the process
that loads it, so both happen in the child (:class:`edgeship._child.ChildWorker`); only a
model that ran there is run here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from edgeship._child import ChildWorker
from edgeship.errors import CalibrationError
from edgeship.quantize import mixed, tflite_quant
from edgeship.quantize.logits import float_logits
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.report import RunsOn
from edgeship.quantize.result import op_histogram
from edgeship.runtime.delegation import Delegation, of_interpreter, op_counts
from edgeship.runtime.interpreter import TFLiteModel


class Quantizer:
    """``quantized(calibrated, float_nodes=())``: :func:`_quantize_checked`, remembered per model and node
    set (the budget search measures the same set's SQNR and speed, then writes it).

    ``placed``: nodes kept float for speed (:func:`edgeship.quantize.speed.timed_placement`), kept float in
    every model made after.
    """

    def __init__(self, native: ChildWorker, options: QuantizeOptions) -> None:
        self.native, self.options = native, options
        self.placed: tuple[str, ...] = ()
        self.done: dict[tuple[bytes, frozenset[str]], tuple[bytes, RunsOn]] = {}

    def __call__(self, calibrated: bytes, float_nodes: Sequence[str] = ()) -> tuple[bytes, RunsOn]:
        nodes = self._with_placed(float_nodes)
        key = (hashlib.sha256(calibrated).digest(), frozenset(nodes))
        if key not in self.done:
            self.done[key] = _quantize_checked(self.native, calibrated, self.options, nodes)
        return self.done[key]

    def once(self, calibrated: bytes) -> tuple[bytes, RunsOn]:
        """Not remembered: for models made once and dropped (the range choice's fold models)."""
        return _quantize_checked(self.native, calibrated, self.options, self._with_placed(()))

    def _with_placed(self, float_nodes: Sequence[str]) -> tuple[str, ...]:
        return (*self.placed, *(n for n in float_nodes if n not in self.placed))


def _quantize_checked(
    native: ChildWorker, calibrated: bytes, options: QuantizeOptions, denied: Sequence[str] = ()
) -> tuple[bytes, RunsOn]:
    """TensorFlow's quantizer, then a first run on XNNPACK and the reference kernels, both in the child.

    With ``options.float_islands``, normalisations (LayerNorm's elementwise pieces, see
    :func:`edgeship.quantize.mixed.normalization_groups`) stay float, and the ops XNNPACK left
    outside in int8 but runs in float are quantized again as float islands, kept when that
    gives fewer partitions.

    Raises:
        CalibrationError: The model the quantizer wrote does not run on one of them.
    """
    if options.float_islands:  # LayerNorm's pieces float inside XNNPACK, as onnxruntime's QDQ computes them
        denied = [*denied, *(n for n in mixed.normalization_nodes(calibrated) if n not in set(denied))]
    quant, runs = _quantize_once(native, calibrated, options, denied)
    islands = _island_candidates(calibrated, runs.delegation) if options.float_islands else []
    if islands:
        islanded, islanded_runs = _quantize_once(native, calibrated, options, [*denied, *islands])
        if islanded_runs.delegation.partitions < runs.delegation.partitions:
            islanded_runs = replace(islanded_runs, float_islands=tuple(islands), all_int8_delegation=runs.delegation)
            quant, runs = islanded, islanded_runs
    return quant, runs


def _quantize_once(
    native: ChildWorker, calibrated: bytes, options: QuantizeOptions, denied: Sequence[str]
) -> tuple[bytes, RunsOn]:
    quant = native.call(
        "quantize (TensorFlow)",
        tflite_quant.quantize_calibrated,
        calibrated,
        io_dtype=options.io.value,
        per_tensor=options.per_tensor,
        denylisted_nodes=list(denied),
    )
    logits = None
    if options.use_float_logits:
        quant, logits = float_logits(quant)
    runs = native.call("first run of the int8 model", tflite_quant.check_runs, quant)
    broken = [f"{kernels}: {runs[kernels]}" for kernels in ("xnnpack", "reference") if runs[kernels]]
    if broken:
        raise CalibrationError(
            f"the int8 model TensorFlow's quantizer wrote does not run ({'; '.join(broken)}); "
            f"ops: {_op_summary(quant)}; nothing was written"
        )
    return quant, replace(RunsOn.from_dict(runs), float_logits=logits)


def _island_candidates(calibrated: bytes, int8: Delegation) -> list[str]:
    """Ops outside XNNPACK in int8 whose type XNNPACK runs in float (the float model's delegation says)."""
    if int8.partitions <= 1:
        return []
    float_outside = set(of_interpreter(TFLiteModel(calibrated).interpreter).outside)
    ops = tflite_quant.op_names_by_output(calibrated)
    return [name for name in int8.outside_outputs if name in ops and ops[name] not in float_outside]


def _op_summary(model: bytes) -> str:
    return op_counts(op_histogram(model))
