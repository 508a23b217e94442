"""The Raspberry Pi path end to end on emulated Pis reachable over ssh, and the pieces it is made of.

The slow tests bring up four emulated Pis (:mod:`edgeship.targets.emulated_pi`: Debian bookworm
and trixie, arm64 and armhf roots under qemu-user, their own sshd on 127.0.0.1), run ``edgeship
deploy`` on the real MobileNetV2 with ``--host TARGET=...`` per OS release, and check on the devices
what a user would; rpi-armv7 on trixie runs the int8 ONNX QDQ model on the OS's onnxruntime. They need root,
mmdebstrap,
qemu-user-static (binfmt) and the network to Debian's mirror and PyPI; they skip without them unless
``EDGESHIP_REQUIRE_EMULATOR=1`` (CI) makes that a failure.
Roots (``$EDGESHIP_CACHE/emulated-pi``) and the device venvs and pip caches inside them are kept
between runs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeship.errors import DelegateNotAppliedError, InputError
from edgeship.targets import load_target
from edgeship.targets.devices import DeviceSpec, parse_hosts

log = logging.getLogger(__name__)

REQUIRE = os.environ.get("EDGESHIP_REQUIRE_EMULATOR") == "1"
#: Held-apart images the drift checks run on each device (named in the report). 100 keeps four emulated Pis
#: within CI's time: on 100 images one image is 1 point, the targets' top-1 drop budget, and the agreement
#: budget (97.5 %) allows two disagreements; the report's 95 % intervals (Wilson, about [96, 100] at 100 %)
#: say when a verdict lies within noise of the budget. Every held-apart image (400) is for a closing run.
MAX_EVAL = 100
EXPECTED = {
    "rpi4-aarch64": {"machine": "aarch64", "interpreter": "ai_edge_litert", "pin": "ai-edge-litert==2.1.0"},
    "rpi-armv7": {"machine": "armv7l", "interpreter": "tflite_runtime", "pin": "tflite-runtime==2.14.0"},
}
#: What differs on one OS release: rpi-armv7 on trixie runs the int8 ONNX QDQ model on the OS's onnxruntime
#: (apt: no pip pin; the bundle's requirements.txt holds only the edgeship wheel).
ON_RELEASE = {("trixie", "rpi-armv7"): {"interpreter": "onnxruntime", "pin": "", "model": ".onnx"}}
#: What deploy --host runs on each OS release's emulated Pis (their Python), and the devices started for it.
RELEASES = {
    "bookworm": {"python": "3.11", "targets": ("rpi4-aarch64", "rpi-armv7")},
    "trixie": {"python": "3.13", "targets": ("rpi4-aarch64", "rpi-armv7")},
}
#: The releases whose emulated Pis run here: both by default (EDGESHIP_PI_RELEASES=bookworm runs one).
RUN_RELEASES = [r for r in os.environ.get("EDGESHIP_PI_RELEASES", "bookworm,trixie").split(",") if r in RELEASES]
DEVICES = [(release, name) for release in RUN_RELEASES for name in EXPECTED]


def _want(release: str, name: str) -> dict[str, str]:
    """What the drift check on ``release``'s ``name`` device runs (interpreter, bundle pin, model suffix)."""
    return {"model": ".tflite", **EXPECTED[name], **ON_RELEASE.get((release, name), {})}


def _needs(release: str) -> None:
    if release not in RUN_RELEASES:
        pytest.skip(f"the emulated {release} Pis run only with EDGESHIP_PI_RELEASES naming {release}")


# --------------------------------------------------------------------------- fast: no emulator


