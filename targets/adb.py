"""Android devices over adb: TensorFlow Lite's ``benchmark_model`` on the phone.

Python does not run on a stock phone, so on-device latency comes from TensorFlow
Lite's own ``benchmark_model`` binary (the user supplies it: the prebuilt
``android_aarch64_benchmark_model`` from the TensorFlow Lite performance-measurement
docs, or one built with ``bazel build -c opt --config=android_arm64
//tensorflow/lite/tools/benchmark:benchmark_model``). It is pushed with the model to
``/data/local/tmp``, run with the target's flags, and its output parsed into the same
fields as the Python benchmark.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.errors import DeviceError, InputError, MissingDependencyError
from edgeship.runtime.bench_report import (
    AdbRun,
    BenchHost,
    BenchReport,
    BenchRow,
    LatencyStats,
    RuntimeInfo,
    with_ratios,
)
from edgeship.targets import load_target

REMOTE_DIR = "/data/local/tmp/edgeship"


def _adb() -> str:
    path = shutil.which("adb")
    if path is None:
        raise MissingDependencyError("adb is not installed: apt-get install adb (or the Android SDK platform-tools)")
    return path


@dataclass(frozen=True)
class AdbDevice:
    """One Android device, by serial (as ``adb devices`` lists it)."""

    serial: str
    timeout: float = 60.0

    def _run(self, args: list[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [_adb(), "-s", self.serial, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"adb {' '.join(args[:2])} on {self.serial} timed out after {exc.timeout:.0f} s") from exc
        if proc.returncode != 0:
            line = (proc.stderr or proc.stdout).strip().splitlines()
            raise DeviceError(
                f"adb {' '.join(args[:2])} on {self.serial} failed: {line[-1] if line else proc.returncode}"
            )
        return proc

    def check(self) -> dict[str, str]:
        """The device's state and ABI; DeviceError when it is not attached or not ready."""
        state = self._run(["get-state"], timeout=15).stdout.strip()
        if state != "device":
            raise DeviceError(f"adb device {self.serial} is '{state}', not ready")
        abi = self._run(["shell", "getprop", "ro.product.cpu.abi"]).stdout.strip()
        return {"state": state, "abi": abi}

    def push(self, local: Path, remote: str) -> None:
        self._run(["push", str(local), remote], timeout=600)

    def shell(self, argv: list[str], *, timeout: float = 600) -> str:
        import shlex

        return self._run(["shell", shlex.join(argv)], timeout=timeout).stdout


def benchmark_flags(target: Any, *, threads: int | None = None, runs: int = 100, warmup: int = 10) -> list[str]:
    """``benchmark_model`` flags for a target profile."""
    delegate = target.execution.delegate.value
    return [
        f"--num_threads={threads or target.execution.threads}",
        f"--use_xnnpack={'true' if delegate == 'xnnpack' else 'false'}",
        f"--use_gpu={'true' if delegate == 'gpu' else 'false'}",
        f"--use_nnapi={'true' if delegate == 'nnapi' else 'false'}",
        f"--num_runs={runs}",
        f"--warmup_runs={warmup}",
        "--report_peak_memory_footprint=true",
    ]


def run_benchmark(device: AdbDevice, binary: Path, model: Path, flags: list[str]) -> dict[str, Any]:
    """Push the binary and the model, run ``benchmark_model``, parse its output."""
    if not binary.is_file():
        raise InputError(f"benchmark_model binary {binary} does not exist (see the README: Android)")
    if not model.is_file():
        raise InputError(f"model {model} does not exist")
    info = device.check()
    device.shell(["mkdir", "-p", REMOTE_DIR])
    device.push(binary, f"{REMOTE_DIR}/benchmark_model")
    device.shell(["chmod", "755", f"{REMOTE_DIR}/benchmark_model"])
    remote_model = f"{REMOTE_DIR}/model.tflite"  # a fixed name: the user's never reaches the device's shell
    device.push(model, remote_model)
    out = device.shell([f"{REMOTE_DIR}/benchmark_model", f"--graph={remote_model}", *flags], timeout=1800)
    return {**parse_benchmark_output(out), "device": info, "flags": flags}


