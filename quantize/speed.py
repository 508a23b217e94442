"""Speed: timed placement, the budget search's speed floor and the speed check (1 thread, XNNPACK).

Every measurement runs the models interleaved in one benchmark, so other jobs on the machine slow
them alike. They run where a :class:`SpeedTiming` says: this machine, or the target's own device
(a :data:`LatencyProbe` the caller builds: quantize never reaches devices itself).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from edgeship._io import atomic_write_bytes
from edgeship._progress import Progress
from edgeship.errors import DeviceError
from edgeship.quantize import mixed
from edgeship.quantize.report import RunsOn
from edgeship.quantize.result import FAST_FILE
from edgeship.quantize.search_report import Offered, Placement, SpeedCheck, SpeedMeasurement, TimedOn
from edgeship.quantize.worker import Quantizer
from edgeship.runtime.bench import BenchOptions, benchmark, emulation
from edgeship.runtime.bench_report import BenchReport
from edgeship.runtime.interpreter import backend_version, pick_backend
from edgeship.runtime.metrics import DriftFigures

#: Invokes per model of the speed check (1 thread, XNNPACK, interleaved; the median counts).
SPEED_RUNS = 60

#: ``probe(models, runs)``: a ``bench.json`` document (:func:`edgeship.runtime.bench.benchmark`'s) of the model
#: files timed interleaved at 1 thread on XNNPACK, ``runs`` invokes each, somewhere else than here.
LatencyProbe = Callable[[Sequence[Path], int], BenchReport]
HERE = "this machine"


@dataclass(frozen=True)
class SpeedTiming:
    """Where quantize times its speed decisions (timed placement, the speed floor, the speed check).

    Attributes:
        probe: Times models on the target's device (None: on this machine).
        where: That device as reports name it (``ssh pi@raspberrypi``).
        note: Why the target's device does not time them (an emulated one), for the report and summary.
    """

    probe: LatencyProbe | None = None
    where: str = HERE
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "note": self.note}


class Stopwatch:
    """One quantize run's timings, made where its :class:`SpeedTiming` says; remembers where they ran."""

    def __init__(self, work: Path, timing: SpeedTiming | None = None) -> None:
        self.work, self.timing = Path(work), timing or SpeedTiming()
        self.ran_on: dict[str, Any] = {}
        self.measurements = 0

    def latencies(self, models: dict[str, Any], runs: int = SPEED_RUNS, stat: str = "p50_ms") -> dict[str, float]:
        """:func:`latencies` of ``models`` here, or through the device's probe."""
        self.measurements += 1
        if self.timing.probe is None:
            self.ran_on = self.ran_on or _here()
            return latencies(models, self.work, runs, stat)
        with _model_files(models, self.work) as paths:
            doc = self.timing.probe(list(paths.values()), runs)
        emulated = doc.emulated
        if emulated:  # the caller filters emulated devices out; this keeps any other probe from deciding on one
            raise DeviceError(f"{self.timing.where} timed the models under {emulated}: that decides no speed question")
        self.ran_on = _device(doc)
        return _figures(paths, doc, stat)

    @property
    def on_device(self) -> str:
        """`` on ssh pi@host`` when a device times, else nothing: for sentences about the timings."""
        return "" if self.timing.probe is None else f" on {self.timing.where}"

    def record(self) -> TimedOn:
        """Where the speed decisions were timed (host, ``uname -m``, Python, interpreter, emulated or not)."""
        return TimedOn.from_dict({**self.timing.to_dict(), **self.ran_on, "measurements": self.measurements})


def stopwatch(work: Path | Stopwatch) -> Stopwatch:
    """``work`` as a :class:`Stopwatch`: a folder times on this machine."""
    return work if isinstance(work, Stopwatch) else Stopwatch(work)


def _here() -> dict[str, Any]:

    backend = pick_backend()
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "interpreter": backend,
        "interpreter_version": backend_version(backend),
        "emulated": emulation() or False,
    }


