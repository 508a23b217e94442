"""What a benchmark measured, as a value: :class:`BenchReport` and its sections (``bench.json``).

The same document comes from the Python benchmark (here or on a device over ssh) and from TensorFlow
Lite's ``benchmark_model`` over adb; sections one source lacks are None and absent from the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from edgeship._version import SCHEMA_VERSION
from edgeship.errors import InputError
from edgeship.runtime.delegation import Delegation, op_counts

SCHEMA = "edgeship-bench/1"

#: The file a benchmark is written to (``python -m edgeship.runtime.bench -o``, deploy's bench folders).
BENCH_FILE = "bench.json"


def _some(**items: Any) -> dict[str, Any]:
    """``items`` without the None values (the keys a source did not measure)."""
    return {k: v for k, v in items.items() if v is not None}


def _opt_float(d: Mapping[str, Any], key: str) -> float | None:
    return None if d.get(key) is None else float(d[key])


@dataclass(frozen=True)
class BenchOptions:
    """How to benchmark: thread counts, runs per configuration (or a duration), warm-up."""

    threads: tuple[int, ...] = (1,)
    runs: int = 100
    warmup: int = 10
    duration_s: float | None = None
    chunk: int = 10
    use_xnnpack: bool = True
    overhead_runs: int = 20
    #: Images (files or folders) to time ``Classifier.predict`` on, end to end; none: invoke only.
    images: tuple[str, ...] = ()
    #: End-to-end rounds per TFLite configuration (None: ``runs``).
    e2e_runs: int | None = None

    def __post_init__(self) -> None:
        if not self.threads or min(self.threads) < 1:
            raise InputError(f"threads must be positive integers, got {self.threads}")
        if self.runs < 1 or self.warmup < 0 or self.chunk < 1:
            raise InputError(f"runs must be >= 1 and warmup >= 0, got runs={self.runs} warmup={self.warmup}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise InputError(f"duration must be > 0 s, got {self.duration_s}")
        if self.e2e_runs is not None and self.e2e_runs < 1:
            raise InputError(f"end-to-end runs must be >= 1, got {self.e2e_runs}")
        object.__setattr__(self, "threads", tuple(int(t) for t in self.threads))
        object.__setattr__(self, "images", tuple(str(i) for i in self.images))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "threads": list(self.threads),
            "images": list(self.images),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchOptions:
        duration, e2e_runs = d.get("duration_s"), d.get("e2e_runs")
        return cls(
            threads=tuple(int(t) for t in d["threads"]),
            runs=int(d["runs"]),
            warmup=int(d["warmup"]),
            duration_s=None if duration is None else float(duration),
            chunk=int(d.get("chunk", 10)),
            use_xnnpack=bool(d.get("use_xnnpack", True)),
            overhead_runs=int(d.get("overhead_runs", 20)),
            images=tuple(str(i) for i in d.get("images", ())),
            e2e_runs=None if e2e_runs is None else int(e2e_runs),
        )


@dataclass(frozen=True)
class RuntimeInfo:
    """How a model ran: the runtime's own description (``TFLiteModel.describe()`` and the like).

    ``details`` holds what only some runtimes report (tensor specs, the image path, the device's facts).
    """

    interpreter: str
    interpreter_version: str | None
    delegate: str | None
    #: XNNPACK's share of the graph (an XNNPACK run only).
    xnnpack: Delegation | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image_path(self) -> str | None:
        """How the runtime read the images, in words (a drift check's runtime says it)."""
        path = self.details.get("image_path")
        return None if path is None else str(path)

    def to_dict(self) -> dict[str, Any]:
        """The description as the runtime wrote it (``xnnpack`` after the tensor specs, as ``describe()`` puts it)."""
        d: dict[str, Any] = {"interpreter": self.interpreter, "interpreter_version": self.interpreter_version}
        d["delegate"] = self.delegate
        xnnpack = {"xnnpack": self.xnnpack.to_dict()} if self.xnnpack is not None else {}
        for key, value in self.details.items():
            d[key] = value
            if key == "output":
                d |= xnnpack
        return d | xnnpack

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RuntimeInfo:
        own = ("interpreter", "interpreter_version", "delegate", "xnnpack")
        version, xnnpack = d.get("interpreter_version"), d.get("xnnpack")
        return cls(
            interpreter=str(d.get("interpreter", "")),
            interpreter_version=None if version is None else str(version),
            delegate=None if d.get("delegate") is None else str(d["delegate"]),
            xnnpack=Delegation.from_dict(dict(xnnpack)) if xnnpack else None,
            details={k: v for k, v in d.items() if k not in own},
        )

    def delegation_note(self) -> str:
        """`` (N partitions; outside: OP xK)`` for an XNNPACK run, else nothing."""
        d = self.xnnpack
        if d is None:
            return ""
        outside = op_counts(d.outside)
        return f" ({d.partitions} partition{'s' if d.partitions != 1 else ''}" + (
            f"; outside: {outside})" if outside else ")"
        )


@dataclass(frozen=True)
class LatencyStats:
    """invoke() latency of one configuration, in ms (``benchmark_model`` reports p5/p95, not always min/std)."""

    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    runs: int | None = None
    min_ms: float | None = None
    std_ms: float | None = None
    max_ms: float | None = None
    p5_ms: float | None = None
    p95_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _some(
            runs=self.runs, min_ms=self.min_ms, mean_ms=self.mean_ms, std_ms=self.std_ms, p5_ms=self.p5_ms
        ) | _some(p50_ms=self.p50_ms, p90_ms=self.p90_ms, p95_ms=self.p95_ms, p99_ms=self.p99_ms, max_ms=self.max_ms)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyStats:
        return cls(
            mean_ms=float(d["mean_ms"]),
            p50_ms=float(d["p50_ms"]),
            p90_ms=float(d["p90_ms"]),
            p99_ms=float(d["p99_ms"]),
            runs=None if d.get("runs") is None else int(d["runs"]),
            min_ms=_opt_float(d, "min_ms"),
            std_ms=_opt_float(d, "std_ms"),
            max_ms=_opt_float(d, "max_ms"),
            p5_ms=_opt_float(d, "p5_ms"),
            p95_ms=_opt_float(d, "p95_ms"),
        )


@dataclass(frozen=True)
class EndToEndSteps:
    """Median ms of each step of ``Classifier.predict``."""

    decode: float
    preprocess: float
    invoke: float
    postprocess: float


@dataclass(frozen=True)
class EndToEnd:
    """``Classifier.predict`` timed on real images (decode, preprocess, invoke, postprocess)."""

    images: int
    image: str
    runs: int
    min_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    steps_p50_ms: EndToEndSteps
    invoke_only_p50_ms: float
    ratio_p50_to_invoke: float
    image_path: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "note"}
        return d | {"steps_p50_ms": dict(self.steps_p50_ms.__dict__)} | _some(note=self.note)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EndToEnd:
        return cls(**{**d, "steps_p50_ms": EndToEndSteps(**d["steps_p50_ms"])})


@dataclass(frozen=True)
class AdbRun:
    """What ``benchmark_model`` on an Android device adds to a row."""

    warmup_avg_ms: float
    device: Mapping[str, str]
    flags: tuple[str, ...]
    memory_delta_mb: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return (
            {"warmup_avg_ms": self.warmup_avg_ms}
            | _some(memory_delta_mb=None if self.memory_delta_mb is None else dict(self.memory_delta_mb))
            | {"device": dict(self.device), "flags": list(self.flags)}
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdbRun | None:
        if "warmup_avg_ms" not in d:
            return None
        delta = d.get("memory_delta_mb")
        return cls(float(d["warmup_avg_ms"]), dict(d["device"]), tuple(d["flags"]), dict(delta) if delta else None)


@dataclass(frozen=True)
class BenchRow:
    """One model at one thread count: its load, latency, memory, runtime and (TFLite) end-to-end figures."""

    model: str
    path: str
    threads: int
    size_bytes: int
    init_ms: float
    first_ms: float
    stats: LatencyStats
    peak_rss_mb: float
    runtime: RuntimeInfo
    ratio_p50_to_first: float
    samples_ms: tuple[float, ...] | None = None
    #: Mean ms of the wrapper's own steps around invoke() (empty for .onnx; None: not measured).
    overhead: Mapping[str, float] | None = None
    e2e: EndToEnd | None = None
    #: The label of a timing measured on an emulated CPU.
    emulated: str | None = None
    #: The model's path on the device, when a device ran it under another name.
    device_path: str | None = None
    adb: AdbRun | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "path": self.path, "threads": self.threads, "size_bytes": self.size_bytes}
        d |= {"init_ms": self.init_ms, "first_ms": self.first_ms, **self.stats.to_dict()}
        d |= _some(samples_ms=None if self.samples_ms is None else list(self.samples_ms))
        d |= {"peak_rss_mb": self.peak_rss_mb, "runtime": self.runtime.to_dict()}
        d |= _some(overhead=None if self.overhead is None else dict(self.overhead))
        d |= _some(e2e=None if self.e2e is None else self.e2e.to_dict())
        d |= self.adb.to_dict() if self.adb is not None else {}
        d |= {"ratio_p50_to_first": self.ratio_p50_to_first}
        return d | _some(emulated=self.emulated, device_path=self.device_path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchRow:
        samples, overhead, e2e = d.get("samples_ms"), d.get("overhead"), d.get("e2e")
        return cls(
            model=str(d["model"]),
            path=str(d["path"]),
            threads=int(d["threads"]),
            size_bytes=int(d["size_bytes"]),
            init_ms=float(d["init_ms"]),
            first_ms=float(d["first_ms"]),
            stats=LatencyStats.from_dict(d),
            peak_rss_mb=float(d["peak_rss_mb"]),
            runtime=RuntimeInfo.from_dict(d["runtime"]),
            ratio_p50_to_first=float(d["ratio_p50_to_first"]),
            samples_ms=None if samples is None else tuple(float(v) for v in samples),
            overhead=None if overhead is None else {k: float(v) for k, v in overhead.items()},
            e2e=EndToEnd.from_dict(e2e) if e2e else None,
            emulated=d.get("emulated"),
            device_path=d.get("device_path"),
            adb=AdbRun.from_dict(d),
        )


def with_ratios(rows: Sequence[BenchRow]) -> list[BenchRow]:
    """The rows with their p50 ratio to the first model at the same thread count (1.0 for that model)."""
    base: dict[int, float] = {}
    for r in rows:
        base.setdefault(r.threads, r.stats.p50_ms)
    return [replace(r, ratio_p50_to_first=round(r.stats.p50_ms / base[r.threads], 3)) for r in rows]


@dataclass(frozen=True)
class BenchHost:
    """The machine that ran the benchmark (``adb_serial`` only, for ``benchmark_model`` on a phone)."""

    machine: str | None = None
    system: str | None = None
    python: str | None = None
    cpus: int | None = None
    node: str | None = None
    #: How the CPU is emulated (qemu-user), or None on real hardware.
    emulated: str | None = None
    adb_serial: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.adb_serial is not None:
            return {"adb_serial": self.adb_serial}
        d = {"machine": self.machine, "system": self.system, "python": self.python, "cpus": self.cpus}
        return d | {"node": self.node} | _some(emulated=self.emulated)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchHost:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class BenchDevice:
    """The ssh device a benchmark ran on: where, its Python and ``uname -m``, emulation, the install it used."""

    where: str
    python: str | None
    machine: str | None
    emulated: str | None = None
    #: How the device's environment was installed (command, seconds, reused, requirements...).
    install: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"where": self.where, "python": self.python, "machine": self.machine}
        return d | _some(emulated=self.emulated, install=None if self.install is None else dict(self.install))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchDevice:
        install = d.get("install")
        return cls(str(d["where"]), d.get("python"), d.get("machine"), d.get("emulated"), install)


@dataclass(frozen=True)
class SpeedVerdict:
    """Which benchmarked model is fastest on a target's device (p50), and what that means for the target."""

    p50_ms: Mapping[str, float]
    fastest: str
    machine: str | None
    #: The emulation label: the answer is shown and recommends nothing.
    emulated: str | None
    recommendation: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "p50_ms": dict(self.p50_ms)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeedVerdict:
        return cls(
            {k: float(v) for k, v in d["p50_ms"].items()},
            str(d["fastest"]),
            d.get("machine"),
            d.get("emulated"),
            str(d["recommendation"]),
        )


@dataclass(frozen=True)
class BenchReport:
    """A benchmark: where it ran, how, and one row per model and thread count (``bench.json``).

    ``target`` names the target profile whose settings the benchmark used (None: none); ``device`` and ``speed`` are
    set for a benchmark on a target's own ssh device.
    """

    host: BenchHost
    results: tuple[BenchRow, ...]
    options: BenchOptions | None = None
    device: BenchDevice | None = None
    target: str | None = None
    speed: SpeedVerdict | None = None
    schema: str = SCHEMA

    @property
    def emulated(self) -> str | None:
        """The emulation label when the timings were measured on an emulated CPU, else None."""
        return self.host.emulated or (self.device.emulated if self.device else None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "schema": self.schema, "host": self.host.to_dict()}
        d |= _some(options=None if self.options is None else self.options.to_dict())
        d |= {"results": [r.to_dict() for r in self.results]}
        d |= _some(device=None if self.device is None else self.device.to_dict()) | {"target": self.target}
        return d | _some(speed=None if self.speed is None else self.speed.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchReport:
        version = d.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise InputError(
                f"bench document has schema_version {version!r:.20}; this edgeship reads up to "
                f"{SCHEMA_VERSION}: upgrade edgeship"
            )
        options, device, speed = d.get("options"), d.get("device"), d.get("speed")
        return cls(
            host=BenchHost.from_dict(d.get("host") or {}),
            results=tuple(BenchRow.from_dict(r) for r in d["results"]),
            options=BenchOptions.from_dict(options) if options is not None else None,
            device=BenchDevice.from_dict(device) if device else None,
            target=d.get("target"),
            speed=SpeedVerdict.from_dict(speed) if speed else None,
            schema=str(d.get("schema", SCHEMA)),
        )
