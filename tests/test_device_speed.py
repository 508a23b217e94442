"""quantize's speed decisions timed on the target's own device (``--host``), never on an emulated one.

The CLI runs in a subprocess, as a user runs it, against a real OpenSSH server on 127.0.0.1 (an x86
"device" reached over ssh: the target is the x86 host profile reached over ssh); the emulated case uses
an emulated Raspberry Pi from :mod:`edgeship.targets.emulated_pi` when its root is already built here.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import DeviceError
from tests.conftest import save
from tests.sshd import sshd, sshd_available  # noqa: F401
from tests.test_ssh import PIP_ARGS, device_python

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]
TEXT: dict[str, Any] = {"capture_output": True, "text": True, "check": True}
NEEDS_SSHD = pytest.mark.skipif(
    not sshd_available(), reason="OpenSSH server not installed (apt-get install openssh-server)"
)


def _depthwise_classifier() -> Any:
    """Conv 3x3 -> Relu -> depthwise 7x7 (a timed-placement candidate) -> Relu -> pool -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w1", (16, 3, 3, 3)), init("b1", (16,), 0.1), init("wd", (16, 1, 7, 7), 0.1)]
    inits += [init("bd", (16,), 0.1), init("wf", (10, 16)), init("bf", (10,), 0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["d"], pads=[3, 3, 3, 3], group=16),
        helper.make_node("Relu", ["d"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeship-tests")
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def depthwise_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(_depthwise_classifier(), tmp_path_factory.mktemp("models") / "depthwise.onnx")


def _quantize(model: Path, calib: Path, out: Path, target: str, ssh: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "edgeship", "quantize", str(model), "--calib", str(calib), "-o", str(out)]
    argv += ["--target", target, "--method", "minmax", "--num-calib", "20", "-q", *ssh]
    return subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)


def _loopback(folder: Path) -> Path:
    """The x86 host profile reached over ssh: this machine's architecture, a device like a Pi."""
    target = folder / "loopback.toml"
    text = (ROOT / "targets" / "x86-host.toml").read_text()
    target.write_text(text.replace('name = "x86-host"', 'name = "loopback"').replace('"local"', '"ssh"'))
    return target


def _ssh_args(server: Any) -> list[str]:
    ssh = ["--host", server.spec, "--identity", str(server.identity), "--known-hosts", str(server.known_hosts)]
    return ssh + ["--remote-python", device_python(), "--pip-args", " ".join(PIP_ARGS)]


def _logins(log: Path) -> int:
    return log.read_text(errors="replace").count("Accepted publickey")


@NEEDS_SSHD
def test_quantize_times_placement_and_speed_on_the_ssh_device(
    sshd: Any, depthwise_onnx: Path, calib_images: Path, tmp_path: Path
) -> None:  # noqa: F811
    target = _loopback(tmp_path)
    before = _logins(sshd.log)
    proc = _quantize(depthwise_onnx, calib_images, tmp_path / "q", str(target), _ssh_args(sshd))
    assert proc.returncode in (0, 3), proc.stderr  # 3: the tiny model may miss the SQNR budget; timings still ran
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    timed = report["speed_timing"]
    assert timed["where"] == f"ssh {sshd.spec}" and timed["note"] is None
    assert timed["machine"] == platform.machine() and timed["emulated"] is False
    assert timed["interpreter"] == "ai_edge_litert" and timed["interpreter_version"]
    device = subprocess.run([device_python(), "-c", "import platform; print(platform.python_version())"], **TEXT)
    assert timed["python"] == device.stdout.strip()
    placement = report["placement"]
    assert placement["enabled"] and placement["candidates"] == 1 and placement["ms"]["int8"] > 0
    assert report["speed"]["measured"] and report["speed"]["ms"]["float32"] > 0
    assert timed["measurements"] >= 2  # placement and the speed check (and the speed floor when searched)
    assert _logins(sshd.log) - before >= 4  # probe, install check, copies, bench: all went to the device
    assert f"speed floor and kernel placement: timed on ssh {sshd.spec} ({platform.machine()}" in proc.stdout


@NEEDS_SSHD
def test_deploy_times_the_speed_decisions_of_an_ssh_target_on_its_device(
    sshd: Any, depthwise_onnx: Path, calib_images: Path, tmp_path: Path
) -> None:  # noqa: F811
    target = _loopback(tmp_path)
    argv = [sys.executable, "-m", "edgeship", "deploy", str(depthwise_onnx), "--calib", str(calib_images)]
    argv += ["--target", str(target), "-o", str(tmp_path / "d"), "--num-calib", "20", "--method", "minmax"]
    argv += ["--bench-threads", "1", "--bench-runs", "5", "-q", *_ssh_args(sshd)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode in (0, 3), proc.stderr  # 3: the tiny model's drift on noise images may miss the budget
    timed = json.loads((tmp_path / "d" / "deploy.json").read_text())["targets"]["loopback"]["speed_timing"]
    assert timed["where"] == f"ssh {sshd.spec}" and timed["machine"] == platform.machine() and timed["measurements"]
    quant = next((tmp_path / "d" / "quantize").glob("*/quant_report.json"))
    assert json.loads(quant.read_text())["placement"]["candidates"] == 1
    assert f"speed floor and kernel placement: timed on ssh {sshd.spec}" in proc.stdout


def test_quantize_refuses_a_host_without_an_ssh_target(
    depthwise_onnx: Path, calib_images: Path, tmp_path: Path
) -> None:
    proc = _quantize(depthwise_onnx, calib_images, tmp_path / "q", "x86-host", ["--host", "pi@127.0.0.1:9"])
    assert proc.returncode == 1 and not list(tmp_path.glob("q/*.tflite"))
    assert proc.stderr.strip().splitlines()[-1].endswith("x86-host is not reached over ssh (its access is local)")


def test_an_emulated_device_never_decides_speed(tmp_path: Path) -> None:
    from edgeship.quantize.speed import SpeedTiming, Stopwatch
    from edgeship.runtime.bench_report import BenchDevice, BenchHost, BenchReport

    doc = BenchReport(
        host=BenchHost(machine="aarch64"),
        device=BenchDevice(
            "pi@127.0.0.1:2222", "3.11", "aarch64", emulated="qemu-user (cortex-a72): emulated: not the speed of a Pi"
        ),
        results=(),
    )
    clock = Stopwatch(tmp_path, SpeedTiming(lambda models, runs: doc, where="ssh pi@127.0.0.1:2222"))
    with pytest.raises(DeviceError, match="decides no speed question"):
        clock.latencies({"a": b"x", "b": b"y"}, runs=3, stat="min_ms")
    assert list(tmp_path.iterdir()) == []  # the models written for the probe are gone


def test_placement_is_timed_for_a_target_of_another_architecture_only_on_its_device() -> None:
    from edgeship.quantize import QuantizeOptions
    from edgeship.runtime.delegation import host_arch
    from edgeship.targets import load_target

    other = load_target("rpi4-aarch64" if host_arch() != "aarch64" else "x86-host")  # XNNPACK, another arch
    assert not QuantizeOptions.for_target(other).timed_placement
    assert QuantizeOptions.for_target(other, on_device=True).timed_placement
    assert not QuantizeOptions.for_target(load_target("android-nnapi"), on_device=True).timed_placement  # no XNNPACK


@pytest.fixture(scope="module")
def emulated_pi() -> Iterator[Any]:
    """An emulated rpi4-aarch64 (a running one is reused); skipped unless its root is already built here."""
    from edgeship.targets import emulated_pi as epi

    prof = epi.profile("rpi4-aarch64")
    if os.geteuid() != 0 or not epi.root_ready(epi.root_path(prof, "bookworm")):
        pytest.skip("no emulated rpi4-aarch64 root built here (edgeship emulate start rpi4-aarch64 builds it, as root)")
    try:
        epi.check_host(prof, build=False)
    except Exception as exc:  # no qemu binfmt entry, no ssh client...
        pytest.skip(f"cannot start an emulated Pi here: {exc}")
    running = [pi for pi in epi.running() if pi.name == "rpi4-aarch64" and pi.release == "bookworm"]
    if running:
        yield running[0]
        return
    with epi.emulated("rpi4-aarch64", release="bookworm") as pi:
        yield pi


def test_quantize_says_an_emulated_host_decides_no_speed(
    emulated_pi: Any, depthwise_onnx: Path, calib_images: Path, tmp_path: Path
) -> None:
    ssh = ["--host", emulated_pi.host, "--identity", str(emulated_pi.identity)]
    ssh += ["--known-hosts", str(emulated_pi.known_hosts)]
    proc = _quantize(depthwise_onnx, calib_images, tmp_path / "q", "rpi4-aarch64", ssh)
    assert proc.returncode in (0, 3), proc.stderr
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    skipped = "speed decisions skipped: the rpi4-aarch64 device is emulated, not a Pi's speed"
    assert report["speed_timing"]["where"] == "this machine" and report["speed_timing"]["note"] == skipped
    assert not report["placement"]["enabled"]  # placement is a decision for the Pi: not timed on x86 either
    assert skipped in proc.stdout and "placement skipped" in proc.stdout
