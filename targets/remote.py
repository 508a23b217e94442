"""Running edgeship's device-side modules on a reachable target (ssh) and bringing results back."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.errors import DeviceError, EdgeshipError, TargetError
from edgeship.runtime.bench_report import BenchDevice, BenchReport, SpeedVerdict
from edgeship.targets.install import device_requirements, uses_system_packages
from edgeship.targets.profile import Target
from edgeship.targets.ssh import new_job, remote_collect, remove_job


class SshCollector:
    """Adapter: runs ``edgeship.runtime.collect`` over ssh for a drift check."""

    def __init__(self, device: Any, target: Target, *, pip_args: Sequence[str] = ()) -> None:
        self.device = device
        self.target = target
        self.pip_args = tuple(pip_args)

    def collect_outputs(
        self, model_dir: Path, image_dir: Path, *, threads: int | None = None, use_xnnpack: bool = True
    ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        check_arch(self.device, self.target)
        target = on_device(self.device, self.target)
        logits, names, runtime = remote_collect(
            self.device,
            model_dir,
            image_dir,
            requirements=device_requirements(target),
            threads=threads,
            use_xnnpack=use_xnnpack,
            pip_args=self.pip_args,
            system_site_packages=uses_system_packages(target),
        )
        return logits, names, {**runtime, **device_facts(self.device)}


def device_facts(device: Any) -> dict[str, Any]:
    """What a report records about the device: its Python, ``uname -m``, whether it is emulated, the install."""
    facts = device.probe()
    install = (
        {
            k: device.last_install.get(k)
            for k in ("command", "seconds", "reused", "updated", "requirements_sha256", "requirements")
            if device.last_install.get(k) is not None
        }
        if device.last_install
        else {}
    )
    return {
        "python": facts.get("python"),
        "machine": facts.get("machine"),
        **({"release": facts["release"]} if facts.get("release") else {}),
        **({"emulated": facts["emulated"]} if facts.get("emulated") else {}),
        **({"install": install} if install else {}),
    }


#: How ``uname -m`` spells each target architecture.
_MACHINES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64"), "armv7l": ("armv7l", "armv7", "armv8l")}


def check_arch(device: Any, target: Target) -> None:
    """Refuse to call a device the target when its CPU architecture differs."""

    machine = str(device.probe().get("machine", "")).lower()
    if machine and machine not in _MACHINES.get(target.arch.value, (target.arch.value,)):
        raise TargetError(
            f"the device at {getattr(device.target, 'where', device.target)} is {machine}, but target "
            f"{target.name} is {target.arch.value}; pick the target that matches the device"
        )


def on_device(device: Any, target: Target) -> Target:
    """``target`` as it runs on the device's OS release (``/etc/os-release``, else its Python).

    Raises:
        TargetError: The target refuses that release (one line: what to use instead).
    """
    facts = device.probe()
    return target.on_release(target.release_for(facts.get("release"), facts.get("python")))


def ssh_benchmark(
    device: Any,
    target: Target,
    models: Sequence[Path],
    args: Sequence[str],
    *,
    pip_args: Sequence[str] = (),
    progress: Callable[[str, int | None, int | None], None] | None = None,
    images: Sequence[Path] = (),
) -> BenchReport:
    """Copy the models (with their cards) and ``images`` to the device, run ``python -m edgeship.runtime.bench``
    there (``--image`` for each image: end to end through the same runtime code), return its bench.json."""
    # deferred: looked up at call time, so that a test can stand in for the wheel builder
    from edgeship.wheel import build_edgeship_wheel, default_wheel_cache

    if progress:
        progress("prepare device", None, None)
    check_arch(device, target)
    target = on_device(device, target)
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        wheel = build_edgeship_wheel(default_wheel_cache())
        python = device.ensure_venv(
            device_requirements(target),
            wheels=[wheel],
            pip_args=pip_args,
            system_site_packages=uses_system_packages(target),
        )
        remote = new_job(device)
        try:
            names = []
            for i, m in enumerate(models):
                if progress:
                    progress(f"copy {m.name}", None, None)
                # A name chosen here, never the user's: scp may hand remote paths to the device's shell.
                name = f"model{i}{m.suffix.lower() if m.suffix.lower() in ('.tflite', '.onnx') else '.tflite'}"
                device.push(m, f"{remote}/{name}")
                names.append(f"{remote}/{name}")
                card = m.with_name(m.stem + ".card.json")
                card = card if card.is_file() else m.parent / "model_card.json"
                if m.suffix.lower() == ".tflite" and card.is_file():  # end to end needs the model's preprocessing
                    device.push(card, f"{remote}/model{i}.card.json")
            image_args: list[str] = []
            for i, f in enumerate(images):
                suffix = f.suffix.lower() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp") else ".jpg"
                device.push(f, f"{remote}/image{i}{suffix}")
                image_args += ["--image", f"{remote}/image{i}{suffix}"]
            if progress:
                progress(f"benchmark on {getattr(device, 'target', device)}", None, None)
            device.run_module(
                python,
                "edgeship.runtime.bench",
                [*names, *args, *image_args, "-o", f"{remote}/bench.json"],
                timeout=3600,
            )
            device.pull(f"{remote}/bench.json", Path(tmp) / "bench.json")
            report = _read_bench(Path(tmp) / "bench.json")
            where = str(getattr(device.target, "where", device.target))
            report = replace(report, device=BenchDevice.from_dict({"where": where, **device_facts(device)}))
            return _original_names(report, names, models)
        finally:
            remove_job(device, remote)


def _read_bench(path: Path) -> BenchReport:
    """The device's bench.json, read at the boundary (DeviceError when it is missing or not a benchmark)."""
    try:
        return BenchReport.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, EdgeshipError) as exc:
        raise DeviceError(f"no usable bench.json came back from the device: {exc}") from exc


