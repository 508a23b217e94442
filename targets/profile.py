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
from dataclasses import MISSING, asdict, dataclass, fields, replace
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
    #: Where the interpreter package comes from: ``pip`` (a requirements.txt line) or ``apt`` (one of
    #: ``system_packages``; requirements.txt then names only the edgeship wheel and what pip adds).
    source: str = "pip"

    def __post_init__(self) -> None:
        if not isinstance(self.system_packages, (list, tuple)) or not all(
            isinstance(p, str) and p for p in self.system_packages
        ):
            raise ValueError(f"runtime.system_packages must be a list of package names, got {self.system_packages!r}")
        object.__setattr__(self, "system_packages", tuple(self.system_packages))
        if self.source not in ("pip", "apt"):
            raise ValueError(f"runtime.source must be 'pip' or 'apt', got {self.source!r}")
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


#: The ``model_format`` of a release that runs edgeship's int8 ONNX QDQ model on onnxruntime.
ONNX_QDQ = "onnx-qdq"


@dataclass(frozen=True)
class Release:
    """One OS release a Python target runs on (``[[release]]`` in its profile) and what ran there.

    Attributes:
        name: Debian/Raspberry Pi OS codename (``/etc/os-release`` ``VERSION_CODENAME``), e.g. ``trixie``.
        python: The release's ``python3`` (major.minor), e.g. ``3.13``.
        verified: What ran there and passed (words, emulated or not); empty: never verified.
        package: The runtime package on this release when it differs from ``[runtime]``'s.
        versions: Its version specifiers (with ``package``).
        source: Where the runtime comes from: ``pip`` (PyPI wheels) or ``apt`` (the OS's package).
        system_packages: Debian packages the README asks for on this release (default: ``[runtime]``'s).
        model_format: The model form its runtime runs: ``tflite`` or ``onnx-qdq``.
        refuse: Why the target cannot run a model here and what to use instead (one line); empty: it can.
    """

    name: str
    python: str
    verified: str = ""
    package: str = ""
    versions: str = ""
    source: str = "pip"
    system_packages: tuple[str, ...] | None = None
    model_format: str = "tflite"
    refuse: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", self.name):
            raise ValueError(f"release.name must be an OS codename such as 'trixie', got {self.name!r}")
        if not re.fullmatch(r"3\.\d+", self.python):
            raise ValueError(f"release.python must be major.minor such as '3.13', got {self.python!r}")
        if self.source not in ("pip", "apt"):
            raise ValueError(f"release.source must be 'pip' or 'apt', got {self.source!r}")
        if self.model_format not in ("tflite", ONNX_QDQ):
            raise ValueError(f"release.model_format must be 'tflite' or 'onnx-qdq', got {self.model_format!r}")
        if self.system_packages is not None:
            object.__setattr__(self, "system_packages", tuple(self.system_packages))

    def describe(self, base: Runtime) -> str:
        """One line: the runtime on this release and what ran there (``targets show``, the report, the docs)."""
        rt = self.runtime(base)
        ran = f"refused: {self.refuse}" if self.refuse else f"verified: {self.verified or 'not yet'}"
        return f"Python {self.python}, {rt.package}{rt.versions} from {self.source}, {self.model_format} model; {ran}"

    def runtime(self, base: Runtime) -> Runtime:
        """``base`` with this release's package, versions and OS packages."""
        return Runtime(
            package=self.package or base.package,
            versions=self.versions if self.package else base.versions,
            python=f"=={self.python}.*",
            note=base.note,
            client=base.client,
            system_packages=base.system_packages if self.system_packages is None else self.system_packages,
            source=self.source,
        )


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
    #: The OS releases the target names, oldest first (``[[release]]``); empty: any.
    releases: tuple[Release, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "releases", tuple(r if isinstance(r, Release) else Release(**r) for r in self.releases)
        )
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
        """What ``pip install`` needs on the device to run a bundle (Python targets only).

        numpy < 2 only beside tflite-runtime (2.14 fails at ``Interpreter()`` under numpy 2); the rest
        asks for what has wheels on every device Python the target names.
        """
        if self.access == Access.ADB:
            raise TargetError(
                f"target {self.name} runs without Python (benchmark_model or an app); it has no pip requirements"
            )
        tflite_runtime = self.runtime.package == "tflite-runtime"
        numpy = "numpy>=1.23,<2" if tflite_runtime else "numpy>=1.23.2"
        if self.runtime.system_packages:  # numpy and Pillow from the OS; the cap still holds beside tflite-runtime
            from_pypi = [numpy] if tflite_runtime else []
        else:
            from_pypi = [numpy, "Pillow>=9"]
        if self.runtime.source == "apt":  # the interpreter is the OS's: pip sees it through the venv
            return from_pypi
        return [*from_pypi, f"{self.runtime.package}{self.runtime.versions}"]

    def release(self, name: str) -> Release:
        """The profile's entry for OS release ``name``; an unknown one lists the valid ones."""
        for r in self.releases:
            if r.name == name:
                return r
        valid = ", ".join(r.name for r in self.releases) or "none"
        raise TargetError(f"target {self.name} names no OS release {name!r}; valid: {valid}")

    def release_for(self, codename: str | None, python: str | None) -> Release | None:
        """The release a device runs, by its ``VERSION_CODENAME``, else by its Python's major.minor."""
        minor = ".".join((python or "").split(".")[:2])
        found = [r for r in self.releases if r.name == codename] or [r for r in self.releases if r.python == minor]
        return found[0] if found else None

    def on_release(self, release: Release | None) -> Target:
        """This target as it runs on ``release`` (its runtime); a release it refuses raises one line.

        Raises:
            TargetError: The release's ``refuse`` line (no runtime there carries the model).
        """
        if release is None:
            return self
        if release.refuse:
            raise TargetError(f"target {self.name} on {release.name} (Python {release.python}): {release.refuse}")
        return replace(self, runtime=release.runtime(self.runtime))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch"] = self.arch.value
        d["access"] = self.access.value
        d["runtime"]["client"] = self.runtime.client.value
        d["runtime"]["system_packages"] = list(self.runtime.system_packages)  # as JSON reads it back
        d["model"]["precision"] = self.model.precision.value
        d["model"]["io_dtype"] = self.model.io_dtype.value
        d["execution"]["delegate"] = self.execution.delegate.value
        d["releases"] = [  # as JSON reads it back: lists, not tuples
            {**r, "system_packages": None if r["system_packages"] is None else list(r["system_packages"])}
            for r in d["releases"]
        ]
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


