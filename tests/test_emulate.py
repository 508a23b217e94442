"""The emulated aarch64 device: qemu user mode running edgeship's runtime in an arm64 root.

The fast tests need neither qemu nor a network. The slow ones build (once per cache
dir, ~30 s to a few minutes) or reuse the root in ``$EDGESHIP_CACHE`` (default
``~/.cache/edgeship``); they skip when ``qemu-aarch64-static`` is not installed,
unless ``EDGESHIP_REQUIRE_EMULATOR=1`` (set it in CI) turns that into a failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgeship._progress import ProgressFn, silent
from edgeship.errors import DeviceError, InputError, MissingDependencyError
from edgeship.targets import emulate

log = logging.getLogger(__name__)

HAVE_QEMU = shutil.which(emulate.QEMU) is not None
REQUIRE_EMULATOR = os.environ.get("EDGESHIP_REQUIRE_EMULATOR") == "1"
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get not found (not a Debian/Ubuntu host)")


@pytest.fixture(scope="session")
def emulated_root() -> Path:
    """The cached arm64 root, built on first use."""
    if not HAVE_QEMU:
        message = f"{emulate.QEMU} not installed: sudo apt-get install qemu-user-static"
        if REQUIRE_EMULATOR:
            pytest.fail(f"EDGESHIP_REQUIRE_EMULATOR=1 but {message}")
        pytest.skip(message)
    return emulate.ensure_root()


@pytest.fixture(scope="session")
def device(emulated_root: Path) -> emulate.EmulatedDevice:
    return emulate.EmulatedDevice(emulated_root)


# --------------------------------------------------------------------------- fast: no qemu, no network


def test_missing_qemu_raises_missing_dependency(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(emulate, "QEMU", "qemu-aarch64-static-not-installed")
    cache = tmp_path / "cache"
    with pytest.raises(MissingDependencyError, match="apt-get install qemu-user-static"):
        emulate.ensure_root(cache)
    assert not cache.exists()  # checked before anything is downloaded or created
    with pytest.raises(MissingDependencyError, match="qemu-aarch64-static-not-installed"):
        emulate.run_python(["-c", "pass"], root=tmp_path)
    with pytest.raises(MissingDependencyError):
        emulate.EmulatedDevice(cache_dir=cache).collect_outputs(tmp_path / "m.tflite", tmp_path)


def test_source_folder_maps_the_repository_folders_into_one_package(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = emulate.source_folder(root)
    assert emulate.source_folder(root) == folder  # reused
    shutil.rmtree(folder)
    assert emulate.source_folder(root) == folder  # re-created when missing
    # -S: no .pth files, so the editable install's finder cannot be what resolves the imports
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = "import edgeship.runtime.collect as c, edgeship.targets.profile as p; print(c.__file__); print(p.__file__)"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), site])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    collect_file, profile_file = (Path(line) for line in out.stdout.split())
    assert str(collect_file).startswith(str(folder))
    import edgeship.runtime.collect
    import edgeship.targets.profile

    assert collect_file.resolve() == Path(edgeship.runtime.collect.__file__).resolve()
    assert profile_file.resolve() == Path(edgeship.targets.profile.__file__).resolve()


def _fake_build(calls: list[Path]) -> Callable[[Path, str, ProgressFn], None]:
    def build(work: Path, qemu: str, progress: ProgressFn) -> None:
        calls.append(work)
        root = work / "root"
        (root / emulate.GUEST_PYTHON).parent.mkdir(parents=True)
        (root / emulate.GUEST_PYTHON).write_text("")
        emulate.atomic_write_json(root / emulate.MARKER, {"spec": emulate.root_spec()})

    return build


def test_half_built_or_outdated_root_is_rebuilt_not_reused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(emulate, "require_qemu", lambda: "/usr/bin/true")
    monkeypatch.setattr(emulate, "_require_build_tools", lambda: None)
    monkeypatch.setattr(emulate, "_build_root", _fake_build(calls))
    half = tmp_path / emulate.ROOT_NAME
    (half / "usr" / "bin").mkdir(parents=True)
    (half / "usr" / "bin" / "python3.11").write_text("")  # a python but no marker: interrupted build
    (tmp_path / f".{emulate.ROOT_NAME}.building-x1").mkdir()  # leftover of a crashed build
    root = emulate.ensure_root(tmp_path)
    assert root == half and len(calls) == 1 and emulate.root_ready(root)
    assert not list(tmp_path.glob(f".{emulate.ROOT_NAME}.*-*")), "temporary folders left behind"
    assert emulate.ensure_root(tmp_path) == root and len(calls) == 1  # reused
    emulate.atomic_write_json(root / emulate.MARKER, {"spec": {"format": 0}})
    emulate.ensure_root(tmp_path)
    assert len(calls) == 2  # another spec: rebuilt


def test_failed_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(work: Path, qemu: str, progress: ProgressFn) -> None:
        (work / "root" / "usr").mkdir(parents=True)
        raise DeviceError("building the aarch64 root: simulated failure")

    monkeypatch.setattr(emulate, "require_qemu", lambda: "/usr/bin/true")
    monkeypatch.setattr(emulate, "_require_build_tools", lambda: None)
    monkeypatch.setattr(emulate, "_build_root", broken)
    with pytest.raises(DeviceError, match="simulated failure"):
        emulate.ensure_root(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{emulate.ROOT_NAME}.lock"]


def test_apt_configuration_is_private(tmp_path: Path) -> None:
    conf = emulate._apt_config(tmp_path).read_text()
    assert 'APT::Architecture "arm64";' in conf
    for key in ("Dir::Etc", "Dir::State", "Dir::State::status", "Dir::Cache"):
        assert f'{key} "{tmp_path}' in conf, key
    assert "/etc/apt" not in conf and "/var/lib" not in conf
    sources = (tmp_path / "etc" / "sources.list").read_text()
    assert "arch=arm64" in sources and f"signed-by={emulate.DEBIAN_KEYRING}" in sources


@needs_apt
def test_offline_apt_is_one_device_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not Path(emulate.DEBIAN_KEYRING).is_file():
        pytest.skip(f"{emulate.DEBIAN_KEYRING} not installed")
    monkeypatch.setattr(emulate, "require_qemu", lambda: "/usr/bin/true")
    monkeypatch.setenv("EDGESHIP_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    with pytest.raises(
        DeviceError, match=r"apt-get update of http://127\.0\.0\.1:9/debian bookworm arm64 failed"
    ) as exc:
        emulate.ensure_root(tmp_path)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / emulate.ROOT_NAME).exists()


def test_offline_pip_is_one_device_error_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in {
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_NO_INDEX": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's extra indexes and links
    with pytest.raises(DeviceError, match="pip install of the aarch64 wheels failed") as exc:
        emulate._install_wheels(tmp_path / "site", silent)
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- slow: the real emulator


@pytest.mark.slow
def test_emulated_collect_matches_the_host(
    device: emulate.EmulatedDevice, tiny_bundle: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgeship
    from edgeship.runtime.candidate import candidate_outputs

    monkeypatch.chdir(Path(edgeship.__file__).parents[1])  # its edgeship/ must not shadow the guest's package
    logits, files, describe = device.collect_outputs(tiny_bundle, tiny_images)
    host, host_describe = candidate_outputs(tiny_bundle, [tiny_images / f for f in files])
    assert files == sorted(p.name for p in tiny_images.iterdir())
    assert describe["machine"] == "aarch64" and describe["cpu"] == emulate.DEFAULT_CPU
    assert describe["interpreter"] == "ai_edge_litert" and describe["delegate"] == "xnnpack"
    diff = float(np.abs(logits - host).max())
    log.warning("emulated aarch64 vs host (XNNPACK): max abs diff %.3g over %s logits", diff, logits.shape)
    assert logits.shape == host.shape and diff <= 1e-4 * max(1.0, float(np.abs(host).max()))
    assert (logits.argmax(1) == host.argmax(1)).all()


@pytest.mark.slow
def test_emulated_collect_passes_threads_and_delegate(
    device: emulate.EmulatedDevice, tiny_bundle: Path, tiny_images: Path
) -> None:
    logits, _, describe = device.collect_outputs(
        tiny_bundle / "model_float32.tflite", tiny_images, threads=1, use_xnnpack=False
    )
    assert describe["delegate"] == "none" and logits.shape[0] == 12 and np.isfinite(logits).all()


@pytest.mark.slow
def test_bad_model_is_a_device_error_with_the_guest_message(
    device: emulate.EmulatedDevice, tiny_images: Path, tmp_path: Path
) -> None:
    with pytest.raises(DeviceError, match=r"exited with code 1 .*edgeship\.runtime\.collect: error: .*does not exist"):
        device.collect_outputs(tmp_path / "missing.tflite", tiny_images)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer" * 8)
    with pytest.raises(DeviceError, match="cannot load TFLite model") as exc:
        device.collect_outputs(junk, tiny_images)
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_guest_crash_exit_and_timeout_are_device_errors(emulated_root: Path) -> None:
    ok = emulate.run_python(["-c", "import platform; print(platform.machine())"], root=emulated_root)
    assert ok.stdout.strip() == "aarch64"
    with pytest.raises(DeviceError, match="exited with code 1 .*: boom$"):
        emulate.run_python(["-c", "import sys; sys.exit('boom')"], root=emulated_root)
    with pytest.raises(DeviceError, match=r"crashed \(SIGSEGV\)"):
        emulate.run_python(["-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], root=emulated_root)
    with pytest.raises(DeviceError, match="timed out after 2 s"):
        emulate.run_python(["-c", "import time; time.sleep(60)"], root=emulated_root, timeout=2)
    failed = emulate.run_python(["-c", "raise SystemExit(3)"], root=emulated_root, check=False)
    assert failed.returncode == 3


def test_run_python_refuses_an_incomplete_root(tmp_path: Path) -> None:
    if not HAVE_QEMU:
        pytest.skip(f"{emulate.QEMU} not installed")
    with pytest.raises(DeviceError, match="not a complete aarch64 root"):
        emulate.run_python(["-c", "pass"], root=tmp_path)


def test_cli_verify_and_deploy_emulated(
    emulated_root: Path,
    tiny_onnx: Path,
    tiny_bundle: Path,
    calib_images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`verify --emulate` and `deploy --emulate` run the aarch64 targets' checks on aarch64 kernels."""
    import json

    from edgeship.cli import main

    q = tmp_path / "q"
    assert (
        main(["quantize", str(tiny_bundle), "--calib", str(calib_images), "--num-calib", "20", "-o", str(q), "-q"]) == 0
    )
    report = tmp_path / "drift.json"
    assert (
        main(
            [
                "verify",
                str(tiny_onnx),
                str(q / "model_int8.tflite"),
                "--images",
                str(calib_images),
                "--target",
                "rpi4-aarch64",
                "--emulate",
                "-r",
                str(report),
                "-q",
            ]
        )
        == 0
    )
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["candidate"]["runtime"]["machine"] == "aarch64"
    assert doc["candidate"]["ran_on"].startswith("qemu-user aarch64")
    # One rule for verify and deploy: a non-aarch64 target runs on this machine, and the report says so.
    assert (
        main(
            [
                "verify",
                str(tiny_onnx),
                str(q / "model_int8.tflite"),
                "--images",
                str(calib_images),
                "--target",
                "x86-host",
                "--emulate",
                "-r",
                str(tmp_path / "x.json"),
                "-q",
            ]
        )
        == 0
    )
    doc = json.loads((tmp_path / "x.json").read_text())
    assert doc["candidate"]["ran_on"].startswith("this machine")
    assert any("--emulate runs aarch64 only" in n for n in doc["notes"]), doc["notes"]
    out = tmp_path / "deploy"
    assert (
        main(
            [
                "deploy",
                str(tiny_onnx),
                "--calib",
                str(calib_images),
                "--num-calib",
                "20",
                "--target",
                "rpi4-aarch64",
                "--target",
                "x86-host",
                "--emulate",
                "--bench-runs",
                "5",
                "--bench-threads",
                "1",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    targets = json.loads((out / "deploy.json").read_text())["targets"]
    assert targets["rpi4-aarch64"]["ran_on"].startswith("qemu-user aarch64")
    assert targets["x86-host"]["ran_on"].startswith("this machine")


def test_every_emulated_cpu_is_one_this_qemu_knows() -> None:
    """The Pi 4's and Pi 5's CPU models are in this qemu-user's ``-cpu help`` (no silent fallback to another)."""
    from edgeship.targets import emulated_pi

    qemu = shutil.which("qemu-aarch64-static")
    if qemu is None:
        pytest.skip("qemu-user-static not installed")
    known = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=60).stdout.split()
    assert emulate.cpu_for("rpi5-aarch64") == "cortex-a76" == emulated_pi.profile("rpi5-aarch64").qemu_cpu
    assert emulate.cpu_for("rpi4-aarch64") == emulate.DEFAULT_CPU == emulated_pi.profile("rpi4-aarch64").qemu_cpu
    for cpu in emulate.TARGET_CPUS.values():
        assert cpu in known, cpu


def test_emulated_pi_roots_are_one_per_release_and_arch(tmp_path: Path) -> None:
    from edgeship.targets import emulated_pi

    rpi4, rpi5, armv7 = (emulated_pi.profile(n) for n in ("rpi4-aarch64", "rpi5-aarch64", "rpi-armv7"))
    paths = {
        (release, prof.name): emulated_pi.root_path(prof, release, cache=tmp_path)
        for release in emulated_pi.RELEASES
        for prof in (rpi4, rpi5, armv7)
    }
    assert len(set(paths.values())) == 4  # the Pi 5 shares the Pi 4's arm64 root, its CPU differs
    assert paths["trixie", "rpi4-aarch64"] == paths["trixie", "rpi5-aarch64"] and rpi5.qemu_cpu != rpi4.qemu_cpu
    assert "python3-onnxruntime" in armv7.packages("trixie") and "python3-onnxruntime" not in armv7.packages("bookworm")
    assert emulated_pi.DEFAULT_RELEASE == "trixie"
    with pytest.raises(InputError, match="valid releases: bookworm, trixie"):
        emulated_pi.root_path(rpi4, "sid", cache=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "edgeship", "emulate", "start", "rpi4-aarch64", "--release", "sid"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "invalid choice: 'sid'" in proc.stderr


def test_root_build_past_its_time_is_stopped_with_its_children(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A build that overruns is stopped as a group (mmdebstrap's apt and dpkg too), and its mounts are undone."""
    from edgeship.targets import emulated_pi

    monkeypatch.setattr(emulated_pi, "BUILD_TIMEOUT", 2.0)
    monkeypatch.setattr(emulated_pi, "STOP_GRACE", 5.0)
    pid_file = tmp_path / "child.pid"
    with pytest.raises(DeviceError, match="did not finish in 2 s"):
        emulated_pi._run_build(["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], "a build")
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    if os.geteuid() != 0:
        return
    (tmp_path / "root" / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "root" / "proc")], check=True)
    emulated_pi._unmount_under(tmp_path)
    assert str(tmp_path / "root" / "proc") not in Path("/proc/self/mounts").read_text()
