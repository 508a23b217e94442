"""What ``quantize`` measured, as a value: :class:`QuantizeReport` and its sections (``quant_report.json``).

Sections whose contents belong to one step and vary with its method (the range choice, equalization,
bias correction) type the fields readers use and carry the rest as written (``details``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeship._version import SCHEMA_VERSION
from edgeship.quantize.data import ImagesUsed
from edgeship.quantize.layers import LayerError
from edgeship.quantize.options import QuantizeOptions
from edgeship.quantize.search_report import (
    AccuracyAware,
    MixedPrecision,
    Placement,
    SpeedCheck,
    TimedOn,
)
from edgeship.runtime.delegation import Delegation
from edgeship.runtime.metrics import DriftFigures

KIND = "quantize"


@dataclass(frozen=True)
class QuantizeSource:
    """The conversion the model was quantized from."""

    folder: str | None
    float_model: str
    source_model: str | None
    source_sha256: str | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantizeSource:
        return cls(d.get("folder"), str(d["float_model"]), d.get("source_model"), d.get("source_sha256"))


@dataclass(frozen=True)
class RangeReport:
    """The range choice: the method asked for, what ``auto`` chose, and the step's own figures (``details``)."""

    method: str
    tensors: int
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def chosen(self) -> str | None:
        """The method ``auto`` chose (None for a method given by name)."""
        auto = self.details.get("auto") or {}
        return auto.get("chosen")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "tensors": self.tensors, **self.details}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RangeReport:
        rest = {k: v for k, v in d.items() if k not in ("method", "tensors")}
        return cls(str(d["method"]), int(d["tensors"]), rest)


@dataclass(frozen=True)
class StepReport:
    """An optional step (equalization, bias correction): whether it ran, and its own figures."""

    enabled: bool
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, **self.details}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepReport:
        return cls(bool(d["enabled"]), {k: v for k, v in d.items() if k != "enabled"})


@dataclass(frozen=True)
class RunsOn:
    """The written model's first runs: errors on XNNPACK and the reference kernels, and XNNPACK's share.

    ``float_islands``: ops kept float inside XNNPACK because it has no int8 kernel for them (then
    ``all_int8_delegation`` is the delegation without them). ``float_logits``: the output tensor of
    the layer that computes the scores in float (:mod:`edgeship.quantize.logits`), None when int8.
    """

    delegation: Delegation
    xnnpack: str | None = None
    reference: str | None = None
    float_islands: tuple[str, ...] = ()
    all_int8_delegation: Delegation | None = None
    float_logits: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "xnnpack": self.xnnpack,
            "delegation": self.delegation.to_dict(),
            "reference": self.reference,
        }
        if self.float_islands:
            d["float_islands"] = list(self.float_islands)
        if self.all_int8_delegation is not None:
            d["all_int8_delegation"] = self.all_int8_delegation.to_dict()
        d["float_logits"] = self.float_logits
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunsOn:
        all_int8 = d.get("all_int8_delegation")
        return cls(
            Delegation.from_dict(dict(d["delegation"])),
            d.get("xnnpack"),
            d.get("reference"),
            tuple(d.get("float_islands", ())),
            Delegation.from_dict(dict(all_int8)) if all_int8 else None,
            d.get("float_logits"),
        )


@dataclass(frozen=True)
class Sizes:
    """Bytes of the float32 and the int8 model, and their ratio."""

    float32: int
    int8: int
    ratio: float

    @classmethod
    def of(cls, float32: int, int8: int) -> Sizes:
        return cls(float32, int8, round(float32 / int8, 2))

    def to_dict(self) -> dict[str, Any]:
        return {"float32": self.float32, "int8": self.int8, "ratio": self.ratio}


@dataclass(frozen=True)
class Accuracy:
    """Top-1 (and top-5) against the evaluation images' labels, float and int8 (``labelled`` 0: no labels)."""

    labelled: int = 0
    float_top1: float | None = None
    int8_top1: float | None = None
    top1_drop_points: float | None = None
    float_top5: float | None = None
    int8_top5: float | None = None

    @classmethod
    def of(cls, figs: DriftFigures, labelled: int) -> Accuracy:
        """From the evaluation figures and how many of those images have a known label."""
        if not labelled or figs.ref_top1 is None:
            return cls()
        return cls(labelled, figs.ref_top1, figs.cand_top1, figs.top1_drop, figs.ref_top5, figs.cand_top5)

    def to_dict(self) -> dict[str, Any]:
        if not self.labelled:
            return {"labelled": 0}
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Accuracy:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Interface:
    """The input/output rewrite of a quantized model to another dtype (exact: no second calibration)."""

    rewritten_from: str
    to: str
    exact: bool = True


