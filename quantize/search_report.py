"""Sections of :class:`edgeship.quantize.report.QuantizeReport` for the searches and the timings.

Timed placement, the SQNR budget search (with its speed floor), ``--max-drop`` and the speed check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeship.quantize.mixed import Step
from edgeship.quantize.op_groups import Candidate
from edgeship.runtime.delegation import Delegation


def present(d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries that are not None (optional entries are left out of the JSON, not written as null)."""
    return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class Placement:
    """Timed placement: large depthwise convolutions kept float when that measured faster here."""

    enabled: bool
    candidates: int | None = None  # None: not run
    kept_float: bool | None = None
    ms: Mapping[str, float] | None = None  # "int8", "placed" -> fastest invoke (ms)
    min_gain: float | None = None
    nodes: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return present(
            {
                "enabled": self.enabled,
                "candidates": self.candidates,
                "kept_float": self.kept_float,
                "ms": dict(self.ms) if self.ms is not None else None,
                "min_gain": self.min_gain,
                "nodes": list(self.nodes) if self.nodes is not None else None,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Placement:
        nodes = d.get("nodes")
        return cls(
            bool(d["enabled"]),
            d.get("candidates"),
            d.get("kept_float"),
            d.get("ms"),
            d.get("min_gain"),
            tuple(nodes) if nodes is not None else None,
        )


@dataclass(frozen=True)
class KeptLayer:
    """One layer ``--max-drop`` kept float, with the model's figures after keeping it."""

    layer: str
    op: str
    sqnr_db: float
    added_error_db: float
    size_bytes: int
    top1_agreement: float
    top1: float | None
    drop_points: float
    mean_cosine: float


@dataclass(frozen=True)
class AccuracyAware:
    """The ``--max-drop`` search: its budget, what it measures, the layers it kept float and the verdict."""

    max_drop: float | None
    measure: str
    kept_in_float: tuple[KeptLayer, ...] = ()
    within_budget: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_drop": self.max_drop,
            "measure": self.measure,
            "kept_in_float": [dict(k.__dict__) for k in self.kept_in_float],
            "within_budget": self.within_budget,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccuracyAware:
        kept = tuple(KeptLayer(**k) for k in d.get("kept_in_float", ()))
        return cls(d.get("max_drop"), str(d["measure"]), kept, bool(d["within_budget"]))


@dataclass(frozen=True)
class SpeedMeasurement:
    """One timing of the budget search's speed floor (1 thread, XNNPACK, fastest invoke of each)."""

    float_ops: int
    ms: Mapping[str, float]  # "float32", "candidate"
    speedup_vs_float32: float

    def to_dict(self) -> dict[str, Any]:
        return {"float_ops": self.float_ops, "ms": dict(self.ms), "speedup_vs_float32": self.speedup_vs_float32}


@dataclass(frozen=True)
class MixedPrecision:
    """The SQNR budget search (``searched`` False: the all-int8 model met the budget, or mixed models are off).

    ``target_sqnr_db`` is what the search aimed at on calibration images, ``sqnr_db`` what it reached
    there; ``eval_sqnr_db*`` are on the held-apart images. ``latency_ms_1_thread`` comes from the speed check.
    """

    budget_sqnr_db: float
    searched: bool = False
    target_sqnr_db: float | None = None
    all_int8_sqnr_db: float | None = None
    sqnr_db: float | None = None
    within_budget: bool | None = None
    kept_float: tuple[Candidate, ...] = ()
    float_ops: int = 0
    steps: tuple[Step, ...] = ()
    int8_matrix_ceiling_db: float | None = None
    eval_sqnr_db_all_int8: float | None = None
    min_speedup: float | None = None
    speed_measurements: tuple[SpeedMeasurement, ...] = ()
    int8_output_limit_db: float | None = None
    eval_sqnr_db: float | None = None
    delegation: Delegation | None = None
    latency_ms_1_thread: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.searched:
            return {"budget_sqnr_db": self.budget_sqnr_db, "searched": False}
        return present(
            {
                "budget_sqnr_db": self.budget_sqnr_db,
                "target_sqnr_db": self.target_sqnr_db,
                "all_int8_sqnr_db": self.all_int8_sqnr_db,
                "sqnr_db": self.sqnr_db,
                "within_budget": self.within_budget,
                "kept_float": [c.to_dict() for c in self.kept_float],
                "float_ops": self.float_ops,
                "measurements": len(self.steps),
                "steps": [s.to_dict() for s in self.steps],
                "int8_matrix_ceiling_db": self.int8_matrix_ceiling_db,
                "searched": True,
                "eval_sqnr_db_all_int8": self.eval_sqnr_db_all_int8,
                "min_speedup": self.min_speedup,
                "speed_measurements": [m.to_dict() for m in self.speed_measurements],
                "int8_output_limit_db": self.int8_output_limit_db,
                "eval_sqnr_db": self.eval_sqnr_db,
                "delegation": self.delegation.to_dict() if self.delegation is not None else None,
                "latency_ms_1_thread": dict(self.latency_ms_1_thread) if self.latency_ms_1_thread is not None else None,
            }
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixedPrecision:
        plain = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        delegation = d.get("delegation")
        return cls(
            **{
                **plain,
                "kept_float": tuple(Candidate.from_dict(c) for c in d.get("kept_float", ())),
                "steps": tuple(Step.from_dict(s) for s in d.get("steps", ())),
                "speed_measurements": tuple(SpeedMeasurement(**m) for m in d.get("speed_measurements", ())),
                "delegation": Delegation.from_dict(dict(delegation)) if delegation else None,
            }
        )


@dataclass(frozen=True)
class Offered:
    """What the speed check offers instead of a model under the speed floor: all-int8 or float32."""

    kind: str  # "all_int8" or "float32"
    model: str
    ms: float
    speedup_vs_float32: float
    sqnr_db: float | None


@dataclass(frozen=True)
class SpeedCheck:
    """The written model against float32 (and all-int8) at 1 thread on XNNPACK, here (``measured`` False:
    a full-integer model, for NNAPI or DSPs, is not timed)."""

    measured: bool
    ms: Mapping[str, float] = field(default_factory=dict)  # "float32", "int8" (, "all_int8") -> median ms
    speedup_vs_float32: float | None = None
    faster_than_float32: bool | None = None
    min_speedup: float | None = None
    runs: int | None = None
    threads: int = 1
    delegate: str = "xnnpack"
    offered: Offered | None = None
    #: Set when the model is under the speed floor: what is slow and what is offered.
    verdict: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.measured:
            return {"measured": False}
        d = {
            "measured": True,
            "threads": self.threads,
            "delegate": self.delegate,
            "runs": self.runs,
            "ms": dict(self.ms),
            "speedup_vs_float32": self.speedup_vs_float32,
            "faster_than_float32": self.faster_than_float32,
            "min_speedup": self.min_speedup,
            "offered": dict(self.offered.__dict__) if self.offered is not None else None,
        }
        return {**d, **present({"verdict": self.verdict})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeedCheck:
        if not d.get("measured"):
            return cls(False)
        offered = d.get("offered")
        return cls(
            True,
            dict(d["ms"]),
            d["speedup_vs_float32"],
            d.get("faster_than_float32"),
            d.get("min_speedup"),
            d.get("runs"),
            int(d.get("threads", 1)),
            str(d.get("delegate", "xnnpack")),
            Offered(**offered) if offered else None,
            d.get("verdict"),
        )


@dataclass(frozen=True)
class TimedOn:
    """Where the speed decisions (placement, the speed floor, the speed check) were timed: this machine, or
    the target's device (``where``), with its ``uname -m``, Python and interpreter once a model ran there."""

    where: str = "this machine"
    note: str | None = None
    measurements: int = 0
    machine: str | None = None
    python: str | None = None
    interpreter: str | None = None
    interpreter_version: str | None = None
    emulated: bool | str | None = None  # False, or what emulated the device

    def to_dict(self) -> dict[str, Any]:
        ran = {
            "machine": self.machine,
            "python": self.python,
            "interpreter": self.interpreter,
            "interpreter_version": self.interpreter_version,
            "emulated": self.emulated,
        }
        return {"where": self.where, "note": self.note, **present(ran), "measurements": self.measurements}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimedOn:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