_NUM = r"([0-9.]+)"


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """Fields of ``benchmark_model`` output: init, first inference, warmup, average, std, percentiles, memory.

    Times are returned in ms. Percentiles appear only in newer builds (``p5``, ``median``,
    ``p95`` on the ``count=`` line).
    """
    result: dict[str, Any] = {}
    m = re.search(
        r"Inference timings in us: Init: "
        + _NUM
        + r", First inference: "
        + _NUM
        + r", Warmup \(avg\): "
        + _NUM
        + r", Inference \(avg\): "
        + _NUM,
        text,
    )
    if not m:
        tail = text.strip().splitlines()[-1:] or ["no output"]
        raise DeviceError(f"benchmark_model output not understood: {tail[0][:200]}")
    init, first, warm, avg = (float(v) / 1000 for v in m.groups())
    result.update({"init_ms": init, "first_ms": first, "warmup_avg_ms": warm, "mean_ms": avg})
    counts = re.findall(r"count=(\d+)([^\n]*)", text)
    if counts:
        n, rest = counts[-1]  # the last count= line is the measured run
        stats = dict(re.findall(r"(\w+)=" + _NUM, rest))
        result["runs"] = int(n)
        for key, name in (
            ("min", "min_ms"),
            ("max", "max_ms"),
            ("std", "std_ms"),
            ("p5", "p5_ms"),
            ("median", "p50_ms"),
            ("p95", "p95_ms"),
        ):
            if key in stats:
                result[name] = float(stats[key]) / 1000
    mem = re.search(r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM, text)
    if mem:
        result["peak_rss_mb"] = float(mem.group(1))
    delta = re.search(
        r"Memory footprint delta from the start of the tool \(MB\): init=" + _NUM + r" overall=" + _NUM, text
    )
    if delta:
        result["memory_delta_mb"] = {"init": float(delta.group(1)), "overall": float(delta.group(2))}
    return result


def adb_benchmark(
    serial: str,
    binary: Path | None,
    target: Any,
    models: Sequence[Path],
    *,
    threads: Sequence[int],
    runs: int,
    warmup: int,
) -> BenchReport:
    """``bench --adb``: TensorFlow Lite's ``benchmark_model`` on the phone, as a benchmark report."""
    if target is None:
        target = load_target("android-arm64-cpu")
    if binary is None:
        raise InputError("--adb needs --benchmark-binary PATH (TensorFlow Lite's benchmark_model for Android)")
    device = AdbDevice(serial)
    rows = []
    for t in threads:
        for m in models:
            r = run_benchmark(device, binary, m, benchmark_flags(target, threads=t, runs=runs, warmup=warmup))
            rows.append(_row(m, t, target.execution.delegate.value, r))
    return BenchReport(host=BenchHost(adb_serial=serial), results=tuple(with_ratios(rows)))


def _row(model: Path, threads: int, delegate: str, r: dict[str, Any]) -> BenchRow:
    """One configuration's row; the fields ``benchmark_model`` lacks are NaN (its median is its mean if absent)."""
    nan = float("nan")
    stats = {"p50_ms": r["mean_ms"], "p90_ms": nan, "p99_ms": nan} | r
    return BenchRow(
        model=model.name,
        path=str(model),
        threads=threads,
        size_bytes=model.stat().st_size,
        init_ms=r["init_ms"],
        first_ms=r["first_ms"],
        stats=LatencyStats.from_dict(stats),
        peak_rss_mb=r.get("peak_rss_mb", nan),
        runtime=RuntimeInfo("benchmark_model", None, delegate),
        ratio_p50_to_first=1.0,
        adb=AdbRun(r["warmup_avg_ms"], r["device"], tuple(r["flags"]), r.get("memory_delta_mb")),
    )