def test_host_flags_map_targets_to_devices() -> None:
    host, hosts = parse_hosts(["rpi4-aarch64=pi@127.0.0.1:2222", "rpi-armv7=pi@127.0.0.1:2223"])
    spec = DeviceSpec("ssh", host=host, hosts=hosts)
    assert spec.for_target("rpi-armv7").host == "pi@127.0.0.1:2223"
    assert spec.for_target("rpi4-aarch64").host == "pi@127.0.0.1:2222"
    assert spec.for_target("rpi5-aarch64").kind == "local"  # no device named for it: runs here, with a note
    assert DeviceSpec.from_dict(spec.to_dict()) == spec
    single = DeviceSpec("ssh", *parse_hosts(["pi@box"])[:1])
    assert single.for_target("rpi4-aarch64").host == "pi@box"  # a bare --host still serves every ssh target
    with pytest.raises(InputError, match="without a target"):
        parse_hosts(["pi@a", "pi@b"])
    with pytest.raises(InputError, match="twice"):
        DeviceSpec("ssh", hosts=(("rpi-armv7", "pi@a"), ("rpi-armv7", "pi@b")))


def test_cli_refuses_a_host_for_another_target(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeship",
            "verify",
            str(tmp_path / "m.onnx"),
            str(tmp_path),
            "--images",
            str(tmp_path),
            "--target",
            "rpi-armv7",
            "--host",
            "rpi4-aarch64=pi@h",
            "-r",
            str(tmp_path / "d.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and not (tmp_path / "d.json").exists()
    assert proc.stderr.strip().splitlines()[-1].endswith("which is not a --target of this command (rpi-armv7)")


@pytest.fixture(scope="module")
def tiny_pi_int8(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, calib_images: Path) -> Path:
    """The tiny model quantized for the Pi targets (int8 I/O)."""
    from edgeship.cli import main

    out = tmp_path_factory.mktemp("q") / "int8"
    assert (
        main(
            [
                "quantize",
                str(tiny_bundle),
                "--calib",
                str(calib_images),
                "-o",
                str(out),
                "-q",
                "--num-calib",
                "20",
                "--target",
                "rpi4-aarch64",
            ]
        )
        == 0
    )
    return out / "model_int8.tflite"


def test_bundles_pin_the_interpreter_and_install_like_the_device(tiny_pi_int8: Path, tmp_path: Path) -> None:
    from edgeship.targets.bundle import bundle

    model = tiny_pi_int8
    for name in EXPECTED:
        out = bundle(model, load_target(name), tmp_path / name, interpreter_version=None, python="3.11.2").out_dir
        reqs = (out / "requirements.txt").read_text().splitlines()
        readme = (out / "README.md").read_text()
        assert EXPECTED[name]["pin"] in reqs, reqs  # exactly the version the checks ran with
        assert reqs[-1].startswith("./wheels/edgeship-") and (out / reqs[-1]).is_file()
        assert "### Raspberry Pi OS bookworm (Python 3.11)" in readme and "### Raspberry Pi OS trixie" in readme
        assert "python3 check_device.py && python3 -m venv" in readme
        if name == "rpi-armv7":
            assert "numpy>=1.23,<2" in reqs and not any(r.lower().startswith("pillow") for r in reqs)
            assert "sudo apt install python3-numpy python3-pil" in readme
            assert "python3 -m venv --system-site-packages .venv && .venv/bin/pip install -r requirements.txt" in readme
            assert "Not this bundle: rpi-armv7 runs the int8 ONNX QDQ model there" in readme  # its trixie section
        else:
            assert "numpy>=1.23.2" in reqs  # no numpy<2 cap: numpy 1.x has no wheel for Python 3.13
            assert "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt" in readme
            assert "Not this bundle: it was verified on bookworm" in readme
    pinned = bundle(model, load_target("rpi4-aarch64"), tmp_path / "v", interpreter_version="2.3.0").out_dir
    assert "ai-edge-litert==2.3.0" in (pinned / "requirements.txt").read_text().splitlines()


def test_bundle_on_an_unverified_python_stops_in_one_line(tiny_pi_int8: Path, tmp_path: Path) -> None:
    """check_device.py, run by this machine's Python as the README runs it, refuses a bundle verified elsewhere."""
    from edgeship.targets.bundle import bundle

    here = ".".join(map(str, sys.version_info[:2]))
    other = "3.13.5" if here != "3.13" else "3.11.2"
    out = bundle(tiny_pi_int8, load_target("rpi4-aarch64"), tmp_path / "b", python=other).out_dir
    proc = subprocess.run([sys.executable, "check_device.py"], cwd=out, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"verified on Python {other[:4]}" in proc.stderr and f"this device has Python {here}." in proc.stderr
    same = bundle(tiny_pi_int8, load_target("rpi4-aarch64"), tmp_path / "s", python=f"{here}.0").out_dir
    ok = subprocess.run([sys.executable, "check_device.py"], cwd=same, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and not ok.stderr


def test_targets_name_their_os_releases_and_armv7_runs_onnx_on_trixie(tiny_pi_int8: Path, tmp_path: Path) -> None:
    from edgeship.errors import ModelTargetMismatchError, TargetError
    from edgeship.targets.bundle import bundle
    from edgeship.targets.install import device_requirements

    armv7 = load_target("rpi-armv7")
    assert [r.name for r in armv7.releases] == ["bookworm", "trixie"]
    trixie = armv7.release_for("trixie", "3.13.5")
    assert trixie is not None and trixie.source == "apt" and trixie.model_format == "onnx-qdq" and not trixie.refuse
    assert armv7.release_for(None, "3.11.2") == armv7.release("bookworm")  # no os-release: by Python
    with pytest.raises(ModelTargetMismatchError) as mismatch:  # a TFLite model is not what trixie's runtime runs
        bundle(tiny_pi_int8, armv7, tmp_path / "t", python="3.13.5")
    assert "runs onnx-qdq models on trixie, this one is tflite" in str(mismatch.value)
    assert not (tmp_path / "t").exists()  # nothing half-written
    apt = armv7.on_release(trixie)
    assert apt.runtime.source == "apt" and "python3-onnxruntime" in apt.runtime.system_packages
    assert device_requirements(apt) == [] and apt.pip_requirements() == []  # nothing from PyPI but the wheel
    rpi4 = load_target("rpi4-aarch64").on_release(load_target("rpi4-aarch64").release("trixie"))
    assert rpi4.runtime.package == "ai-edge-litert" and rpi4.runtime.python == "==3.13.*"
    # A release no runtime carries the model on still refuses in one line (a profile that says so).
    refusing = tmp_path / "refusing.toml"
    from importlib import resources

    source = resources.files("edgeship.targets").joinpath("rpi-armv7.toml").read_text(encoding="utf-8")
    refusing.write_text(source + '\nrefuse = "use rpi4-aarch64 on the 64-bit OS"\n')  # the last table: trixie
    with pytest.raises(TargetError) as info:
        bundle(tiny_pi_int8, load_target(refusing), tmp_path / "r", python="3.13.5")
    assert "\n" not in str(info.value) and str(info.value).endswith("use rpi4-aarch64 on the 64-bit OS")
    assert not (tmp_path / "r").exists()
    shown = subprocess.run(
        [sys.executable, "-m", "edgeship", "targets", "show", "rpi-armv7"], capture_output=True, text=True, timeout=120
    )
    rows = [ln for ln in shown.stdout.splitlines() if ln.strip().startswith("[release ")]
    assert len(rows) == 2 and "tflite-runtime==2.14.0 from pip" in rows[0]
    assert "onnxruntime>=1.21 from apt, onnx-qdq model" in rows[1] and "refused" not in rows[1]


def test_no_xnnpack_partition_is_its_own_error() -> None:
    from edgeship.errors import EXIT_CODES
    from edgeship.runtime.bench_report import RuntimeInfo
    from edgeship.verify.drift import check_delegate

    target = load_target("rpi4-aarch64")
    ran = {
        "interpreter": "ai_edge_litert",
        "interpreter_version": "2.3.0",
        "xnnpack": {"partitions": 0, "ops": 66, "outside": {"CONV_2D": 36}},
    }
    with pytest.raises(DelegateNotAppliedError) as info:
        check_delegate(RuntimeInfo.from_dict(ran), target, "ssh pi@h (aarch64)")
    message = str(info.value)
    assert "\n" not in message and "applied 0 XNNPACK partitions (all 66 ops" in message and "2.3.0" in message
    assert info.value.exit_code == EXIT_CODES["delegate_not_applied"] == 5
    check_delegate(RuntimeInfo.from_dict({**ran, "xnnpack": {"partitions": 1, "ops": 66}}), target, "x")  # applied
    check_delegate(RuntimeInfo.from_dict(ran), load_target("rpi-armv7"), "x")  # the target asks for no delegate


def test_interpreter_crash_blames_the_interpreter_not_the_file() -> None:
    from edgeship.runtime.interpreter import backend_version
    from edgeship.runtime.model_check import _problem

    message = _problem("crash: the interpreter crashed on it (SIGSEGV)", "ai_edge_litert")
    assert message is not None and "truncated" not in message and "corrupt" not in message
    assert f"ai_edge_litert {backend_version('ai_edge_litert')}" in message and "SIGSEGV" in message
    assert "the interpreter failed, not the file" in message


def test_emulated_timings_are_labelled_in_the_table() -> None:
    from edgeship.runtime.bench import EMULATED, table
    from edgeship.runtime.bench_report import BenchReport

    row = {
        "model": "m.tflite",
        "path": "m.tflite",
        "threads": 1,
        "init_ms": 1.0,
        "first_ms": 1.0,
        "mean_ms": 2.0,
        "p50_ms": 2.0,
        "p90_ms": 2.0,
        "p99_ms": 2.0,
        "peak_rss_mb": 1.0,
        "size_bytes": 1000,
        "ratio_p50_to_first": 1.0,
        "runtime": {"interpreter": "tflite_runtime", "delegate": "none"},
    }
    doc = {
        "results": [row],
        "host": {"machine": "x86_64"},
        "device": {"where": "ssh pi@h", "emulated": f"qemu-user (cortex-a7): {EMULATED}"},
    }
    assert EMULATED in table(BenchReport.from_dict(doc))[0]
    assert EMULATED not in "\n".join(table(BenchReport.from_dict({**doc, "device": None})))


# --------------------------------------------------------------------------- slow: both emulated Pis


def _emulator_problem() -> str | None:
    if os.geteuid() != 0:
        return "the emulated Pis need root (mount, chroot)"
    for tool, pkg in (
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-aarch64-static", "qemu-user-static"),
        ("qemu-arm-static", "qemu-user-static"),
        ("ssh", "openssh-client"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} not installed: apt-get install {pkg}"
    for entry in ("qemu-aarch64", "qemu-arm"):
        if not (Path("/proc/sys/fs/binfmt_misc") / entry).is_file():
            return f"no binfmt_misc entry {entry} (.ci/run registers it)"
    return None


def _ca_bundle() -> Path | None:
    """This machine's CA bundle when its pip is told to use one (a re-signing proxy); else pip's own."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(var) and Path(os.environ[var]).is_file():
            return Path(os.environ[var])
    return None


@pytest.fixture(scope="module")
def pis() -> Iterator[dict[tuple[str, str], Any]]:
    """The four emulated Pis (bookworm and trixie, arm64 and armhf), running for the module; stopped afterwards."""
    from edgeship.targets import emulated_pi

    problem = _emulator_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"EDGESHIP_REQUIRE_EMULATOR=1 but {problem}")
        pytest.skip(problem)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(DEVICES)) as pool:  # cold: the four roots build at once
        roots = list(pool.map(lambda d: emulated_pi.ensure_root(d[1], d[0]), DEVICES))
    log.info("roots ready in %.1f s: %s", time.monotonic() - start, ", ".join(map(str, roots)))
    started: dict[tuple[str, str], Any] = {}
    try:
        for release, name in DEVICES:
            start = time.monotonic()
            started[release, name] = emulated_pi.start(name, release, ca_bundle=_ca_bundle())
            log.info(
                "emulated %s %s up in %.1f s at %s",
                release,
                name,
                time.monotonic() - start,
                started[release, name].host,
            )
        yield started
    finally:
        for release, name in started:
            emulated_pi.stop(name, release=release)


def _ssh(pi: Any, *argv: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    from edgeship.targets.ssh import SshDevice

    return SshDevice(pi.target()).run(list(argv), timeout=timeout, check=False)


def _deploy(
    model: Path, calib: Path, out: Path, hosts: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    """``edgeship deploy`` in a subprocess, each target on its emulated Pi (``--host TARGET=...``)."""
    any_pi = next(iter(hosts.values()))
    argv = [sys.executable, "-m", "edgeship", "deploy", str(model), "--calib", str(calib), *extra]
    for name, pi in hosts.items():
        argv += ["--target", name, "--host", f"{name}={pi.host}"]
    argv += ["--identity", str(any_pi.identity), "--known-hosts", str(any_pi.known_hosts), "-o", str(out), "-q"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=5400)


@pytest.fixture(scope="module")
def deploy_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One deploy folder for every release: the next release's deploy reuses the host stages whose inputs are
    unchanged (the conversion, and the TFLite quantization: an emulated device decides no speed question), and
    redoes what its devices decide (drift checks, bundles)."""
    return tmp_path_factory.mktemp("pi") / "deploy"


@pytest.mark.slow
@pytest.mark.parametrize("release", list(RELEASES))
def test_deploy_on_emulated_pis(release: str, pis: dict[tuple[str, str], Any], assets: Path, deploy_out: Path) -> None:
    _needs(release)
    out = deploy_out
    names = RELEASES[release]["targets"]
    hosts = {name: pis[release, name] for name in names}
    start = time.monotonic()
    proc = _deploy(
        assets / "models" / "mobilenetv2-1.0-tf-op13.onnx",
        assets / "data" / "imagenet-sample",
        out,
        hosts,
        *("--num-calib", "100", "--max-eval", str(MAX_EVAL), "--labels", str(assets / "data" / "imagenet_classes.txt")),
        *("--bench-threads", "1", "--bench-runs", "20"),
    )
    log.info("deploy on the emulated %s Pis: %.0f s\n%s", release, time.monotonic() - start, proc.stdout)
    _keep(out, release)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "deploy.json").read_text())
    assert summary["evaluation"]["count"] == MAX_EVAL
    if release != RUN_RELEASES[0]:  # the first release's deploy built them; another Pi of a target decides nothing
        reused = {s["name"]: s["reused"] for s in summary["stages"]}
        tflite = [n for n in reused if n.startswith("quantize/int8-io-")]
        assert reused["convert"] and tflite and all(reused[n] for n in tflite), reused
    for name in names:
        _check_target(name, release, _want(release, name), summary, out)
    # Each device installs its bundle as its README says and names the parrot, the devices side by side (each
    # emulated Pi is one qemu process at a time: two of them use both cores).
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        bundles = {name: Path(summary["targets"][name]["bundle"]) for name in names}
        list(pool.map(lambda n: _check_parrot(n, release, bundles[n], hosts[n], _want(release, n)), names))
    report = (out / "report.md").read_text()
    for name in names:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert "| yes |" in row and f"ssh {hosts[name].host}" in row  # own ISA, on its device
    assert report.count("emulated: not the speed of a Pi") >= len(names)
    if "rpi-armv7" in names:
        armv7 = summary["targets"]["rpi-armv7"]["device_bench"]["speed"]
        assert armv7["fastest"] in armv7["p50_ms"] and "not a speed decision" in armv7["recommendation"]
        assert "rpi-armv7 on its device (armv7l)" in proc.stdout  # int8 vs float there, in the CLI summary too
    for name in names:  # quantize's speed decisions are never taken on an emulator's timings
        if _want(release, name)["model"] == ".onnx":
            continue  # onnxruntime's QDQ writer takes no speed decisions
        timing = summary["targets"][name]["speed_timing"]
        assert "is emulated, not a Pi's speed" in timing["note"] and not timing["emulated"], timing
    for other in (r for r in RUN_RELEASES if r != release):  # this release's bundle on another release's Pi
        _check_refused_elsewhere(
            Path(summary["targets"]["rpi4-aarch64"]["bundle"]), pis[other, "rpi4-aarch64"], release
        )


def _keep(out: Path, release: str) -> None:
    """Copy the reports to ``$EDGESHIP_PI_ARTIFACTS/RELEASE`` (when set), for CI logs and docs figures."""
    keep = os.environ.get("EDGESHIP_PI_ARTIFACTS")
    if keep:
        keep = str(Path(keep) / release)
        for rel in ("deploy.json", "report.md", "verify", "device-bench", "bundles"):
            src = out / rel
            if src.is_dir():
                shutil.copytree(src, Path(keep) / rel, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.whl"))
            elif src.is_file():
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, Path(keep) / rel)


def _check_target(name: str, release: str, want: dict[str, str], summary: dict[str, Any], out: Path) -> None:
    target = summary["targets"][name]
    drift = json.loads((out / "verify" / name / "drift_report.json").read_text())
    rt = drift["candidate"]["runtime"]
    log.info(
        "%s %s: %s, agreement %.3f, SQNR %.1f dB, install %s",
        release,
        name,
        drift["candidate"]["ran_on"],
        drift["figures"]["top1_agreement"],
        drift["figures"]["sqnr_db"],
        rt.get("install"),
    )
    assert target["passed"] and drift["passed"]
    assert rt["machine"] == want["machine"] and rt["python"].startswith(RELEASES[release]["python"] + ".")
    assert rt.get("emulated") and rt["release"] == release
    assert rt["interpreter"] == want["interpreter"]
    bundle = Path(target["bundle"])
    reqs = (bundle / "requirements.txt").read_text()
    assert Path(target["model"]).suffix == want["model"] and (bundle / Path(target["model"]).name).is_file()
    if want["pin"]:
        assert (
            want["pin"] in reqs.splitlines() and f"=={rt['interpreter_version']}" in want["pin"]
        )  # verified = shipped
    else:  # the OS's runtime (apt): pip installs only the edgeship wheel
        assert [ln for ln in reqs.splitlines() if not ln.startswith("./wheels/edgeship-")] == [], reqs
        _check_onnx_run(target, rt, out)
    install = rt["install"]  # the device's pip, from a requirements.txt byte-identical to the bundle's
    assert install["requirements_sha256"] == hashlib.sha256(reqs.encode()).hexdigest()
    from edgeship.targets.install import venv_command

    profile = load_target(name)
    assert install["command"] == venv_command(profile.on_release(profile.release(release)))
    if name == "rpi4-aarch64":
        assert rt["xnnpack"]["partitions"] == 1  # the whole MobileNetV2 inside XNNPACK on the aarch64 device
    _check_against_this_machine(name, out, bundle)
    _check_device_bench(name, want, out)


def _check_onnx_run(target: dict[str, Any], rt: dict[str, Any], out: Path) -> None:
    """The int8 ONNX QDQ model: checked on this machine against the budget first, then run on the device's
    onnxruntime (CPU provider) on its int8 kernels; the report names the runtime, its version and kernels."""
    host = target["host_check"]
    assert host["passed"] and host["figures"]["count"] == MAX_EVAL, host
    assert rt["execution_provider"] == "CPUExecutionProvider" and rt["interpreter_version"].startswith("1.21")
    assert rt["kernels"].get("QLinearConv", 0) >= 50 and rt["kernel_kinds"]["int8"] >= 50, rt["kernels"]
    report = (out / "report.md").read_text()
    assert f"onnxruntime {rt['interpreter_version']} (CPUExecutionProvider: QLinearConv" in report


def _check_against_this_machine(name: str, out: Path, bundle: Path) -> None:
    """The device's figures equal this machine's on the same images, or differ by less than the budget's slack."""
    from edgeship.runtime.candidate import candidate_outputs
    from edgeship.runtime.card import ModelCard
    from edgeship.runtime.metrics import compare
    from edgeship.verify.drift import DriftResult

    target = load_target(name)
    device = DriftResult.load(out / "verify" / name)
    model = bundle / ModelCard.load(bundle).model_file
    if model.suffix == ".onnx":  # the model's own arithmetic (x86's fused int8 kernels saturate; ARM's do not)
        from edgeship.runtime.classifier import Classifier
        from edgeship.runtime.ort_model import OrtModel

        clf = Classifier(OrtModel(model, fuse=False), ModelCard.load(bundle), None)
        here, runtime = clf.logits_many(list(device.files)), clf.describe()
    else:
        here, runtime = candidate_outputs(
            model, list(device.files), num_threads=target.execution.threads, use_xnnpack=target.execution.use_xnnpack
        )
    local = compare(device.reference, here)
    same = compare(here, device.candidate)
    log.info(
        "%s: agreement with float, device %.4f vs this machine %.4f (%s %s); SQNR %.2f vs %.2f dB; "
        "device vs this machine: top-1 agreement %.4f, max |diff| %.4g",
        name,
        device.figures.top1_agreement,
        local.top1_agreement,
        runtime["interpreter"],
        runtime["interpreter_version"],
        device.figures.sqnr_db,
        local.sqnr_db,
        same.top1_agreement,
        same.max_abs_error,
    )
    slack = (100 - target.budget.min_top1_agreement) / 100
    assert abs(device.figures.top1_agreement - local.top1_agreement) <= slack
    assert local.sqnr_db >= target.budget.min_sqnr_db and device.figures.sqnr_db >= target.budget.min_sqnr_db


def _check_device_bench(name: str, want: dict[str, str], out: Path) -> None:
    doc = json.loads((out / "device-bench" / name / "bench.json").read_text())
    assert doc["device"]["machine"] == want["machine"]  # uname -m of the device that ran it
    assert "emulated: not the speed of a Pi" in doc["host"]["emulated"]
    assert all(r["emulated"] == "emulated: not the speed of a Pi" for r in doc["results"])
    assert {r["runtime"]["interpreter"] for r in doc["results"]} == {want["interpreter"]}
    log.info("%s device bench p50 ms: %s", name, doc["speed"]["p50_ms"])


def _push_bundle(device: Any, bundle: Path, name: str) -> str:
    folder = f"/home/pi/bundles/{name}"
    device.run(["rm", "-rf", "--", folder])
    device.run(["mkdir", "-p", "--", "/home/pi/bundles"])
    device.push(bundle, folder)
    return folder


def _readme_install(name: str, release: str, bundle: Path) -> str:
    """The README's install line for ``release`` (its apt line is already done: the root was built with it)."""
    from edgeship.targets.bundle import install_commands

    target = load_target(name)
    line = install_commands(target.on_release(target.release(release)))[-2]
    assert line in (bundle / "README.md").read_text()
    return line


def _check_parrot(name: str, release: str, bundle: Path, pi: Any, want: dict[str, str]) -> None:
    """The bundle, installed exactly as its README says by the device's own pip, names the parrot."""
    from edgeship.targets.ssh import SshDevice

    device = SshDevice(pi.target())
    folder = _push_bundle(device, bundle, name)
    device.push(_parrot(), f"{folder}/parrot.jpg")
    start = time.monotonic()
    command = _readme_install(name, release, bundle)
    install = device.run(["sh", "-c", f"cd {folder} && {command}"], timeout=3600, check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    log.info(
        "%s %s: README install by the device's pip in %.1f s: %s", release, name, time.monotonic() - start, command
    )
    if want["pin"]:
        package, version = want["pin"].split("==")
        assert f"Version: {version}" in device.run([f"{folder}/.venv/bin/python", "-m", "pip", "show", package]).stdout
    ran = device.run(
        ["sh", "-c", f"cd {folder} && .venv/bin/python -m edgeship.runtime . parrot.jpg --json"], timeout=1800
    )
    doc = json.loads(ran.stdout)
    top = next(iter(doc["predictions"].values()))[0]
    log.info(
        "%s %s: parrot.jpg -> %s %.3f on %s %s",
        release,
        name,
        top["label"],
        top["probability"],
        doc["runtime"]["interpreter"],
        doc["runtime"]["interpreter_version"],
    )
    assert "macaw" in top["label"] and doc["runtime"]["interpreter"] == want["interpreter"]


def _check_refused_elsewhere(bundle: Path, pi: Any, verified: str) -> None:
    """The bundle on a Pi of another OS release: its README install stops in one line, before pip."""
    from edgeship.targets.ssh import SshDevice

    device = SshDevice(pi.target())
    folder = _push_bundle(device, bundle, "elsewhere")
    proc = device.run(["sh", "-c", f"cd {folder} && {_readme_install('rpi4-aarch64', verified, bundle)}"], check=False)
    lines = proc.stderr.strip().splitlines()
    log.info("%s bundle on the %s Pi: exit %d, %s", verified, pi.release, proc.returncode, lines)
    assert proc.returncode == 1 and len(lines) == 1 and f"verified on Python {RELEASES[verified]['python']}" in lines[0]
    assert device.run(["test", "-e", f"{folder}/.venv"], check=False).returncode == 1  # stopped before the venv


def _parrot() -> Path:
    from edgeship._assets import shared_assets

    root = shared_assets()
    assert root is not None, "shared assets not found"
    return root / "data" / "images" / "parrot.jpg"


def test_state_file_round_trips_through_the_json_writer(tmp_path: Path) -> None:
    """The running-Pi state is written by the JSON writer, which stamps schema_version: still readable."""
    from edgeship._files import atomic_write_json
    from edgeship.targets.emulated_pi import EmulatedPi

    pi = EmulatedPi("rpi4-aarch64", tmp_path, 2222, tmp_path / "id", tmp_path / "kh", os.getpid(), "aarch64", "a72")
    atomic_write_json(tmp_path / "state.json", pi.to_dict())
    assert EmulatedPi.from_dict(json.loads((tmp_path / "state.json").read_text())) == pi


#: The dot-product bit of AT_HWCAP on aarch64 (``asimddp`` in /proc/cpuinfo).
HWCAP_ASIMDDP = 1 << 20
_HWCAP = "import struct; d = open('/proc/self/auxv', 'rb').read(); print(dict(struct.iter_unpack('<QQ', d)).get(16, 0))"


@pytest.mark.slow
def test_pi5_cpu_has_dot_product_and_pi4_has_not(pis: dict[tuple[str, str], Any]) -> None:
    """The emulated CPUs, as the device's own Python sees them (its auxv, which qemu-user writes for the guest)."""
    from edgeship.targets import emulated_pi

    root = pis[RUN_RELEASES[-1], "rpi4-aarch64"].root
    qemu = shutil.which("qemu-aarch64-static")
    assert qemu is not None
    caps = {}
    for name in ("rpi4-aarch64", "rpi5-aarch64"):
        cpu = emulated_pi.profile(name).qemu_cpu
        proc = subprocess.run(
            [qemu, "-L", str(root), "-cpu", cpu, str(root / "usr/bin/python3"), "-c", _HWCAP],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        caps[name] = int(proc.stdout)
    log.info("AT_HWCAP: %s", {n: hex(c) for n, c in caps.items()})
    assert caps["rpi5-aarch64"] & HWCAP_ASIMDDP and not caps["rpi4-aarch64"] & HWCAP_ASIMDDP
