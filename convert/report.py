"""What ``convert`` measured, as a value: :class:`ConvertReport` and its sections (``convert_report.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeship._version import SCHEMA_VERSION
from edgeship.convert.onnx_model import ModelInfo
from edgeship.reference import Tolerance
from edgeship.runtime.card import Layout, Preprocessing
from edgeship.runtime.delegation import Delegation
from edgeship.runtime.metrics import DriftFigures

KIND = "convert"


@dataclass(frozen=True)
class ConvertSource:
    """The ONNX model converted: where it was, its digest and size, and its interface."""

    path: str
    sha256: str
    bytes: int
    model: ModelInfo

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, **self.model.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvertSource:
        info = ModelInfo(
            str(d["input_name"]),
            tuple(d["input_shape"]),
            Layout(d["layout"]),
            str(d["output_name"]),
            tuple(d["output_shape"]),
            int(d["opset"]),
            int(d["ir_version"]),
            int(d.get("initializer_inputs", 0)),
        )
        return cls(str(d["path"]), str(d["sha256"]), int(d["bytes"]), info)


@dataclass(frozen=True)
class NodeCounts:
    """ONNX ops by type before and after simplification."""

    before: Mapping[str, int]
    after: Mapping[str, int]
    total_before: int
    total_after: int


@dataclass(frozen=True)
class SimplifyCheck:
    """onnxruntime on the original against the simplified (and folded) model, on a few inputs."""

    count: int
    max_abs_error: float
    mean_cosine: float
    top1_agreement: float


@dataclass(frozen=True)
class FloatCheck:
    """One float TFLite against onnxruntime: the figures, the tolerance and the verdict."""

    figures: DriftFigures
    tolerance: Tolerance
    agreement_enforced: bool
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        figures = self.figures.to_dict()
        figures.pop("disagreements")
        return {
            **figures,
            "disagreement_indices": list(self.figures.disagreements)[:50],
            "tolerance": self.tolerance.to_dict(),
            "agreement_enforced": self.agreement_enforced,
            "passed": self.passed,
            "failures": list(self.failures),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FloatCheck:
        figures = DriftFigures.from_dict({**d, "disagreements": d.get("disagreement_indices", ())})
        return cls(figures, Tolerance(**d["tolerance"]), bool(d["agreement_enforced"]), tuple(d["failures"]))


@dataclass(frozen=True)
class VerificationInputs:
    """What the float models were verified on: real images from a folder, or generated inputs."""

    source: str  # "images" or "synthetic"
    count: int
    folder: str | None
    skipped_files: int


@dataclass(frozen=True)
class ChildRun:
    """The onnx2tf child process: wall time, peak memory and exit status."""

    wall_s: float
    peak_rss_mb: float
    returncode: int


@dataclass(frozen=True)
class ConvertReport:
    """Fixes, checks, delegation, sizes, versions and timings of one conversion."""

    source: ConvertSource
    fixes: tuple[str, ...]
    input_shape_onnx: tuple[int, ...]
    node_counts: NodeCounts
    simplify_check: SimplifyCheck
    graph_cleanups: Mapping[str, int]
    xnnpack: Delegation
    verification: Mapping[str, FloatCheck]  # precision -> check
    verification_inputs: VerificationInputs
    preprocessing: Preprocessing
    preprocessing_of_source: Preprocessing
    sizes: Mapping[str, int]  # file (or "onnx") -> bytes
    onnx2tf_child: ChildRun
    versions: Mapping[str, str | None]
    timings_s: Mapping[str, float] = field(default_factory=dict)  # stage -> seconds, and "total"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.verification.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "edgeship_report": KIND,
            "schema_version": SCHEMA_VERSION,
            "source": self.source.to_dict(),
            "fixes": list(self.fixes),
            "input_shape_onnx": list(self.input_shape_onnx),
            "layout": {"onnx": Layout.NCHW.value, "tflite": Layout.NHWC.value},
            "node_counts": {
                "before": dict(self.node_counts.before),
                "after": dict(self.node_counts.after),
                "total_before": self.node_counts.total_before,
                "total_after": self.node_counts.total_after,
            },
            "simplify_check": asdict(self.simplify_check),
            "graph_cleanups": dict(self.graph_cleanups),
            "xnnpack": self.xnnpack.to_dict(),
            "verification": {k: v.to_dict() for k, v in self.verification.items()},
            "verification_inputs": asdict(self.verification_inputs),
            "preprocessing": self.preprocessing.to_dict(),
            "preprocessing_of_source": self.preprocessing_of_source.to_dict(),
            "sizes": dict(self.sizes),
            "onnx2tf_child": asdict(self.onnx2tf_child),
            "versions": dict(self.versions),
            "timings_s": dict(self.timings_s),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvertReport:
        return cls(
            source=ConvertSource.from_dict(d["source"]),
            fixes=tuple(d["fixes"]),
            input_shape_onnx=tuple(d["input_shape_onnx"]),
            node_counts=NodeCounts(**d["node_counts"]),
            simplify_check=SimplifyCheck(**d["simplify_check"]),
            graph_cleanups=dict(d["graph_cleanups"]),
            xnnpack=Delegation.from_dict(d["xnnpack"]),
            verification={k: FloatCheck.from_dict(v) for k, v in d["verification"].items()},
            verification_inputs=VerificationInputs(**d["verification_inputs"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            preprocessing_of_source=Preprocessing.from_dict(d["preprocessing_of_source"]),
            sizes=dict(d["sizes"]),
            onnx2tf_child=ChildRun(**d["onnx2tf_child"]),
            versions=dict(d["versions"]),
            timings_s=dict(d.get("timings_s", {})),
        )