def _device(report: BenchReport) -> dict[str, Any]:
    """What a device's benchmark says about where it ran."""
    host, device = report.host, report.device
    runtime = report.results[0].runtime if report.results else None
    return {
        "machine": (device.machine if device else None) or host.machine,
        "python": (device.python if device else None) or host.python,
        "interpreter": runtime.interpreter if runtime else None,
        "interpreter_version": runtime.interpreter_version if runtime else None,
        "emulated": False,
    }


@contextlib.contextmanager
def _model_files(models: dict[str, Any], work: Path) -> Iterator[dict[str, Path]]:
    """``models`` (label -> path or bytes) as files: bytes written to ``work`` for the block, then removed."""
    paths, temps = {}, []
    try:
        for label, model in models.items():
            if isinstance(model, (bytes, bytearray)):
                model = atomic_write_bytes(Path(work) / f".latency_{label}.tflite", bytes(model))
                temps.append(Path(model))
            paths[label] = Path(model)
        yield paths
    finally:
        for t in temps:
            t.unlink(missing_ok=True)


def latencies(models: dict[str, Any], work: Any, runs: int = 60, stat: str = "p50_ms") -> dict[str, float]:
    """Invoke latency (ms; ``stat``: the median, or ``min_ms``) of each model at 1 thread on XNNPACK,
    interleaved in one run, on this machine.

    ``models`` maps a label to a model path or the model's bytes (written to ``work`` for the run).
    Decisions use ``min_ms``: other jobs on the machine only add time, and on a loaded 2-core
    machine one 60-invoke median of the same model varied by up to 30 %.
    """
    with _model_files(models, work) as paths:
        doc = benchmark(list(paths.values()), BenchOptions(threads=(1,), runs=runs, warmup=5, overhead_runs=1))
    return _figures(paths, doc, stat)


def _figures(paths: dict[str, Path], report: BenchReport, stat: str) -> dict[str, float]:
    """``stat`` (a :class:`LatencyStats` field: ``p50_ms``, ``min_ms``) of each labelled model, rounded."""
    return {label: round(float(getattr(r.stats, stat)), 3) for label, r in zip(paths, report.results)}


#: Timed placement keeps its candidates float only when that is at least this much faster.
PLACEMENT_GAIN = 1.05


def timed_placement(
    quantized: Quantizer,
    calibrated: bytes,
    quant: tuple[bytes, RunsOn],
    work: Path | Stopwatch,
    progress: Progress,
) -> tuple[tuple[bytes, RunsOn], Placement]:
    """Keep the ops float whose int8 kernel may be slower than the float one where ``work`` times (large
    depthwise convolutions: :func:`mixed.slow_int8_candidates`) when the model measures faster that way
    (1 thread, XNNPACK, interleaved); ``quantized.placed`` remembers them for every model made after.

    ``work``: a :class:`Stopwatch`, or a folder (timed on this machine)."""
    nodes = mixed.slow_int8_candidates(calibrated)
    if not nodes:
        return quant, Placement(True, candidates=0)
    progress("placement: time large depthwise convolutions in float", None, None)
    placed = quantized(calibrated, nodes)
    ms = stopwatch(work).latencies({"int8": quant[0], "placed": placed[0]}, runs=SPEED_RUNS, stat="min_ms")
    keep = ms["int8"] >= PLACEMENT_GAIN * ms["placed"]
    report = Placement(True, len(nodes), keep, ms, PLACEMENT_GAIN, tuple(nodes))
    if not keep:
        return quant, report
    quantized.placed = tuple(nodes)
    return placed, report


#: The budget search aims this much above the speed floor: one 60-invoke measurement is noisy on a
#: loaded machine (MobileNetV3-Large: 1.72x in the search, 1.46x in the speed check, 1.21x in a later run),
#: and the speed check measures the written model again.
SEARCH_SPEED_MARGIN = 1.15