def _original_names(report: BenchReport, remote: Sequence[str], models: Sequence[Path]) -> BenchReport:
    """Put the user's model names back into a benchmark made from the fixed remote names."""
    by_remote = {r: m for r, m in zip(remote, models)}
    by_name = {Path(r).name: m for r, m in zip(remote, models)}
    rows = []
    for row in report.results:
        m = by_remote.get(row.path) or by_name.get(row.model)
        rows.append(row if m is None else replace(row, model=m.name, path=str(m), device_path=row.path))
    return replace(report, results=tuple(rows))


def latency_probe(
    device: Any,
    target: Target,
    *,
    pip_args: Sequence[str] = (),
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> Callable[[Sequence[Path], int], BenchReport]:
    """quantize's latency probe on ``device`` (:data:`edgeship.quantize.speed.LatencyProbe`): the models timed
    interleaved at 1 thread on XNNPACK by the device's runtime, installed as for a drift check.

    Raises:
        TargetError: The device is not the target's architecture (found now, before any quantizing).
    """
    check_arch(device, target)
    on_device(device, target)  # a release the target refuses is found now, before any quantizing

    def probe(models: Sequence[Path], runs: int) -> BenchReport:
        args = ["--threads", "1", "--runs", str(runs), "--warmup", "5"]
        return ssh_benchmark(device, target, models, args, pip_args=pip_args, progress=progress)

    return probe


#: invoke() runs per model on an emulated device (seconds each under qemu; the figures are labelled anyway).
EMULATED_RUNS = 3


def device_bench(
    device: Any,
    target: Target,
    models: Sequence[Path],
    *,
    runs: int,
    pip_args: Sequence[str] = (),
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> BenchReport:
    """Benchmark ``models`` on the device with the target's threads and delegate; add :func:`speed_verdict`.

    An emulated device gets :data:`EMULATED_RUNS` runs: its timings are labelled and decide nothing.
    """
    emulated = device.probe().get("emulated")
    n = min(runs, EMULATED_RUNS) if emulated else runs
    args = [
        "--threads",
        str(target.execution.threads),
        "--runs",
        str(n),
        "--warmup",
        "1" if emulated else "10",
        *([] if target.execution.use_xnnpack else ["--no-xnnpack"]),
    ]
    report = ssh_benchmark(device, target, models, args, pip_args=pip_args, progress=progress)
    return replace(report, target=target.name, speed=speed_verdict(report))


def speed_verdict(report: BenchReport) -> SpeedVerdict | None:
    """Which of the benchmarked models is fastest on the device (p50), and what that means for the target.

    On an emulated device the answer is shown, labelled, and recommends nothing: the emulator's
    relative speeds are not a Pi's.
    """

    rows = {r.model: r.stats.p50_ms for r in report.results}
    if not rows:
        return None
    fastest = min(rows, key=rows.__getitem__)
    label = report.emulated
    if label:
        advice = (
            f"{fastest} is fastest under emulation; not a speed decision: run edgeship bench --host on the real device"
        )
    else:
        advice = f"ship {fastest}: fastest on this device"
    machine = report.device.machine if report.device else None
    return SpeedVerdict(p50_ms=rows, fastest=fastest, machine=machine, emulated=label, recommendation=advice)


def device_speed_lines(speeds: Mapping[str, SpeedVerdict]) -> list[str]:
    """Report lines: each target's device benchmark (target name -> its verdict), the fastest model there and the
    recommendation."""
    lines = []
    for name, speed in speeds.items():
        figures = ", ".join(f"{m} {ms:.1f} ms" for m, ms in speed.p50_ms.items())
        lines.append(
            f"{name} on its device ({speed.machine or '?'}), invoke() p50: {figures}"
            f"{' [' + speed.emulated + ']' if speed.emulated else ''}: "
            f"{speed.recommendation}."
        )
    return lines
