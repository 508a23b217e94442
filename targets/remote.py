"""Running edgeship's device-side modules on a reachable target (ssh) and bringing results back."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeship.errors import DeviceError, TargetError
from edgeship.runtime.bench import emulated_label
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
        logits, names, runtime = remote_collect(
            self.device,
            model_dir,
            image_dir,
            requirements=device_requirements(self.target),
            threads=threads,
            use_xnnpack=use_xnnpack,
            pip_args=self.pip_args,
            system_site_packages=uses_system_packages(self.target),
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


def ssh_benchmark(
    device: Any,
    target: Target,
    models: Sequence[Path],
    args: Sequence[str],
    *,
    pip_args: Sequence[str] = (),
    progress: Callable[[str, int | None, int | None], None] | None = None,
    images: Sequence[Path] = (),
) -> dict[str, Any]:
    """Copy the models (with their cards) and ``images`` to the device, run ``python -m edgeship.runtime.bench``
    there (``--image`` for each image: end to end through the same runtime code), return its bench.json."""
    # deferred: looked up at call time, so that a test can stand in for the wheel builder
    from edgeship.wheel import build_edgeship_wheel, default_wheel_cache

    if progress:
        progress("prepare device", None, None)
    check_arch(device, target)
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
            try:
                doc = json.loads((Path(tmp) / "bench.json").read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise DeviceError(f"no usable bench.json came back from the device: {exc}") from exc
            doc["device"] = {"where": str(getattr(device.target, "where", device.target)), **device_facts(device)}
            return _original_names(doc, names, models)
        finally:
            remove_job(device, remote)


def _original_names(doc: dict[str, Any], remote: Sequence[str], models: Sequence[Path]) -> dict[str, Any]:
    """Put the user's model names back into a bench.json made from the fixed remote names."""
    by_remote = {r: m for r, m in zip(remote, models)}
    by_name = {Path(r).name: m for r, m in zip(remote, models)}
    for row in doc.get("results", []) if isinstance(doc, dict) else []:
        m = by_remote.get(str(row.get("path"))) or by_name.get(str(row.get("model")))
        if m is not None:
            row["device_path"] = row.get("path")
            row["model"], row["path"] = m.name, str(m)
    return doc


def latency_probe(
    device: Any,
    target: Target,
    *,
    pip_args: Sequence[str] = (),
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> Callable[[Sequence[Path], int], dict[str, Any]]:
    """quantize's latency probe on ``device`` (:data:`edgeship.quantize.speed.LatencyProbe`): the models timed
    interleaved at 1 thread on XNNPACK by the device's runtime, installed as for a drift check.

    Raises:
        TargetError: The device is not the target's architecture (found now, before any quantizing).
    """
    check_arch(device, target)

    def probe(models: Sequence[Path], runs: int) -> dict[str, Any]:
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
) -> dict[str, Any]:
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
    doc = ssh_benchmark(device, target, models, args, pip_args=pip_args, progress=progress)
    doc["target"] = target.name
    doc["speed"] = speed_verdict(doc)
    return doc


def speed_verdict(doc: dict[str, Any]) -> dict[str, Any]:
    """Which of the benchmarked models is fastest on the device (p50), and what that means for the target.

    On an emulated device the answer is shown, labelled, and recommends nothing: the emulator's
    relative speeds are not a Pi's.
    """

    rows = {r["model"]: r["p50_ms"] for r in doc.get("results", [])}
    if not rows:
        return {}
    fastest = min(rows, key=rows.__getitem__)
    label = emulated_label(doc)
    verdict = {
        "p50_ms": rows,
        "fastest": fastest,
        "machine": (doc.get("device") or {}).get("machine"),
        "emulated": label,
    }
    if label:
        verdict["recommendation"] = (
            f"{fastest} is fastest under emulation; not a speed decision: run edgeship bench --host on the real device"
        )
    else:
        verdict["recommendation"] = f"ship {fastest}: fastest on this device"
    return verdict


def device_speed_lines(summary: dict[str, Any]) -> list[str]:
    """Report lines: each target's device benchmark, the fastest model there and the recommendation."""
    lines = []
    for name, t in summary.get("targets", {}).items():
        speed = (t.get("device_bench") or {}).get("speed") or {}
        if speed:
            figures = ", ".join(f"{m} {ms:.1f} ms" for m, ms in speed["p50_ms"].items())
            lines.append(
                f"{name} on its device ({speed.get('machine') or '?'}), invoke() p50: {figures}"
                f"{' [' + speed['emulated'] + ']' if speed.get('emulated') else ''}: "
                f"{speed['recommendation']}."
            )
    return lines
