"""What a drift check measured, as a value: :class:`DriftReport` and its sections (``drift_report.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeship._version import SCHEMA_VERSION
from edgeship.runtime.bench_report import RuntimeInfo
from edgeship.runtime.metrics import DriftFigures
from edgeship.targets.mediapipe_check import ClientDrift
from edgeship.targets.profile import BudgetCheck, Target

KIND = "drift"


@dataclass(frozen=True)
class DriftTarget:
    """The target the check judged by: its name and architecture, and the whole profile as written."""

    name: str
    arch: str
    profile: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, target: Target) -> DriftTarget:
        return cls(target.name, target.arch.value, target.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {**self.profile, "name": self.name, "arch": self.arch}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftTarget:
        return cls(str(d["name"]), str(d.get("arch", "?")), dict(d))


@dataclass(frozen=True)
class DriftReference:
    """The float model the candidate is compared with."""

    model: str
    runtime: str = "onnxruntime"


@dataclass(frozen=True)
class DriftCandidate:
    """The deployed model, and how and where it ran (``runtime`` is the device runtime's own description)."""

    model: str
    precision: str
    runtime: RuntimeInfo
    ran_on: str

    @property
    def image_path(self) -> str | None:
        """How the device runtime read the images (the reference saw the same pixels)."""
        return self.runtime.image_path

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "precision": self.precision,
            "runtime": self.runtime.to_dict(),
            "ran_on": self.ran_on,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftCandidate:
        runtime = RuntimeInfo.from_dict(d.get("runtime", {}))
        return cls(str(d["model"]), str(d["precision"]), runtime, str(d.get("ran_on", "?")))


@dataclass(frozen=True)
class DriftImages:
    """The images both models ran on."""

    folder: str
    count: int
    skipped_files: int
    labelled: int


@dataclass(frozen=True)
class DriftReport:
    """Figures, budget lines and where the check ran; ``passed`` is the verdict (budget and I/O)."""

    target: DriftTarget
    reference: DriftReference
    candidate: DriftCandidate
    images: DriftImages
    figures: DriftFigures
    budget: tuple[BudgetCheck, ...]
    io_problems: tuple[str, ...]
    notes: tuple[str, ...]
    passed: bool
    #: The app's own client path (MediaPipe Tasks), for targets whose client reads metadata.
    client_check: ClientDrift | None = None

    @property
    def within_noise(self) -> tuple[str, ...]:
        """The budget lines whose limit lies inside their figure's 95 % interval (the verdict could flip)."""
        return tuple(c.metric for c in self.budget if c.within_noise)

    @property
    def verdict(self) -> str:
        """PASS or FAIL, and "(within noise of the budget: ...)" when a deciding line's interval holds its limit."""
        word = "PASS" if self.passed else "FAIL"
        failing = [c for c in self.budget if not c.passed]
        if self.passed:
            deciding = [c for c in self.budget if c.within_noise]
        else:  # a FAIL is within noise only when every line that failed is, and no I/O problem failed it
            noisy = failing and all(c.within_noise for c in failing) and not self.io_problems
            deciding = failing if noisy else []
        if not deciding:
            return word
        return f"{word} (within noise of the budget: {', '.join(c.metric for c in deciding)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "edgeship_report": KIND,
            "schema_version": SCHEMA_VERSION,
            "target": self.target.to_dict(),
            "reference": {"model": self.reference.model, "runtime": self.reference.runtime},
            "candidate": self.candidate.to_dict(),
            "images": {
                "folder": self.images.folder,
                "count": self.images.count,
                "skipped_files": self.images.skipped_files,
                "labelled": self.images.labelled,
            },
            "figures": self.figures.to_dict(),
            "budget": [c.to_dict() for c in self.budget],
            "io_problems": list(self.io_problems),
            "notes": list(self.notes),
            "passed": self.passed,
            "verdict": self.verdict,
            "within_noise": list(self.within_noise),
            "client_check": self.client_check.to_dict() if self.client_check else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftReport:
        client = d.get("client_check")
        return cls(
            target=DriftTarget.from_dict(d["target"]),
            reference=DriftReference(**d["reference"]),
            candidate=DriftCandidate.from_dict(d["candidate"]),
            images=DriftImages(**d["images"]),
            figures=DriftFigures.from_dict(d["figures"]),
            budget=tuple(BudgetCheck.from_dict(c) for c in d["budget"]),
            io_problems=tuple(d.get("io_problems", ())),
            notes=tuple(d.get("notes", ())),
            passed=bool(d["passed"]),
            client_check=ClientDrift.from_dict(client) if client else None,
        )
