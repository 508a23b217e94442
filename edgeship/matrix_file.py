"""The matrix file (``edgeship matrix MATRIX.toml``): models, image folders, targets and the devices serving them.

Relative paths are read from the matrix file's folder. Every mistake is one :class:`InputError` line naming
the entry and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeship.errors import InputError
from edgeship.targets import load_target
from edgeship.targets.devices import DeviceSpec
from edgeship.targets.profile import Target

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

#: Names become folder names (cells/MODEL/TARGET) and Ray resource names (device:NAME).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOP_KEYS = {"calibration", "evaluation", "options", "model", "target", "device"}
MODEL_KEYS = {"name", "path", "zoo", "labels", "input_shape"}
TARGET_KEYS = {"name", "profile"}
DEVICE_KEYS = {"name", "target", "ssh", "adb", "node", "identity", "known_hosts", "python", "pip_args",
               "accept_new_host_key"}  # fmt: skip
OPTION_KEYS = {"num_calib", "seed", "max_eval", "bench_runs", "job_timeout_s"}


@dataclass(frozen=True)
class MatrixModel:
    name: str
    source: str  # an ONNX path, or a zoo name
    labels: Path | None = None
    input_shape: tuple[int, ...] | None = None  # the input contract: the model's input must have this shape


@dataclass(frozen=True)
class MatrixTarget:
    name: str
    profile: Target
    given: str  # what load_target reads: a built-in name or the profile file's path


@dataclass(frozen=True)
class MatrixDevice:
    name: str
    target: str
    spec: DeviceSpec  # an ssh device (kind "ssh", host set)
    node: str | None = None  # the Ray node it is attached to (its node name or IP), when the file says

    @property
    def resource(self) -> str:
        """The Ray custom resource that stands for this device (one unit: one job at a time)."""
        return f"device:{self.name}"


@dataclass(frozen=True)
class MatrixOptions:
    num_calib: int = 200
    seed: int | None = None
    max_eval: int | None = None
    bench_runs: int = 20
    #: Seconds a device job (a shard of a drift check, a benchmark) may take, the device's first-time setup
    #: (its venv, its pip install) included; then the device is taken as hung and lost, and the job moves.
    job_timeout_s: int = 1800


@dataclass(frozen=True)
class Matrix:
    path: Path
    calibration: Path
    evaluation: Path | None
    models: tuple[MatrixModel, ...]
    targets: tuple[MatrixTarget, ...]
    devices: tuple[MatrixDevice, ...]
    options: MatrixOptions = field(default_factory=MatrixOptions)

    def devices_of(self, target: str) -> list[MatrixDevice]:
        return [d for d in self.devices if d.target == target]


def load_matrix(path: str | Path) -> Matrix:
    """Read and check a matrix file; raise one :class:`InputError` line on the first mistake."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read matrix file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"matrix file {path} is not valid TOML: {exc}") from exc
    _only(doc, TOP_KEYS, f"{path}")
    base = path.resolve().parent
    targets = tuple(_target(t, base, i) for i, t in enumerate(_tables(doc, "target", path)))
    models = tuple(_model(m, base, i) for i, m in enumerate(_tables(doc, "model", path)))
    devices = tuple(_device(d, base, i) for i, d in enumerate(doc.get("device", [])))
    matrix = Matrix(
        path,
        _folder(doc.get("calibration"), base, "calibration"),
        _folder(doc.get("evaluation"), base, "evaluation") if "evaluation" in doc else None,
        models,
        targets,
        devices,
        _options(doc.get("options", {})),
    )
    _check_links(matrix)
    return matrix


