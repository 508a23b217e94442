"""The Raspberry Pi path end to end on emulated Pis reachable over ssh, and the pieces it is made of.

The slow test brings up both emulated Pis (:mod:`edgeship.targets.emulated_pi`: Debian bookworm
arm64 and armhf roots under qemu-user, their own sshd on 127.0.0.1), runs ``edgeship deploy`` on
the real MobileNetV2 with ``--host TARGET=...`` for each, and checks on the devices what a user
would. It needs root, mmdebstrap, qemu-user-static (binfmt) and the network to Debian's mirror and
PyPI; it skips without them unless ``EDGESHIP_REQUIRE_EMULATOR=1`` (CI) makes that a failure.
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
#: Held-apart images the drift checks run on each device (named in the report).
#: Every held-apart image (500 - 100): on 50, one disagreement is 2 points against the targets' 1-point
#: top-1 drop budget, so the check measured sampling noise rather than the model.
MAX_EVAL = 400
EXPECTED = {
    "rpi4-aarch64": {"machine": "aarch64", "interpreter": "ai_edge_litert", "pin": "ai-edge-litert==2.1.0"},
    "rpi-armv7": {"machine": "armv7l", "interpreter": "tflite_runtime", "pin": "tflite-runtime==2.14.0"},
}


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
        out = bundle(model, load_target(name), tmp_path / name, interpreter_version=None).out_dir
        reqs = (out / "requirements.txt").read_text().splitlines()
        readme = (out / "README.md").read_text()
        assert EXPECTED[name]["pin"] in reqs, reqs  # exactly the version the checks ran with
        assert reqs[-1].startswith("./wheels/edgeship-") and (out / reqs[-1]).is_file()
        if name == "rpi-armv7":
            assert not any(r.lower().startswith(("numpy", "pillow")) for r in reqs)
            assert "sudo apt install python3-numpy python3-pil" in readme
            assert "python3 -m venv --system-site-packages .venv && .venv/bin/pip install -r requirements.txt" in readme
        else:
            assert "numpy>=1.23,<2" in reqs
            assert "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt" in readme
    pinned = bundle(model, load_target("rpi4-aarch64"), tmp_path / "v", interpreter_version="2.3.0").out_dir
    assert "ai-edge-litert==2.3.0" in (pinned / "requirements.txt").read_text().splitlines()


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
def pis() -> Iterator[dict[str, Any]]:
    """Both emulated Pis, running for the module; stopped (and unmounted) afterwards."""
    from edgeship.targets import emulated_pi

    problem = _emulator_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"EDGESHIP_REQUIRE_EMULATOR=1 but {problem}")
        pytest.skip(problem)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(EXPECTED)) as pool:  # cold: both roots build at once
        roots = list(pool.map(emulated_pi.ensure_root, EXPECTED))
    log.info("roots ready in %.1f s: %s", time.monotonic() - start, ", ".join(map(str, roots)))
    started: dict[str, Any] = {}
    try:
        for name in EXPECTED:
            start = time.monotonic()
            started[name] = emulated_pi.start(name, ca_bundle=_ca_bundle())
            log.info("emulated %s up in %.1f s at %s", name, time.monotonic() - start, started[name].host)
        yield started
    finally:
        for name in started:
            emulated_pi.stop(name)


def _ssh(pi: Any, *argv: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    from edgeship.targets.ssh import SshDevice

    return SshDevice(pi.target()).run(list(argv), timeout=timeout, check=False)


@pytest.mark.slow
def test_deploy_on_emulated_pis(pis: dict[str, Any], assets: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    hosts = [a for name, pi in pis.items() for a in ("--host", f"{name}={pi.host}")]
    any_pi = next(iter(pis.values()))
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeship",
            "deploy",
            str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"),
            "--calib",
            str(assets / "data" / "imagenet-sample"),
            "--num-calib",
            "100",
            "--max-eval",
            str(MAX_EVAL),
            "--labels",
            str(assets / "data" / "imagenet_classes.txt"),
            "--target",
            "rpi4-aarch64",
            "--target",
            "rpi-armv7",
            *hosts,
            "--identity",
            str(any_pi.identity),
            "--known-hosts",
            str(any_pi.known_hosts),
            "--bench-threads",
            "1",
            "--bench-runs",
            "20",
            "-o",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=5400,
    )
    log.info("deploy on both emulated Pis: %.0f s\n%s", time.monotonic() - start, proc.stdout)
    _keep(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "deploy.json").read_text())
    assert summary["evaluation"]["count"] == MAX_EVAL
    for name, want in EXPECTED.items():
        _check_target(name, want, summary, out, pis[name])
    report = (out / "report.md").read_text()
    for name in EXPECTED:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert "| yes |" in row and f"ssh {pis[name].host}" in row  # own ISA, on its device
    assert report.count("emulated: not the speed of a Pi") >= 2
    armv7 = summary["targets"]["rpi-armv7"]["device_bench"]["speed"]
    assert armv7["fastest"] in armv7["p50_ms"] and "not a speed decision" in armv7["recommendation"]
    assert "rpi-armv7 on its device (armv7l)" in proc.stdout  # int8 vs float there, in the CLI summary too
    for name in EXPECTED:  # quantize's speed decisions are never taken on an emulator's timings
        timing = summary["targets"][name]["speed_timing"]
        assert "is emulated, not a Pi's speed" in timing["note"] and not timing["emulated"], timing


def _keep(out: Path) -> None:
    """Copy the reports to ``$EDGESHIP_PI_ARTIFACTS`` (when set), for CI logs and docs figures."""
    keep = os.environ.get("EDGESHIP_PI_ARTIFACTS")
    if keep:
        for rel in ("deploy.json", "report.md", "verify", "device-bench", "bundles"):
            src = out / rel
            if src.is_dir():
                shutil.copytree(src, Path(keep) / rel, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.whl"))
            elif src.is_file():
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, Path(keep) / rel)


def _check_target(name: str, want: dict[str, str], summary: dict[str, Any], out: Path, pi: Any) -> None:
    target = summary["targets"][name]
    drift = json.loads((out / "verify" / name / "drift_report.json").read_text())
    rt = drift["candidate"]["runtime"]
    log.info(
        "%s: %s, agreement %.3f, SQNR %.1f dB, install %s",
        name,
        drift["candidate"]["ran_on"],
        drift["figures"]["top1_agreement"],
        drift["figures"]["sqnr_db"],
        rt.get("install"),
    )
    assert target["passed"] and drift["passed"]
    assert rt["machine"] == want["machine"] and rt["python"].startswith("3.11.") and rt.get("emulated")
    assert rt["interpreter"] == want["interpreter"]
    bundle = Path(target["bundle"])
    reqs = (bundle / "requirements.txt").read_text()
    assert want["pin"] in reqs.splitlines() and f"=={rt['interpreter_version']}" in want["pin"]  # verified = shipped
    install = rt["install"]  # the device's pip, from a requirements.txt byte-identical to the bundle's
    assert install["requirements_sha256"] == hashlib.sha256(reqs.encode()).hexdigest()
    from edgeship.targets.install import venv_command

    assert install["command"] == venv_command(load_target(name))
    if name == "rpi4-aarch64":
        assert rt["xnnpack"]["partitions"] == 1  # the whole MobileNetV2 inside XNNPACK on the aarch64 device
    _check_against_this_machine(name, out, bundle)
    _check_device_bench(name, want, out)
    _check_parrot(name, bundle, pi)


def _check_against_this_machine(name: str, out: Path, bundle: Path) -> None:
    """The device's figures equal this machine's on the same images, or differ by less than the budget's slack."""
    from edgeship.runtime.candidate import candidate_outputs
    from edgeship.runtime.card import ModelCard
    from edgeship.runtime.metrics import compare
    from edgeship.verify.drift import DriftResult

    target = load_target(name)
    device = DriftResult.load(out / "verify" / name)
    here, runtime = candidate_outputs(
        bundle / ModelCard.load(bundle).model_file,
        list(device.files),
        num_threads=target.execution.threads,
        use_xnnpack=target.execution.use_xnnpack,
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


def _check_parrot(name: str, bundle: Path, pi: Any) -> None:
    """The bundle, installed exactly as its README says by the device's own pip, names the parrot."""
    from edgeship.targets.install import venv_command
    from edgeship.targets.ssh import SshDevice

    device = SshDevice(pi.target())
    folder = f"/home/pi/bundles/{name}"
    device.run(["rm", "-rf", "--", folder])
    device.run(["mkdir", "-p", "--", "/home/pi/bundles"])
    device.push(bundle, folder)
    device.push(_parrot(), f"{folder}/parrot.jpg")
    start = time.monotonic()
    install = device.run(["sh", "-c", f"cd {folder} && {venv_command(load_target(name))}"], timeout=3600, check=False)
    assert install.returncode == 0, install.stderr[-2000:]
    log.info("%s: README install by the device's pip in %.1f s", name, time.monotonic() - start)
    package, version = EXPECTED[name]["pin"].split("==")
    assert f"Version: {version}" in device.run([f"{folder}/.venv/bin/python", "-m", "pip", "show", package]).stdout
    ran = device.run(
        ["sh", "-c", f"cd {folder} && .venv/bin/python -m edgeship.runtime . parrot.jpg --json"], timeout=1800
    )
    doc = json.loads(ran.stdout)
    top = next(iter(doc["predictions"].values()))[0]
    log.info(
        "%s: parrot.jpg -> %s %.3f on %s %s",
        name,
        top["label"],
        top["probability"],
        doc["runtime"]["interpreter"],
        doc["runtime"]["interpreter_version"],
    )
    assert "macaw" in top["label"]


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