#: A Debian package name (Debian Policy 5.6.1): a-z, 0-9, '+', '-', '.'; two or more, alphanumeric first.
_DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
#: Free text of a profile (description, notes) is one line of at most this many characters.
MAX_TEXT = 500
#: Interpreter threads a profile may ask for: more is no device edgeship targets, and hangs a runtime.
MAX_THREADS = 64


def check_profile_data(data: Any, source: str) -> None:
    """A profile's values are data, never markup or commands, validated by their grammar at load.

    Debian package names by Debian's grammar (they go into an ``apt install`` line); every string,
    whatever its key, one line without control characters (it is rendered in Markdown, HTML and
    terminals); budgets finite and not negative; interpreter threads 1 to :data:`MAX_THREADS`.

    Raises:
        TargetError: The first value that breaks a rule, named by its key.
    """
    for key, value in _leaves(data, ""):
        problem = _value_problem(key, value)
        if problem:
            raise TargetError(f"{source}: key '{key}' {problem}")


def _leaves(data: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, list):
        return [(prefix, v) for v in data]
    return [(prefix, data)]


def _value_problem(key: str, value: Any) -> str | None:
    if isinstance(value, str):
        if key == "runtime.system_packages" and not _DEBIAN_PACKAGE.fullmatch(value):
            return f"must hold Debian package names (a-z, 0-9, '+', '-', '.'), got {value!r}"
        if any(not c.isprintable() for c in value):
            return f"must be one line of text without control characters, got {value!r}"
        return f"is longer than {MAX_TEXT} characters" if len(value) > MAX_TEXT else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if key == "execution.threads" and not 1 <= value <= MAX_THREADS:
        return f"must be 1 to {MAX_THREADS} interpreter threads, got {value}"
    if key.startswith("budget.") and (not math.isfinite(value) or value < 0):
        return f"must be a finite number, not negative, got {value}"
    return None


def parse_target(data: dict[str, Any], source: str) -> Target:
    """Build a validated :class:`Target` from parsed TOML data."""
    check_profile_data(data, source)
    top = _typed(
        Target,
        {k: v for k, v in data.items() if k not in _SECTIONS and k != "release"},
        "target",
        source,
        skip=frozenset(_SECTIONS) | {"source", "releases"},
    )
    for section in _SECTIONS:
        if section not in data:
            raise TargetError(f"{source}: missing section [{section}]")
    releases = data.get("release", [])
    if not isinstance(releases, list):
        raise TargetError(f"{source}: [[release]] must be an array of tables")
    try:
        parts = {s: cls(**_typed(cls, data[s], s, source)) for s, cls in _SECTIONS.items()}
        found = tuple(Release(**_typed(Release, r, "release", source)) for r in releases)
        return Target(**top, **parts, source=source, releases=found)
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
