"""Speed: timed placement, the budget search's speed floor and the speed check (1 thread, XNNPACK, here).

Every measurement runs the models interleaved in one benchmark (:func:`latencies`), so
other jobs on the machine slow them alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgeship._io import atomic_write_bytes
from edgeship._progress import Progress
from edgeship.quantize import mixed
from edgeship.quantize.report import RunsOn
from edgeship.quantize.result import FAST_FILE
from edgeship.quantize.search_report import Offered, Placement, SpeedCheck, SpeedMeasurement
from edgeship.quantize.worker import Quantizer
from edgeship.runtime.bench import BenchOptions, benchmark
from edgeship.runtime.metrics import DriftFigures

#: Invokes per model of the speed check (1 thread, XNNPACK, interleaved; the median counts).
SPEED_RUNS = 60


def latencies(models: dict[str, Any], work: Any, runs: int = 60, stat: str = "p50_ms") -> dict[str, float]:
    """Invoke latency (ms; ``stat``: the median, or ``min_ms``) of each model at 1 thread on XNNPACK,
    interleaved in one run.

    ``models`` maps a label to a model path or the model's bytes (written to ``work`` for the run).
    Decisions use ``min_ms``: other jobs on the machine only add time, and on a loaded 2-core
    machine one 60-invoke median of the same model varied by up to 30 %.
    """
    paths, temps = {}, []
    for label, model in models.items():
        if isinstance(model, (bytes, bytearray)):
            model = atomic_write_bytes(Path(work) / f".latency_{label}.tflite", bytes(model))
            temps.append(Path(model))
        paths[label] = Path(model)
    try:
        doc = benchmark(list(paths.values()), BenchOptions(threads=(1,), runs=runs, warmup=5, overhead_runs=1))
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    return {label: round(r[stat], 3) for label, r in zip(paths, doc["results"])}


#: Timed placement keeps its candidates float only when that is at least this much faster.
PLACEMENT_GAIN = 1.05


def timed_placement(
    quantized: Quantizer, calibrated: bytes, quant: tuple[bytes, RunsOn], work: Path, progress: Progress
) -> tuple[tuple[bytes, RunsOn], Placement]:
    """Keep the ops float whose int8 kernel may be slower than the float one here (large depthwise
    convolutions: :func:`mixed.slow_int8_candidates`) when the model measures faster that way
    (1 thread, XNNPACK, interleaved); ``quantized.placed`` remembers them for every model made after."""
    nodes = mixed.slow_int8_candidates(calibrated)
    if not nodes:
        return quant, Placement(True, candidates=0)
    progress("placement: time large depthwise convolutions in float", None, None)
    placed = quantized(calibrated, nodes)
    ms = latencies({"int8": quant[0], "placed": placed[0]}, work, runs=SPEED_RUNS, stat="min_ms")
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
    work: Path,
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

    def fast_enough(float_nodes: Sequence[str]) -> bool:
        progress("budget search: speed of a candidate", None, None)
        ms = latencies(
            {"float32": float_model, "candidate": quantized(calibrated, float_nodes)[0]},
            work,
            runs=SPEED_RUNS,
            stat="min_ms",
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
    work: Path,
    min_speedup: float,
    progress: Progress,
) -> SpeedCheck:
    """The written model against float32 (and the all-int8 model, when ops were kept float) at 1 thread.

    XNNPACK, interleaved in one run (:func:`latencies`). Under ``min_speedup`` x float32 (at least 1.0)
    (an int8 build slower than, or barely faster than, its float build is never left unsaid),
    ``verdict`` says so and ``offered`` names the fastest of the others: the all-int8 model
    (saved beside as ``model_int8_FAST.tflite``; its SQNR is under the budget) or the float32
    model (exact).
    """
    progress("speed check (1 thread, XNNPACK)", None, None)
    alt = all_int8[0] if all_int8[0] != model else None
    models: dict[str, Any] = {"float32": float_model, "int8": model, **({"all_int8": alt} if alt is not None else {})}
    ms = latencies(models, work, runs=SPEED_RUNS)
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
        f"the int8 model is {how} float32 at 1 thread on XNNPACK ({ms['int8']:.2f} ms vs "
        f"{ms['float32']:.2f} ms; floor {floor}x)"
    )
    faster = min((k for k in ("all_int8", "float32") if k in ms and ms[k] < ms["int8"]), key=ms.get, default=None)
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
