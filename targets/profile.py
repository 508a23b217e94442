"""Target profiles: typed, validated data loaded from TOML files.

A profile says what a device needs (CPU architecture, runtime package and the version
range that has wheels for it, model precision and I/O dtype, threads, delegate), how it
is reached (local, ssh, adb) and its accuracy-drift budget. Profiles ship as
``targets/*.toml``; a path to another TOML file works too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

try:
    import tomllib
except ImportError:  # Python < 3.11 (Raspberry Pi OS bullseye)
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import MISSING, asdict, dataclass, fields
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeship._paths import name_problem
from edgeship.errors import TargetError
from edgeship.runtime.card import IODtype as IODtype  # one I/O dtype vocabulary for targets and the quantizer

if TYPE_CHECKING:
    from edgeship.runtime.metrics import DriftFigures


class Arch(str, Enum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"
    ARMV7L = "armv7l"


class Precision(str, Enum):
    INT8 = "int8"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Delegate(str, Enum):
    XNNPACK = "xnnpack"
    GPU = "gpu"
    NNAPI = "nnapi"
    NONE = "none"


class Client(str, Enum):
    """What loads the model on the device, which decides its I/O dtypes and metadata.

    ``edgeship``: edgeship's own Python runtime (reads the model card). ``mediapipe``: an
    Android app with MediaPipe Tasks' ``ImageClassifier`` or the plain LiteRT
    ``Interpreter``: it reads the model's embedded TFLite Metadata (normalisation, labels),
    feeds an int8 model uint8 pixels and reads uint8 or float32 scores.
    """

    EDGESHIP = "edgeship"
    MEDIAPIPE = "mediapipe"

    @property
    def reads_metadata(self) -> bool:
        return self == Client.MEDIAPIPE


class Access(str, Enum):
    LOCAL = "local"
    SSH = "ssh"
    ADB = "adb"


@dataclass(frozen=True)
class Runtime:
    """The interpreter package a device installs, and the versions with wheels for it."""

    package: str
    versions: str
    python: str
    note: str = ""
    client: Client = Client.EDGESHIP
    #: Debian packages that provide numpy and Pillow on the device (``sudo apt install``; the venv then
    #: uses ``--system-site-packages``); empty: both come from PyPI.
    system_packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.system_packages, (list, tuple)) or not all(
            isinstance(p, str) and p for p in self.system_packages
        ):
            raise ValueError(f"runtime.system_packages must be a list of package names, got {self.system_packages!r}")
        object.__setattr__(self, "system_packages", tuple(self.system_packages))
        try:
            object.__setattr__(self, "client", Client(self.client))
        except ValueError:
            raise ValueError(
                f"runtime.client must be one of {[c.value for c in Client]}, got {self.client!r}"
            ) from None
        # Both go into a bundle's requirements.txt: a requirement, never a line of pip options.
        if not _PACKAGE.fullmatch(self.package):
            raise ValueError(
                f"runtime.package must be a package name (letters, digits, '.', '_', '-'), got {self.package!r}"
            )
        if not _VERSIONS.fullmatch(self.versions):
            raise ValueError(
                f"runtime.versions must be PEP 440 version specifiers such as '>=2.1,<2.4', got {self.versions!r}"
            )


@dataclass(frozen=True)
class ModelNeeds:
    """What model the target runs."""

    precision: Precision
    io_dtype: IODtype
    int8_only: bool
    per_tensor: bool = False
    #: Keep ops XNNPACK has no int8 kernel for in float (quantize's default); false: full-integer (NNAPI, DSPs).
    float_islands: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "io_dtype", IODtype(self.io_dtype))
        if self.precision != Precision.INT8 and self.io_dtype != IODtype.FLOAT32:
            raise ValueError(f"a {self.precision.value} model has float32 I/O, not {self.io_dtype.value}")

    def fits_io(self, input_dtype: str, output_dtype: str) -> bool:
        """Whether a model of this I/O suits the target: its I/O dtype, or float32 scores (float logits) where
        mixed models are allowed."""
        want = self.io_dtype.value
        float_logits = self.float_islands and output_dtype == IODtype.FLOAT32.value
        return input_dtype == want and (output_dtype == want or float_logits)


@dataclass(frozen=True)
class Execution:
    threads: int
    delegate: Delegate

    def __post_init__(self) -> None:
        object.__setattr__(self, "delegate", Delegate(self.delegate))
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def use_xnnpack(self) -> bool:
        """Whether edgeship's runtime uses XNNPACK for this target (GPU/NNAPI run on the CPU off-device)."""
        return self.delegate == Delegate.XNNPACK


