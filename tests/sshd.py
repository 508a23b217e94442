"""A real OpenSSH server on 127.0.0.1 for tests: the ``sshd`` fixture and :func:`running_sshd`.

The server runs as the current user (root in CI, a normal user works too) from a
generated ``sshd_config`` in a temporary folder: its own host key, one authorised user
key, public-key login only, no PAM. Use it from another test file with::

    from tests.sshd import sshd  # noqa: F401

Tests are skipped, with the reason, when ``/usr/sbin/sshd`` is not installed
(Debian/Ubuntu: ``apt-get install openssh-server openssh-client``; the system service
does not need to run).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SSHD = Path("/usr/sbin/sshd")
SKIP_REASON = "OpenSSH server not installed (/usr/sbin/sshd missing): apt-get install openssh-server openssh-client"

#: Where a root sshd insists on chrooting its unprivileged child; the system service
#: normally creates it, and we do not start the system service.
_PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SshServer:
    """A running test server and the client files that reach it."""

    host: str
    port: int
    user: str
    identity: Path
    known_hosts: Path
    host_key: str
    root: Path
    log: Path

    @property
    def spec(self) -> str:
        """``user@host:port``, the form :meth:`SshTarget.parse` reads."""
        return f"{self.user}@{self.host}:{self.port}"

    def known_hosts_line(self) -> str:
        """The server's host key as a ``known_hosts`` line."""
        return f"[{self.host}]:{self.port} {self.host_key}\n"

    def target(self, **overrides: Any) -> Any:
        """An :class:`edgeship.targets.ssh.SshTarget` for this server (fields overridable)."""
        from edgeship.targets.ssh import SshTarget

        fields = {
            "host": self.host,
            "user": self.user,
            "port": self.port,
            "identity": self.identity,
            "known_hosts": self.known_hosts,
            "connect_timeout": 5,
        }
        return SshTarget(**{**fields, **overrides})


def sshd_available() -> bool:
    """Whether the OpenSSH server and client programs are installed."""
    return SSHD.is_file() and shutil.which("ssh-keygen") is not None and shutil.which("ssh") is not None


def keygen(path: Path, comment: str = "edgeship-test") -> str:
    """Create an unencrypted ed25519 key pair at ``path``; return the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_config(root: Path, port: int) -> Path:
    config = root / "sshd_config"
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f'HostKey "{root / "host_ed25519"}"',
        f'PidFile "{root / "sshd.pid"}"',
        f'AuthorizedKeysFile "{root / "authorized_keys"}"',
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    """Return once the server accepts TCP connections; raise with its log if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text(errors='replace').strip()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout:g} s: {log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _prepare(root: Path) -> tuple[str, Path]:
    """Host key, user key and authorised keys in ``root``; (host key line, user identity)."""
    root.mkdir(parents=True, exist_ok=True)
    host_key = keygen(root / "host_ed25519", "edgeship-test-host")
    identity = root / "id_ed25519"
    (root / "authorized_keys").write_text(keygen(identity) + "\n")
    if os.geteuid() == 0 and not _PRIVSEP_DIR.is_dir():
        _PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    return host_key, identity


def _launch(root: Path, start_timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    """Start sshd on a free port; retry when another process grabbed the port first."""
    log = root / "sshd.log"
    for _attempt in range(3):
        port = _free_port()
        config = _write_config(root, port)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_listening(proc, port, log, start_timeout)
            return proc, port
        except RuntimeError:
            _stop(proc)
            if "Address already in use" not in log.read_text(errors="replace"):
                raise
    raise RuntimeError(f"sshd could not find a free port: {log.read_text(errors='replace')}")


@contextlib.contextmanager
def running_sshd(root: Path, *, start_timeout: float = 10) -> Iterator[SshServer]:
    """Run a private sshd on 127.0.0.1 for the current user while the block runs.

    Args:
        root: An empty folder for keys, config, pid file and log.
        start_timeout: Seconds to wait for the server to listen.

    Yields:
        The server, with an identity file and a ``known_hosts`` that already trusts it.
    """
    host_key, identity = _prepare(root)
    proc, port = _launch(root, start_timeout)
    try:
        server = SshServer(
            host="127.0.0.1",
            port=port,
            user=pwd.getpwuid(os.geteuid()).pw_name,
            identity=identity,
            known_hosts=root / "known_hosts",
            host_key=host_key,
            root=root,
            log=root / "sshd.log",
        )
        server.known_hosts.write_text(server.known_hosts_line())
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """One real OpenSSH server for the whole test session (skipped when sshd is missing)."""
    if not sshd_available():
        pytest.skip(SKIP_REASON)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server