def _only(table: Any, keys: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise InputError(f"{where}: expected a table")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def _tables(doc: dict[str, Any], key: str, path: Path) -> list[Any]:
    found = doc.get(key)
    if not isinstance(found, list) or not found:
        raise InputError(f"{path}: needs at least one [[{key}]] entry")
    return found


def _name(table: dict[str, Any], where: str) -> str:
    name = table.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InputError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-' (got {name!r})")
    return name


def _path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: expected a path string, got {value!r}")
    return (base / value).resolve()


def _folder(value: Any, base: Path, key: str) -> Path:
    folder = _path(value, base, key)
    if not folder.is_dir():
        raise InputError(f"{key} folder {folder} does not exist")
    return folder


def _target(t: Any, base: Path, i: int) -> MatrixTarget:
    _only(t, TARGET_KEYS, f"[[target]] #{i + 1}")
    name = _name(t, f"[[target]] #{i + 1}")
    given = t.get("profile", name)
    looks_like_file = isinstance(given, str) and given.endswith(".toml")
    given = str(_path(given, base, f"target {name}: profile")) if looks_like_file else given
    profile = load_target(given)
    if profile.name != name:
        raise InputError(f"target {name}: its profile is named {profile.name!r}; use that name")
    if profile.access.value != "ssh":
        raise InputError(
            f"target {name}: the matrix runs targets reached over ssh (access = 'ssh'), its profile says "
            f"{profile.access.value!r}; use `edgeship deploy` for it"
        )
    return MatrixTarget(name, profile, given)


def _model(m: Any, base: Path, i: int) -> MatrixModel:
    where = f"[[model]] #{i + 1}"
    _only(m, MODEL_KEYS, where)
    name = _name(m, where)
    if ("path" in m) == ("zoo" in m):
        raise InputError(f"model {name}: give exactly one of path (an ONNX file) or zoo (a zoo name)")
    if "path" in m:
        source = _path(m["path"], base, f"model {name}: path")
        if not source.is_file():
            raise InputError(f"model {name}: {source} does not exist")
    labels = _path(m["labels"], base, f"model {name}: labels") if "labels" in m else None
    if labels is not None and not labels.is_file():
        raise InputError(f"model {name}: labels file {labels} does not exist")
    shape = m.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and shape and all(isinstance(d, int) for d in shape)):
        raise InputError(f"model {name}: input_shape must be a list of integers, e.g. [1, 3, 224, 224]")
    return MatrixModel(name, str(source) if "path" in m else str(m["zoo"]), labels, tuple(shape) if shape else None)


def _device(d: Any, base: Path, i: int) -> MatrixDevice:
    where = f"[[device]] #{i + 1}"
    _only(d, DEVICE_KEYS, where)
    name = _name(d, where)
    if "adb" in d:
        raise InputError(
            f"device {name}: adb devices are not run by the matrix: every cell is a drift check, which runs "
            "edgeship's Python runtime on the device, and a stock phone has no Python (over adb edgeship runs "
            "only TensorFlow Lite's benchmark_model: latency, no outputs); benchmark phones with "
            "`edgeship bench --adb`"
        )
    if not isinstance(d.get("ssh"), str):
        raise InputError(f'device {name}: needs ssh = "user@host[:port]"')
    if not isinstance(d.get("target"), str):
        raise InputError(f"device {name}: needs target = the name of the [[target]] it serves")
    node = d.get("node")
    if node is not None and not isinstance(node, str):
        raise InputError(f"device {name}: node must be a Ray node name or IP address")
    pip_args = d.get("pip_args", [])
    if not isinstance(pip_args, list) or not all(isinstance(a, str) for a in pip_args):
        raise InputError(f"device {name}: pip_args must be a list of strings")
    spec = DeviceSpec(
        "ssh",
        host=d["ssh"],
        identity=_path(d["identity"], base, f"device {name}: identity") if "identity" in d else None,
        known_hosts=_path(d["known_hosts"], base, f"device {name}: known_hosts") if "known_hosts" in d else None,
        accept_new_host_key=bool(d.get("accept_new_host_key", False)),
        python=str(d.get("python", "python3")),
        pip_args=tuple(pip_args),
    )
    return MatrixDevice(name, d["target"], spec, node)


def _options(o: Any) -> MatrixOptions:
    _only(o, OPTION_KEYS, "[options]")
    for key, value in o.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise InputError(f"[options] {key} must be a positive integer, got {value!r}")
    return MatrixOptions(**o)


def _check_links(matrix: Matrix) -> None:
    """Names unique; every device serves a listed target; every target has a device."""
    for kind, names in (
        ("model", [m.name for m in matrix.models]),
        ("target", [t.name for t in matrix.targets]),
        ("device", [d.name for d in matrix.devices]),
    ):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"two {kind}s are named {twice[0]}: names must be unique")
    known = {t.name for t in matrix.targets}
    for d in matrix.devices:
        if d.target not in known:
            raise InputError(f"device {d.name} serves target {d.target!r}, which no [[target]] lists")
    for t in matrix.targets:
        if not matrix.devices_of(t.name):
            raise InputError(f"target {t.name} has no [[device]]: add one with target = {t.name!r}")