@dataclass(frozen=True)
class BudgetCheck:
    """One budget line: the measured value, the limit, and whether it passed."""

    metric: str
    value: float | None
    limit: float
    passed: bool
    note: str = ""
    #: The value's 95 % confidence interval (None: not a count, e.g. SQNR, or no labels).
    interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.interval is not None:  # a JSON list read back
            object.__setattr__(self, "interval", (float(self.interval[0]), float(self.interval[1])))

    @property
    def within_noise(self) -> bool:
        """The limit lies inside the value's interval: another image set of this size could flip the line."""
        return self.interval is not None and self.interval[0] <= self.limit <= self.interval[1]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["interval"] = list(self.interval) if self.interval is not None else None
        d["within_noise"] = self.within_noise
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BudgetCheck:
        return cls(**{k: v for k, v in d.items() if k != "within_noise"})


@dataclass(frozen=True)
class Budget:
    """Accuracy-drift budget of the deployed model against the float reference.

    ``min_top1_agreement`` 0 gives a budget on SQNR alone (useful where logits are full of
    near-ties, e.g. models with random weights).
    """

    min_top1_agreement: float  # percent
    max_top1_drop: float  # accuracy points, when labels are known
    min_sqnr_db: float
    #: Speed floor of mixed models: quantize keeps nothing float that brings the model under this
    #: many times float32's speed (1 thread, XNNPACK, measured on the host that quantizes).
    min_speedup: float = 1.3

    def __post_init__(self) -> None:
        if not 0 <= self.min_top1_agreement <= 100:
            raise ValueError(f"min_top1_agreement is a percentage, got {self.min_top1_agreement}")
        for key in ("max_top1_drop", "min_sqnr_db", "min_speedup"):  # NaN would pass every budget check
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"budget {key} must be a finite number, got {value!r}")

    def check(self, figures: DriftFigures) -> list[BudgetCheck]:
        """Every budget line against drift figures (:class:`~edgeship.runtime.metrics.DriftFigures`)."""
        agreement = figures.agreement_pct
        checks = [
            BudgetCheck(
                "top1_agreement_pct",
                agreement,
                self.min_top1_agreement,
                agreement >= self.min_top1_agreement,
                interval=figures.agreement_interval,
            ),
            BudgetCheck("sqnr_db", figures.sqnr_db, self.min_sqnr_db, figures.sqnr_db >= self.min_sqnr_db),
        ]
        drop = figures.top1_drop
        if drop is None:
            return [*checks, BudgetCheck("top1_drop_points", None, self.max_top1_drop, True, "no labels: not checked")]
        step = 100.0 / max(figures.count, 1)
        # A drop is counted in whole images: on a small set one image can be most of the budget.
        note = f"{figures.count} images: one image is {step:.2f} pt" if step > self.max_top1_drop / 2 else ""
        passed = drop <= self.max_top1_drop
        interval = figures.top1_drop_interval
        return [*checks, BudgetCheck("top1_drop_points", drop, self.max_top1_drop, passed, note, interval)]


