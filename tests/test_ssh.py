"""The ssh device against a real OpenSSH server on 127.0.0.1 (no mocks of ssh)."""

from __future__ import annotations

import logging
import os
import shlex
import socket
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import DeviceError, InputError
from edgeship.targets.ssh import VENV_MARKER, SshDevice, SshTarget, build_edgeship_wheel, remote_collect
from tests.sshd import (
    SshServer,
    keygen,
    sshd,  # noqa: F401
)

#: What the device venv installs; the edgeship wheel's own dependencies agree with it.
REQUIREMENTS = ["numpy<2", "Pillow", "ai-edge-litert==2.1.0"]
#: Extra pip options for CI without PyPI access, e.g. "--no-index --find-links /wheels".
PIP_ARGS = shlex.split(os.environ.get("EDGESHIP_TEST_PIP_ARGS", ""))
#: A failure to reach or use the device must be reported within this many seconds.
QUICK = 10.0


def device_python() -> str:
    """A plain interpreter (not this test venv), so the device venv is built for real."""
    return getattr(sys, "_base_executable", None) or sys.executable


@pytest.fixture(scope="session")
def remote_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The device's work folder: private to this session so venv creation is real."""
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="session")
def device(sshd: SshServer, remote_dir: Path) -> SshDevice:  # noqa: F811
    return SshDevice(sshd.target(python=device_python(), workdir=str(remote_dir)))


@pytest.fixture(scope="session")
def edgeship_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_edgeship_wheel(tmp_path_factory.mktemp("wheels"))


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never speaks ssh (a hung device)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def fails_quickly(device: SshDevice) -> str:
    """Probe ``device``, expect a DeviceError within :data:`QUICK` seconds; return its message."""
    start = time.monotonic()
    with pytest.raises(DeviceError) as info:
        device.probe()
    assert time.monotonic() - start < QUICK
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ no server needed


@pytest.mark.parametrize(
    "spec, user, host, port",
    [
        ("pi.local", None, "pi.local", 22),
        ("pi@raspberrypi", "pi", "raspberrypi", 22),
        ("pi@10.0.0.7:2222", "pi", "10.0.0.7", 2222),
        ("ssh://me@box:2200", "me", "box", 2200),
        ("root@[::1]:2022", "root", "::1", 2022),
        ("fe80::1", None, "fe80::1", 22),
    ],
)
def test_parse(spec: str, user: str | None, host: str, port: int) -> None:
    t = SshTarget.parse(spec)
    assert (t.user, t.host, t.port) == (user, host, port)


@pytest.mark.parametrize("spec", ["", "-oProxyCommand=touch_x", "pi@host:port", "a b", "[::1"])
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(InputError):
        SshTarget.parse(spec)


def test_parse_conflicting_port() -> None:
    assert SshTarget.parse("h:2222", port=2222).port == 2222
    with pytest.raises(InputError, match="port"):
        SshTarget.parse("h:2222", port=22)


def test_ssh_command_checks_host_keys() -> None:
    cmd = SshDevice(SshTarget("box", user="pi", known_hosts=Path("/tmp/k h"))).ssh_command(["ls", "a b"])
    assert cmd[-3:] == ["--", "pi@box", "ls 'a b'"]
    assert "BatchMode=yes" in cmd and "StrictHostKeyChecking=yes" in cmd
    assert 'UserKnownHostsFile="/tmp/k h"' in cmd and any(a.startswith("ConnectTimeout=") for a in cmd)
    accepting = SshDevice(SshTarget("box", accept_new_host_key=True)).ssh_command(["true"])
    assert "StrictHostKeyChecking=accept-new" in accepting


# ------------------------------------------------------------------ real server


def test_run_passes_arguments_verbatim(device: SshDevice) -> None:
    tricky = ["a b", "$HOME", "; echo pwned", "'q'", '"dq"', "*", "`id`"]
    proc = device.run(["printf", "%s\\n", *tricky])
    assert proc.stdout.splitlines() == tricky
    assert device.run(["false"], check=False).returncode == 1
    with pytest.raises(DeviceError, match="exit 1"):
        device.run(["false"])


def test_probe(device: SshDevice) -> None:
    facts = device.probe()
    assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
    assert facts["machine"] == os.uname().machine and facts["system"] == "Linux"