def speed_floor(
    quantized: Quantizer,
    calibrated: bytes,
    float_model: bytes,
    work: Path | Stopwatch,
    floor: float,
    measured: list[SpeedMeasurement],
    progress: Progress,
) -> Callable[[Sequence[str]], bool] | None:
    """``fast_enough(float_nodes)`` of the budget search: the model with those nodes float runs at least
    ``floor`` x float32's speed (1 thread, XNNPACK, interleaved, fastest invoke of each); each measurement
    is appended to ``measured``."""
    if floor <= 0:
        return None
    floor *= SEARCH_SPEED_MARGIN
    clock = stopwatch(work)

    def fast_enough(float_nodes: Sequence[str]) -> bool:
        progress("budget search: speed of a candidate", None, None)
        ms = clock.latencies(
            {"float32": float_model, "candidate": quantized(calibrated, float_nodes)[0]}, runs=SPEED_RUNS, stat="min_ms"
        )
        speedup = ms["float32"] / ms["candidate"]
        measured.append(SpeedMeasurement(len(float_nodes), ms, round(speedup, 3)))
        return speedup >= floor

    # The all-int8 model first, for the report. Not a shortcut: one timing on a loaded machine can put
    # it under the floor on a loaded machine, which would stop the search.
    fast_enough(())
    return fast_enough


def speed_check(
    float_model: bytes,
    model: bytes,
    all_int8: tuple[bytes, DriftFigures],
    work: Path | Stopwatch,
    min_speedup: float,
    progress: Progress,
) -> SpeedCheck:
    """The written model against float32 (and the all-int8 model, when ops were kept float) at 1 thread.

    XNNPACK, interleaved in one run, where ``work`` times (:meth:`Stopwatch.latencies`). Under
    ``min_speedup`` x float32 (at least 1.0) (an int8 build slower than, or barely faster than, its
    float build is never left unsaid), ``verdict`` says so and ``offered`` names the fastest of the
    others: the all-int8 model (saved beside as ``model_int8_FAST.tflite``; its SQNR is under the budget) or the float32
    model (exact).
    """
    progress("speed check (1 thread, XNNPACK)", None, None)
    alt = all_int8[0] if all_int8[0] != model else None
    models: dict[str, Any] = {"float32": float_model, "int8": model, **({"all_int8": alt} if alt is not None else {})}
    clock = stopwatch(work)
    ms = clock.latencies(models, runs=SPEED_RUNS)
    speedup, floor = ms["float32"] / ms["int8"], max(min_speedup, 1.0)
    report = SpeedCheck(
        measured=True,
        ms=ms,
        speedup_vs_float32=round(speedup, 3),
        faster_than_float32=speedup > 1.0,
        min_speedup=floor,
        runs=SPEED_RUNS,
    )
    if speedup >= floor:
        return report
    how = "SLOWER than" if speedup < 1.0 else f"only {speedup:.2f}x as fast as"
    verdict = (
        f"the int8 model is {how} float32 at 1 thread on XNNPACK{clock.on_device} ({ms['int8']:.2f} ms vs "
        f"{ms['float32']:.2f} ms; floor {floor}x)"
    )
    quicker = [k for k in ("all_int8", "float32") if k in ms and ms[k] < ms["int8"]]
    faster = min(quicker, key=ms.__getitem__, default=None)
    offered = None
    if faster == "all_int8":
        speedup_fast = round(ms["float32"] / ms["all_int8"], 3)
        offered = Offered("all_int8", FAST_FILE, ms["all_int8"], speedup_fast, round(all_int8[1].sqnr_db, 2))
        verdict += (
            f": {FAST_FILE} (all-int8, SQNR {all_int8[1].sqnr_db:.1f} dB, under the budget) runs "
            f"{ms['all_int8']:.2f} ms, {speedup_fast:.2f}x float32"
        )
    elif faster == "float32":
        offered = Offered("float32", "the float32 model", ms["float32"], 1.0, None)
        verdict += ": the float32 model is faster (and exact)"
    else:
        verdict += f"; nothing faster was made: the float32 model is exact at {1 / speedup:.2f}x the time"
    return replace(report, offered=offered, verdict=verdict)