@dataclass(frozen=True)
class Target:
    """One deployment target."""

    name: str
    description: str
    arch: Arch
    access: Access
    runtime: Runtime
    model: ModelNeeds
    execution: Execution
    budget: Budget
    source: str = ""

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:  # it names the target's folders (deploy's verify/NAME, bundles/NAME)
            raise ValueError(f"name {problem}")
        object.__setattr__(self, "arch", Arch(self.arch))
        object.__setattr__(self, "access", Access(self.access))
        client, io = self.runtime.client, self.model.io_dtype
        if client == Client.MEDIAPIPE and self.model.precision == Precision.INT8 and io != IODtype.UINT8:
            raise ValueError(
                f"a {client.value} client feeds an int8 model uint8 pixels and reads uint8 or "
                f"float32 scores: model.io_dtype must be uint8, got {io.value}"
            )

    def pip_requirements(self) -> list[str]:
        """What ``pip install`` needs on the device to run a bundle (Python targets only)."""
        if self.access == Access.ADB:
            raise TargetError(
                f"target {self.name} runs without Python (benchmark_model or an app); it has no pip requirements"
            )
        from_pypi = [] if self.runtime.system_packages else ["numpy>=1.23,<2", "Pillow>=9"]
        return [*from_pypi, f"{self.runtime.package}{self.runtime.versions}"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = self.arch.value
        d["access"] = self.access.value
        d["runtime"]["client"] = self.runtime.client.value
        d["runtime"]["system_packages"] = list(self.runtime.system_packages)  # as JSON reads it back
        d["model"]["precision"] = self.model.precision.value
        d["model"]["io_dtype"] = self.model.io_dtype.value
        d["execution"]["delegate"] = self.execution.delegate.value
        return d


#: A PEP 508 distribution name, and a comma-separated list of PEP 440 version specifiers (or none).
_PACKAGE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSIONS = re.compile(
    r"((~=|==|!=|<=|>=|<|>|===) ?[A-Za-z0-9.*+!_-]+( ?, ?(~=|==|!=|<=|>=|<|>|===) ?[A-Za-z0-9.*+!_-]+)*)?"
)
_SECTIONS: dict[str, type] = {"runtime": Runtime, "model": ModelNeeds, "execution": Execution, "budget": Budget}
_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _typed(cls: type, data: Any, where: str, source: str, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TargetError(f"{source}: [{where}] must be a table")
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    for key in data:
        if key not in known:
            raise TargetError(f"{source}: unknown key '{where}.{key}' (valid: {', '.join(known)})")
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING:
                raise TargetError(f"{source}: missing key '{where}.{name}'")
            continue
        want = _expected_type(f.type)
        value = data[name]
        if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise TargetError(
                f"{source}: key '{where}.{name}' must be {f.type.lower()}, got {type(value).__name__} {value!r}"
            )
    return dict(data)


def _expected_type(annotation: Any) -> Any:
    text = str(annotation)
    for name, typ in _TYPES.items():
        if text == name:
            return typ
    return str if text in {"Arch", "Access", "Precision", "IODtype", "Delegate", "Client"} else None


def parse_target(data: dict[str, Any], source: str) -> Target:
    """Build a validated :class:`Target` from parsed TOML data."""
    top = _typed(
        Target,
        {k: v for k, v in data.items() if k not in _SECTIONS},
        "target",
        source,
        skip=frozenset(_SECTIONS) | {"source"},
    )
    for section in _SECTIONS:
        if section not in data:
            raise TargetError(f"{source}: missing section [{section}]")
    try:
        parts = {s: cls(**_typed(cls, data[s], s, source)) for s, cls in _SECTIONS.items()}
        return Target(**top, **parts, source=source)
    except ValueError as exc:
        raise TargetError(f"{source}: {exc}") from exc


def _builtin_files() -> dict[str, Any]:
    root = resources.files("edgeship.targets")
    return {p.name[:-5]: p for p in root.iterdir() if p.name.endswith(".toml")}


def list_targets() -> list[str]:
    """Names of the built-in targets."""
    return sorted(_builtin_files())


def load_target(name_or_path: str | Path) -> Target:
    """Load a built-in target by name, or a TOML profile by path.

    Raises:
        TargetError: Unknown name (the message lists the valid ones) or an invalid file.
    """
    text_name = str(name_or_path)
    builtin = _builtin_files()
    if text_name in builtin:
        source, text = f"targets/{text_name}.toml", builtin[text_name].read_text(encoding="utf-8")
    elif text_name.endswith(".toml") or Path(text_name).is_file():
        path = Path(text_name)
        if not path.is_file():
            raise TargetError(f"target file {path} does not exist")
        try:
            source, text = str(path), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TargetError(f"cannot read target file {path} as UTF-8 text: {exc}") from None
    else:
        raise TargetError(
            f"unknown target '{text_name}'; valid targets: {', '.join(sorted(builtin))} (or a path to a .toml profile)"
        )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{source}: not valid TOML: {exc}") from exc
    target = parse_target(data, source)
    if text_name in builtin and target.name != text_name:
        raise TargetError(f"{source}: name '{target.name}' does not match the file name")
    return target