def test_push_pull_roundtrip(device: SshDevice, tmp_path: Path) -> None:
    src = tmp_path / "src dir"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a file.txt").write_text("hello")
    (src / "sub" / "b.txt").write_text("world")
    remote = f"{device.workdir()}/roundtrip"
    device.push(src, remote)  # local names (spaces and all) travel as data, never through a shell
    device.pull(f"{remote}/sub/b.txt", tmp_path / "back" / "b.txt")
    assert (tmp_path / "back" / "b.txt").read_text() == "world"
    device.pull(f"{remote}/sub", tmp_path / "back" / "sub")
    assert (tmp_path / "back" / "sub" / "a file.txt").read_text() == "hello"
    with pytest.raises(DeviceError, match="holds characters scp would hand to the device's shell"):
        device.pull(f"{remote}/sub/a file.txt", tmp_path / "back" / "a.txt")
    with pytest.raises(DeviceError, match="No such file"):
        device.pull(f"{remote}/missing", tmp_path / "x")
    device.run(["rm", "-rf", "--", remote])


def test_closed_port_fails_quickly(sshd: SshServer) -> None:  # noqa: F811
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert "connection refused" in fails_quickly(SshDevice(sshd.target(port=port)))


def test_silent_host_times_out(sshd: SshServer, silent_port: int) -> None:  # noqa: F811
    message = fails_quickly(SshDevice(sshd.target(port=silent_port, connect_timeout=1)))
    assert "within 1 s" in message


def test_unknown_host_key_needs_the_flag(sshd: SshServer, tmp_path: Path) -> None:  # noqa: F811
    known = tmp_path / "known_hosts"
    known.write_text("")
    message = fails_quickly(SshDevice(sshd.target(known_hosts=known)))
    assert "--accept-new-host-key" in message and "accept_new_host_key=True" in message
    assert SshDevice(sshd.target(known_hosts=known, accept_new_host_key=True)).probe()["system"] == "Linux"
    assert known.read_text().strip(), "the accepted key was stored"
    assert SshDevice(sshd.target(known_hosts=known)).probe()["system"] == "Linux"


def test_changed_host_key_is_refused_even_with_the_flag(sshd: SshServer, tmp_path: Path) -> None:  # noqa: F811
    known = tmp_path / "known_hosts"
    known.write_text(f"[{sshd.host}]:{sshd.port} {keygen(tmp_path / 'impostor')}\n")
    assert "CHANGED" in fails_quickly(SshDevice(sshd.target(known_hosts=known, accept_new_host_key=True)))


def test_wrong_identity(sshd: SshServer, tmp_path: Path) -> None:  # noqa: F811
    keygen(tmp_path / "stranger")
    assert "login to" in fails_quickly(SshDevice(sshd.target(identity=tmp_path / "stranger")))
    assert "does not exist" in fails_quickly(SshDevice(sshd.target(identity=tmp_path / "nope")))


def test_missing_python(sshd: SshServer) -> None:  # noqa: F811
    message = fails_quickly(SshDevice(sshd.target(python="/nonexistent/python3")))
    assert "'/nonexistent/python3' not found" in message


def test_build_wheel_is_cached_and_reproducible(tmp_path: Path) -> None:
    wheel = build_edgeship_wheel(tmp_path / "a")
    before = wheel.stat().st_mtime_ns
    assert build_edgeship_wheel(tmp_path / "a") == wheel and wheel.stat().st_mtime_ns == before, "not rebuilt"
    # Same sources, same bytes: a device venv reinstalls the wheel only when the code changed.
    assert build_edgeship_wheel(tmp_path / "b").read_bytes() == wheel.read_bytes()
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "edgeship/runtime/collect.py" in names and not any(n.startswith("tests/") for n in names)