@dataclass(frozen=True)
class QuantizeReport:
    """Images, ranges, placement, figures, budget searches, speed, sizes, versions and timings of one quantization.

    ``output`` is the model file written (``model_int8.tflite``, or ``model_int8_OVER_BUDGET.tflite``
    when a budget was not met); ``interface`` is set on a model whose input/output was rewritten.
    """

    source: QuantizeSource
    options: QuantizeOptions
    calibration: ImagesUsed
    evaluation: ImagesUsed
    ranges: RangeReport
    rewrites: Mapping[str, int]
    runs_on: RunsOn
    placement: Placement
    equalization: StepReport
    bias_correction: StepReport
    figures: DriftFigures
    sizes: Sizes
    ops: Mapping[str, int]
    worst_layers: tuple[LayerError, ...]
    layer_count: int
    accuracy: Accuracy
    accuracy_aware: AccuracyAware
    mixed_precision: MixedPrecision | None
    speed: SpeedCheck
    output: str
    versions: Mapping[str, str | None]
    timings_s: Mapping[str, float] = field(default_factory=dict)  # step -> seconds, and "total"
    interface: Interface | None = None
    #: Where the speed decisions were timed (None: not recorded, this machine).
    speed_timing: TimedOn | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "edgeship_report": KIND,
            "schema_version": SCHEMA_VERSION,
            "source": dict(self.source.__dict__),
            "options": self.options.to_dict(),
            "calibration": self.calibration.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "ranges": self.ranges.to_dict(),
            "rewrites": dict(self.rewrites),
            "runs_on": self.runs_on.to_dict(),
            "placement": self.placement.to_dict(),
            "equalization": self.equalization.to_dict(),
            "bias_correction": self.bias_correction.to_dict(),
            "figures": self.figures.to_dict(),
            "sizes": self.sizes.to_dict(),
            "ops": dict(self.ops),
            "worst_layers": [e.to_dict() for e in self.worst_layers],
            "layer_count": self.layer_count,
            "accuracy": self.accuracy.to_dict(),
            "accuracy_aware": self.accuracy_aware.to_dict(),
            "mixed_precision": self.mixed_precision.to_dict() if self.mixed_precision is not None else {},
            "speed": self.speed.to_dict(),
            "output": self.output,
            "versions": dict(self.versions),
            "timings_s": dict(self.timings_s),
        }
        if self.speed_timing is not None:
            d["speed_timing"] = self.speed_timing.to_dict()
        return {**d, **({"interface": dict(self.interface.__dict__)} if self.interface is not None else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantizeReport:
        mixed, interface, timed = d.get("mixed_precision"), d.get("interface"), d.get("speed_timing")
        return cls(
            source=QuantizeSource.from_dict(d["source"]),
            options=QuantizeOptions.from_dict(dict(d["options"])),
            calibration=ImagesUsed.from_dict(d["calibration"]),
            evaluation=ImagesUsed.from_dict(d["evaluation"]),
            ranges=RangeReport.from_dict(d["ranges"]),
            rewrites=dict(d.get("rewrites", {})),
            runs_on=RunsOn.from_dict(d["runs_on"]),
            placement=Placement.from_dict(d["placement"]),
            equalization=StepReport.from_dict(d["equalization"]),
            bias_correction=StepReport.from_dict(d["bias_correction"]),
            figures=DriftFigures.from_dict(d["figures"]),
            sizes=Sizes(**d["sizes"]),
            ops=dict(d["ops"]),
            worst_layers=tuple(LayerError.from_dict(e) for e in d["worst_layers"]),
            layer_count=int(d["layer_count"]),
            accuracy=Accuracy.from_dict(d["accuracy"]),
            accuracy_aware=AccuracyAware.from_dict(d["accuracy_aware"]),
            mixed_precision=MixedPrecision.from_dict(mixed) if mixed else None,
            speed=SpeedCheck.from_dict(d["speed"]),
            output=str(d["output"]),
            versions=dict(d["versions"]),
            timings_s=dict(d.get("timings_s", {})),
            interface=Interface(**interface) if interface else None,
            speed_timing=TimedOn.from_dict(timed) if timed else None,
        )
