"""The CLI through a real OpenSSH server on 127.0.0.1: bench --host and verify --host end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.cli import main
from tests.sshd import sshd, sshd_available  # noqa: F401
from tests.test_ssh import PIP_ARGS, device_python

pytestmark = [
    pytest.mark.skipif(
        not sshd_available(), reason="OpenSSH server not installed (apt-get install openssh-server; .ci/run does)"
    ),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _ssh_args(server) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        "--host",
        server.spec,
        "--identity",
        str(server.identity),
        "--known-hosts",
        str(server.known_hosts),
        "--remote-python",
        device_python(),
        "--pip-args",
        " ".join(PIP_ARGS),
    ]


def test_bench_over_ssh(sshd, tmp_path: Path, tiny_bundle: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(tiny_bundle / "model_float32.tflite"),
            str(tiny_bundle / "model_float16.tflite"),
            "--target",
            "x86-host",
            "--threads",
            "1",
            "--runs",
            "15",
            "--warmup",
            "2",
            "-o",
            str(out),
            "-q",
            *_ssh_args(sshd),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["target"] == "x86-host" and len(doc["results"]) == 2
    r = doc["results"][0]
    assert r["runs"] == 15 and r["p50_ms"] > 0 and r["peak_rss_mb"] > 0
    assert r["runtime"]["interpreter"] == "ai_edge_litert" and r["device_path"].startswith("/")  # the device's copy
    assert "job-" in r["device_path"] and r["path"] == str(tiny_bundle / "model_float32.tflite")  # the user's name


def test_verify_over_ssh(
    sshd,
    tmp_path: Path,
    tiny_onnx: Path,
    tiny_bundle: Path,  # type: ignore[no-untyped-def]  # noqa: F811
    tiny_images: Path,
) -> None:
    report = tmp_path / "drift.json"
    target = tmp_path / "loopback.toml"
    text = (Path(__file__).parents[1] / "targets" / "x86-host.toml").read_text()
    target.write_text(
        text.replace('name = "x86-host"', 'name = "loopback"')
        .replace('access = "local"', 'access = "ssh"')
        .replace('precision = "int8"', 'precision = "float32"')
        .replace('io_dtype = "int8"', 'io_dtype = "float32"')
    )
    code = main(
        [
            "verify",
            str(tiny_onnx),
            str(tiny_bundle),
            "--images",
            str(tiny_images),
            "--target",
            str(target),
            "-r",
            str(report),
            "-q",
            *_ssh_args(sshd),
        ]
    )
    assert code == 0
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["figures"]["top1_agreement"] == 1.0 and doc["images"]["count"] == 12
    assert "device" in doc["candidate"]["runtime"]


def test_unreachable_host_is_one_line(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(
        [
            "bench",
            str(tiny_bundle / "model_float32.tflite"),
            "--target",
            "rpi4-aarch64",
            "--host",
            f"pi@127.0.0.1:{port}",
            "-o",
            str(tmp_path / "b.json"),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "refused" in err.lower(), err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("key", ["by-name", "by-path"])
def test_host_per_target_with_a_profile_file(
    key: str, tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--host TARGET=...`` with ``--target FILE.toml`` names the target by its profile's name or by the path as
    given; either way the device is the one asked for (here a closed port: the refusal shows ssh was tried)."""
    import socket

    profile = tmp_path / "my-pi.toml"
    text = (Path(__file__).parents[1] / "targets" / "rpi4-aarch64.toml").read_text()
    profile.write_text(text.replace('name = "rpi4-aarch64"', 'name = "my-pi"', 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = "my-pi" if key == "by-name" else str(profile)
    code = main(
        ["bench", str(tiny_bundle / "model_float32.tflite"), "--target", str(profile),
         "--host", f"{target}=pi@127.0.0.1:{port}", "-o", str(tmp_path / "b.json"), "-q"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and f"127.0.0.1:{port}" in err and "refused" in err.lower(), err