def _dummy_wheel(folder: Path, answer: int) -> Path:
    """A minimal pure-Python wheel whose module says ``answer``."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "edgeship_dummy-0.1-py3-none-any.whl"
    info = "edgeship_dummy-0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("edgeship_dummy.py", f"ANSWER = {answer}\n")
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: edgeship-dummy\nVersion: 0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_venv_reinstalls_a_changed_wheel(device: SshDevice, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgeship.targets.ssh")
    python = device.ensure_venv([], wheels=[_dummy_wheel(tmp_path, 1)], pip_args=["--no-index"])
    _dummy_wheel(tmp_path, 2)
    assert (
        device.ensure_venv([], wheels=[tmp_path / "edgeship_dummy-0.1-py3-none-any.whl"], pip_args=["--no-index"])
        == python
    )
    assert "updating venv" in caplog.text
    answer = device.run([python, "-c", "import edgeship_dummy; print(edgeship_dummy.ANSWER)"]).stdout
    assert answer.strip() == "2"


def test_concurrent_runs_build_one_venv(device: SshDevice, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two runs setting up the same venv at once take turns: one builds, the other reuses."""
    import concurrent.futures

    caplog.set_level(logging.INFO, logger="edgeship.targets.ssh")
    wheel = _dummy_wheel(tmp_path, 7)
    twin = SshDevice(device.target)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # system_site_packages=False: a venv no other test builds, so this one starts from nothing.
        futures = [
            pool.submit(d.ensure_venv, [], wheels=[wheel], pip_args=["--no-index"], system_site_packages=False)
            for d in (device, twin)
        ]
        pythons = {f.result(timeout=300) for f in futures}
    assert len(pythons) == 1
    assert caplog.text.count("creating venv") == 1 and "completed meanwhile by another run" in caplog.text
    python = pythons.pop()
    assert device.run([python, "-c", "import edgeship_dummy; print(edgeship_dummy.ANSWER)"]).stdout.strip() == "7"
    lock = python.rsplit("/bin/", 1)[0] + ".lock"
    assert device.run(["test", "-e", lock], check=False).returncode != 0, "the lock is released"


def test_venv_lock_held_by_a_live_run_is_a_clear_error(device: SshDevice) -> None:
    lock = f"{device.workdir()}/venv-held.lock"
    device.run(["mkdir", "-p", "--", lock])
    try:
        with pytest.raises(DeviceError, match="another edgeship run is still setting up"):
            with device._remote_lock(lock, stale_after=600, wait=2):
                pass
    finally:
        device.run(["rmdir", "--", lock])
    # A lock older than the stale limit is taken over (its holder died).
    device.run(["sh", "-c", 'mkdir -p -- "$1" && touch -d "2 hours ago" -- "$1"', "sh", lock])
    with device._remote_lock(lock, stale_after=600, wait=2):
        pass
    assert device.run(["test", "-e", lock], check=False).returncode != 0


def test_failed_install_is_not_marked_complete(device: SshDevice, remote_dir: Path) -> None:
    with pytest.raises(DeviceError, match="pip install on .* failed"):
        device.ensure_venv(["edgeship-no-such-package==0"], pip_args=["--no-index"], timeout=300)
    incomplete = [v for v in remote_dir.glob("venv-*") if not (v / VENV_MARKER).exists()]
    assert incomplete, "a failed venv has no completion marker, so the next call rebuilds it"


def test_remote_collect_matches_host_and_reuses_venv(
    device: SshDevice,
    tiny_bundle: Path,
    tiny_images: Path,
    edgeship_wheel: Path,
    remote_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from edgeship.runtime.candidate import candidate_outputs
    from edgeship.runtime.images import list_images

    caplog.set_level(logging.INFO, logger="edgeship.targets.ssh")
    kw = {"requirements": REQUIREMENTS, "wheels": [edgeship_wheel], "pip_args": PIP_ARGS, "threads": 1}
    times = []
    for _ in range(2):
        start = time.monotonic()
        logits, files, describe = remote_collect(device, tiny_bundle, tiny_images, **kw)
        times.append(time.monotonic() - start)
    logging.getLogger(__name__).info("remote_collect: first %.1f s, second %.1f s", *times)
    assert "creating venv" in caplog.text and "reusing venv" in caplog.text
    assert times[1] < times[0]

    images = list_images(tiny_images, minimum=1)
    expected, _ = candidate_outputs(tiny_bundle, images.files, num_threads=1)
    assert files == [str(f.relative_to(images.root)) for f in images.files] and len(files) == 12
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert describe["device"] == device.target.where
    assert not list(remote_dir.glob("job-*")), "remote job folders are removed"
