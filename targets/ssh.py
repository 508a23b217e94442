"""Reach a device over ssh: run commands, copy files, keep a venv, collect model outputs.

Uses the system OpenSSH client (``ssh``, ``scp``) with host key checking on: a host
whose key is not in ``known_hosts`` is refused unless ``accept_new_host_key`` is set
(``StrictHostKeyChecking=accept-new``); a changed key is always refused. Logins are
non-interactive (``BatchMode=yes``, keys only), every connection has a
``ConnectTimeout`` and every subprocess an overall timeout. Commands are argument
lists; the remote command line is ``shlex.join`` of the list, so the device's login
shell must be a POSIX shell (sh, bash, dash, zsh).

Every failure to reach or use the device (unreachable, host key refused, login
refused, no Python, a failed install or remote command) raises
:class:`~edgeship.errors.DeviceError` with one line saying what and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeship._io import sha256_file
from edgeship.errors import DeviceError, InputError, MissingDependencyError
from edgeship.runtime.collect import load_collected
from edgeship.targets.install import requirements_text
from edgeship.wheel import build_edgeship_wheel, default_wheel_cache, source_root

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

#: Remote folder for venvs and jobs when the target does not name one.
DEFAULT_REMOTE_DIR = "${XDG_CACHE_HOME:-$HOME/.cache}/edgeship-remote"
#: Written last into a venv: its presence means the venv is complete.
VENV_MARKER = ".edgeship-venv.json"
#: Oldest device Python the edgeship wheel installs on (pyproject ``requires-python``).
MIN_PYTHON = (3, 9)
#: Timeout of the small bookkeeping commands (probe, mkdir, rm).
SHORT_TIMEOUT = 120.0

# The device's Python, ``uname -m`` and whether its ARM CPU is emulated (qemu-user shows the host
# kernel's x86 /proc/cpuinfo; edgeship's emulated Pis carry a marker): see edgeship.runtime.bench.emulation.
_PROBE_SCRIPT = """import json, os, platform, sys
m = platform.machine()
try:
    c = open('/proc/cpuinfo').read()
except OSError:
    c = ''
e = m.lower().startswith(('aarch64', 'arm')) and (os.path.isfile('/etc/edgeship-emulated.json') or 'vendor_id' in c)
cpu = os.environ.get('QEMU_CPU', 'default CPU')
try:
    r = dict(l.strip().split('=', 1) for l in open('/etc/os-release') if '=' in l).get('VERSION_CODENAME', '')
except OSError:
    r = ''
print(json.dumps({'python': platform.python_version(), 'machine': m, 'system': platform.system(),
                  'executable': sys.executable, 'release': r.strip('"') or None,
                  'emulated': 'qemu-user (%s): emulated: not the speed of a Pi' % cpu if e else None}))
"""
# $1 is the requested folder (may be empty or start with ~/); prints its absolute path.
_WORKDIR_SCRIPT = (
    "d=${1:-" + DEFAULT_REMOTE_DIR + '}; case $d in "~") d=$HOME;; "~/"*) d=$HOME/${d#"~/"};; esac; '
    'mkdir -p -- "$d" && cd -- "$d" && pwd -P'
)
# $1 lock folder, $2 minutes after which a lock is stale (its holder died), $3 seconds to wait.
# mkdir is atomic: whoever creates the folder holds the lock. Exit 75 when still held after $3 s.
_LOCK_SCRIPT = (
    'n=0; while ! mkdir -- "$1" 2>/dev/null; do '
    'if [ -n "$(find "$1" -maxdepth 0 -mmin +"$2" 2>/dev/null)" ]; then '
    'rmdir -- "$1" 2>/dev/null; continue; fi; '
    'n=$((n+1)); if [ "$n" -ge "$3" ]; then exit 75; fi; sleep 1; done'
)
_READ_MARKER_SCRIPT = "import sys; sys.stdout.write(open(sys.argv[1]).read())"
_WRITE_MARKER_SCRIPT = (
    "import os, sys; tmp = sys.argv[1] + '.tmp'; fh = open(tmp, 'w'); fh.write(sys.argv[2]); "
    "fh.close(); os.replace(tmp, sys.argv[1])"
)

__all__ = [
    "SshDevice",
    "SshTarget",
    "build_edgeship_wheel",
    "default_wheel_cache",
    "new_job",
    "remote_collect",
    "remove_job",
    "source_root",
    "ssh_problem",
]


# --------------------------------------------------------------------------- target


def _check_word(value: str, what: str) -> None:
    """Refuse names that ssh would read as options or that hold spaces/control characters."""
    if not value or value.startswith("-") or any(c.isspace() or ord(c) < 32 for c in value):
        raise InputError(f"invalid ssh {what} {value!r}: it must be non-empty, not start with '-' and hold no spaces")


def _split_spec(spec: str) -> tuple[str | None, str, int | None]:
    """``[ssh://][user@]host[:port]`` (``[v6addr]:port`` for IPv6) -> (user, host, port)."""
    rest = spec.strip().removeprefix("ssh://")
    user, _, rest = rest.rpartition("@")
    port: str | None = None
    if rest.startswith("["):
        host, closed, tail = rest[1:].partition("]")
        if not closed or (tail and not tail.startswith(":")):
            raise InputError(f"invalid ssh target {spec!r}: write IPv6 addresses as [addr] or [addr]:port")
        port = tail[1:] or None
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host = rest
    if port is not None and not port.isdigit():
        raise InputError(f"invalid port {port!r} in ssh target {spec!r}: expected user@host:PORT with a number")
    return user or None, host, int(port) if port is not None else None


def _quote_config_path(path: Path) -> str:
    """A path as an ssh ``-o`` value: quoted (spaces), with ``%`` tokens escaped."""
    return '"' + str(path).replace("%", "%%") + '"'


@dataclass(frozen=True)
class SshTarget:
    """How to reach one device over ssh.

    Attributes:
        host: Host name or address.
        user: Login name (None: ssh's default, usually the local user or ``~/.ssh/config``).
        port: sshd port.
        identity: Private key file (None: ssh's defaults and agent).
        known_hosts: known_hosts file (None: ``~/.ssh/known_hosts``).
        accept_new_host_key: Trust and store the key of a host seen for the first time.
        connect_timeout: Seconds to wait for the TCP connection and handshake.
        python: The device's Python interpreter (name on its PATH, or a path).
        workdir: Remote folder for venvs and jobs (None: ``~/.cache/edgeship-remote``).
    """

    host: str
    user: str | None = None
    port: int = 22
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    connect_timeout: float = 10
    python: str = "python3"
    workdir: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.host, "host")
        if self.user is not None:
            _check_word(self.user, "user")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise InputError(f"invalid ssh port {self.port!r}: expected 1-65535")
        if not self.connect_timeout > 0:
            raise InputError(f"connect_timeout must be > 0 seconds, got {self.connect_timeout!r}")
        _check_word(self.python, "python interpreter")
        for name in ("identity", "known_hosts"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value).expanduser())

    @classmethod
    def parse(cls, spec: str, **kw: Any) -> SshTarget:
        """Read ``"host"``, ``"user@host"``, ``"user@host:2222"`` (or ``ssh://...``, ``[v6]:port``).

        Args:
            spec: The target as a user would type it.
            **kw: Other :class:`SshTarget` fields. ``user``/``port`` given both here and
                in ``spec`` must agree.
        """
        user, host, port = _split_spec(spec)
        for name, value in (("user", user), ("port", port)):
            if value is None:
                continue
            if kw.get(name) is not None and kw[name] != value:
                raise InputError(f"ssh target {spec!r} says {name} {value!r} but {name}={kw[name]!r} was also given")
            kw[name] = value
        return cls(host=host, **kw)

    @property
    def destination(self) -> str:
        """``user@host`` (or ``host``), the ssh destination argument."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def where(self) -> str:
        """Human form for messages: ``user@host:port``."""
        return f"{self.destination}:{self.port}"

    def scp_path(self, remote: str) -> str:
        """``user@host:remote`` for scp (IPv6 hosts in brackets).

        scp's legacy protocol (the default before OpenSSH 9.0, ``scp -O`` after) hands the
        remote path to the device's shell, its SFTP mode does not; a quoted path means
        something else in each. So only paths that need no quoting are accepted
        (``shlex.quote`` leaves them as they are: the same in both modes, and never run).
        edgeship's own remote names are fixed (job folders, ``model.tflite``...).

        Raises:
            DeviceError: The path holds characters a shell would interpret (spaces, ``$``, quotes...).
        """
        quoted = shlex.quote(remote)
        if quoted != remote or not remote:
            raise DeviceError(
                f"remote path {remote!r} on {self.where} holds characters scp would hand to the "
                "device's shell; use a remote work folder of letters, digits and /._- only"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{quoted}" if self.user else f"{host}:{quoted}"

    def client_options(self) -> list[str]:
        """Options shared by ``ssh`` and ``scp`` (everything but the port flag)."""
        strict = "accept-new" if self.accept_new_host_key else "yes"
        opts = [
            "-o",
            "BatchMode=yes",
            "-o",
            f"StrictHostKeyChecking={strict}",
            "-o",
            f"ConnectTimeout={max(1, math.ceil(self.connect_timeout))}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={_quote_config_path(self.known_hosts)}"]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return opts

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------- errors

#: (stderr pattern, message) for failures of ssh itself, most specific first.
_SSH_PROBLEMS: tuple[tuple[str, str], ...] = (
    (
        r"REMOTE HOST IDENTIFICATION HAS CHANGED",
        "the host key of {where} CHANGED since it was stored in {known_hosts}: refusing to connect "
        "(another machine, a reinstalled device, or an attack); if expected, remove the old key with "
        "ssh-keygen -R {key_host}{kh_flag} and connect again",
    ),
    (
        r"host key is known for|Host key verification failed",
        "the host key of {where} is not in {known_hosts} and host key checking is on: if this is the device "
        "you expect, pass --accept-new-host-key (accept_new_host_key=True) to trust it on first use, "
        "or add it with ssh-keyscan -p {port} {host} >> {known_hosts}",
    ),
    (
        r"Could not resolve hostname",
        "cannot resolve host name {host!r}: check the spelling, or use the device's IP address",
    ),
    (
        r"Connection refused",
        "cannot reach {where}: connection refused (is sshd running on the device, and is port {port} right?)",
    ),
    (r"timed out", "cannot reach {where}: no answer within {timeout:g} s (is the device on, and on this network?)"),
    (
        r"No route to host|Network is unreachable|Host is unreachable",
        "cannot reach {where}: no route to the host (is the device on this network?)",
    ),
    (
        r"Permission denied \(|Too many authentication failures",
        "ssh login to {where} was refused ({detail}): only keys are used (BatchMode); check that the key "
        "{identity} is in the device's ~/.ssh/authorized_keys (ssh-copy-id) and the user name is right",
    ),
    (
        r"Connection closed by|Connection reset by|kex_exchange_identification|Connection timed out during banner",
        "{where} closed the ssh connection during login ({detail}): is it an ssh server, and does it allow this user?",
    ),
)


def _last_line(text: str, prefer: str = "") -> str:
    """The last non-empty line of ``text`` (the last one starting with ``prefer`` if any)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    chosen = [ln for ln in lines if prefer and ln.startswith(prefer)] or lines
    return chosen[-1] if chosen else "no error output"


def ssh_problem(stderr: str, target: SshTarget) -> str | None:
    """One-line explanation of an ssh/scp connection failure, or None when ``stderr`` shows none."""
    for pattern, message in _SSH_PROBLEMS:
        found = re.search(pattern, stderr)
        if found:
            detail = next((ln.strip() for ln in stderr.splitlines() if found.group(0) in ln), found.group(0))
            kh = target.known_hosts
            return message.format(
                where=target.where,
                host=target.host,
                port=target.port,
                timeout=target.connect_timeout,
                known_hosts=kh or "~/.ssh/known_hosts",
                kh_flag=f" -f {kh}" if kh else "",
                key_host=target.host if target.port == 22 else f"'[{target.host}]:{target.port}'",
                identity=target.identity or "(ssh's default keys)",
                detail=detail.rstrip("."),
            )
    return None


def _python_problem(proc: subprocess.CompletedProcess[str], target: SshTarget) -> str:
    err = proc.stderr or ""
    if proc.returncode == 127 or "not found" in err or "No such file" in err:
        return (
            f"Python interpreter {target.python!r} not found on {target.where}: install Python 3 "
            "(e.g. sudo apt install python3 python3-venv) or pass its path as python= (--remote-python)"
        )
    return f"{target.python} on {target.where} failed (exit {proc.returncode}): {_last_line(err)}"


# --------------------------------------------------------------------------- device


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingDependencyError(
            f"the OpenSSH client program {name!r} is not on PATH: install it "
            "(Debian/Ubuntu/Raspberry Pi OS: sudo apt install openssh-client)"
        )
    return path


class SshDevice:
    """A device reached over ssh.

    Args:
        target: How to reach it.
    """

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self._workdir: str | None = None
        self._probe: dict[str, str] | None = None
        #: The marker of the install :meth:`ensure_venv` last made or reused (seconds, command, ...).
        self.last_install: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"SshDevice({self.target.where})"

    # -- commands -------------------------------------------------------------

    def ssh_command(self, argv: Sequence[str]) -> list[str]:
        """The local ``ssh`` argument list that runs ``argv`` on the device."""
        if not argv:
            raise InputError("no remote command given")
        t = self.target
        return [
            shutil.which("ssh") or "ssh",
            "-T",
            *t.client_options(),
            "-p",
            str(t.port),
            "--",
            t.destination,
            shlex.join([str(a) for a in argv]),
        ]

    def _execute(
        self, cmd: list[str], *, timeout: float, what: str, scp: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a local ssh/scp command; connection failures become :class:`DeviceError`."""
        _require_tool(Path(cmd[0]).name)
        self._check_local_files()
        log.debug("%s: %s", what, shlex.join(cmd))
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DeviceError(
                f"{what} on {self.target.where} did not finish within {timeout:g} s "
                "(device busy or connection stalled; raise the timeout if it is just slow)"
            ) from None
        # ssh exits 255 on its own errors; scp reports them with other codes.
        if proc.returncode == 255 or (scp and proc.returncode != 0):
            problem = ssh_problem(proc.stderr, self.target)
            if problem:
                raise DeviceError(problem)
        return proc

    def _check_local_files(self) -> None:
        identity = self.target.identity
        if identity is not None and not identity.is_file():
            raise DeviceError(
                f"ssh identity file {identity} for {self.target.where} does not exist: "
                "pass the private key file (e.g. ~/.ssh/id_ed25519), not the .pub"
            )

    def run(self, argv: Sequence[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the device (``ssh ... -- dest shlex.join(argv)``).

        Args:
            argv: Program and arguments; quoted for the remote shell, never interpreted.
            timeout: Overall seconds, connection included.
            check: Raise :class:`DeviceError` when the remote command exits non-zero.
                Connection failures raise either way.

        Returns:
            The completed process, with text ``stdout``/``stderr``.
        """
        proc = self._execute(self.ssh_command(argv), timeout=timeout, what=f"running {argv[0]}")
        if check and proc.returncode != 0:
            raise DeviceError(
                f"{shlex.join([str(a) for a in argv])[:200]} failed on {self.target.where} "
                f"(exit {proc.returncode}): {_last_line(proc.stderr)}"
            )
        return proc

    def _scp(self, sources: list[str], dest: str, *, timeout: float, what: str) -> None:
        t = self.target
        cmd = [shutil.which("scp") or "scp", "-q", "-r", *t.client_options(), "-P", str(t.port), "--", *sources, dest]
        proc = self._execute(cmd, timeout=timeout, what=what, scp=True)
        if proc.returncode != 0:
            raise DeviceError(f"{what} {t.where} failed (exit {proc.returncode}): {_last_line(proc.stderr)}")

    def push(self, local: Path, remote: str, *, timeout: float = 600) -> None:
        """Copy a local file or folder to ``remote`` (``scp -r``; an existing remote folder receives it inside)."""
        local = Path(local)
        if not local.exists():
            raise InputError(f"cannot copy {local} to the device: it does not exist")
        self._scp([str(local)], self.target.scp_path(remote), timeout=timeout, what=f"copying {local} to")

    def pull(self, remote: str, local: Path, *, timeout: float = 600) -> None:
        """Copy a remote file or folder to ``local`` (``scp -r``)."""
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._scp([self.target.scp_path(remote)], str(local), timeout=timeout, what=f"copying {remote} from")

    # -- facts ----------------------------------------------------------------

    def probe(self) -> dict[str, str]:
        """The device's Python version, machine and system, e.g. ``{'python': '3.11.2', 'machine': 'aarch64', ...}``.

        Raises:
            DeviceError: Unreachable device, or no working ``target.python``.
        """
        if self._probe is None:
            proc = self.run([self.target.python, "-c", _PROBE_SCRIPT], timeout=SHORT_TIMEOUT, check=False)
            if proc.returncode != 0:
                raise DeviceError(_python_problem(proc, self.target))
            try:
                self._probe = json.loads(_last_line(proc.stdout))
            except json.JSONDecodeError:
                raise DeviceError(
                    f"unexpected answer from {self.target.python} on {self.target.where}: "
                    f"{_last_line(proc.stdout)[:200]!r}"
                ) from None
        return dict(self._probe)

    def workdir(self) -> str:
        """Absolute path of the remote folder for venvs and jobs (created on first use)."""
        if self._workdir is None:
            proc = self.run(["sh", "-c", _WORKDIR_SCRIPT, "sh", self.target.workdir or ""], timeout=SHORT_TIMEOUT)
            path = _last_line(proc.stdout)
            if not path.startswith("/") or path == "/":
                raise DeviceError(f"unexpected remote work folder {path!r} on {self.target.where}")
            self._workdir = path
        return self._workdir

    # -- venv -----------------------------------------------------------------

    def ensure_venv(
        self,
        requirements: Sequence[str],
        *,
        wheels: Sequence[Path] = (),
        system_site_packages: bool = True,
        pip_args: Sequence[str] = (),
        timeout: float = 1800,
    ) -> str:
        """Create or reuse an install on the device the way a bundle README says, and return its python.

        The install is a folder ``workdir()/venv-<hash>`` holding ``requirements.txt`` (the
        ``requirements`` and then ``./wheels/NAME`` for each wheel, the bundle's format),
        ``wheels/`` and ``.venv``, made in that folder by the device's own Python and pip:
        ``python3 -m venv [--system-site-packages] .venv && .venv/bin/pip install -r requirements.txt``.
        The hash covers the interpreter, its version and machine, the requirements and the wheel
        names. An install counts as complete when its marker file exists; a complete one is
        reused, and wheels whose content changed (a rebuilt edgeship wheel) are reinstalled into it.

        Args:
            requirements: pip requirement strings, e.g. ``["numpy<2", "ai-edge-litert==2.1.0"]``.
            wheels: Local wheel files to copy and install (e.g. from :func:`build_edgeship_wheel`).
            system_site_packages: Let the venv see the device's system packages (apt numpy...).
            pip_args: Extra ``pip install`` options, e.g. ``["--find-links", "/srv/wheels"]``.
            timeout: Overall seconds for the whole step.

        Returns:
            The remote path of the venv's python.
        """
        deadline = time.monotonic() + timeout
        facts = self._checked_python()
        wheels = [Path(w) for w in wheels]
        for w in wheels:
            if not w.is_file() or w.suffix != ".whl":
                raise InputError(f"wheel {w} does not exist or is not a .whl file")
        digests = {w.name: sha256_file(w) for w in wheels}
        key = _venv_key(self.target.python, facts, requirements, sorted(digests), system_site_packages)
        folder = f"{self.workdir()}/venv-{key}"
        python = f"{folder}/.venv/bin/python"
        marker_path = f"{folder}/{VENV_MARKER}"

        def complete(marker: dict[str, Any] | None) -> bool:
            return marker is not None and marker.get("wheels") == digests

        marker = self._read_marker(python, marker_path)
        if complete(marker):
            log.info("reusing venv %s on %s (complete)", folder, self.target.where)
            self.last_install = {**(marker or {}), "reused": True, "folder": folder}
            return python
        # Another edgeship may be building the same venv on this device: take turns, then look again.
        with self._remote_lock(f"{folder}.lock", stale_after=timeout, wait=_remaining(deadline)):
            marker = self._read_marker(python, marker_path)
            if complete(marker):
                log.info("venv %s on %s was completed meanwhile by another run", folder, self.target.where)
                self.last_install = {**(marker or {}), "reused": True, "folder": folder}
                return python
            start = time.monotonic()
            text = requirements_text(requirements, [w.name for w in wheels])
            record: dict[str, Any] = {
                "key": key,
                "requirements": list(requirements),
                "wheels": digests,
                "python": facts["python"],
                "machine": facts.get("machine"),
                "system_site_packages": system_site_packages,
                "requirements_sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
            if marker is None:
                log.info("creating venv %s on %s", folder, self.target.where)
                command = self._install_fresh(folder, text, wheels, system_site_packages, pip_args, deadline)
                record.update(
                    command=command,
                    seconds=round(time.monotonic() - start, 1),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                )
            else:
                log.info("updating venv %s on %s: reinstalling changed wheels", folder, self.target.where)
                changed = [w for w in wheels if marker.get("wheels", {}).get(w.name) != digests[w.name]]
                self._push_wheels(folder, changed, _remaining(deadline))
                self._pip_in(
                    folder,
                    ["--no-deps", "--force-reinstall", *pip_args, *(f"./wheels/{w.name}" for w in changed)],
                    _remaining(deadline),
                )
                # The install stays the README's; the changed wheels' reinstall is recorded beside it.
                record.update(
                    {k: marker.get(k) for k in ("command", "seconds", "created")},
                    updated={
                        "wheels": [w.name for w in changed],
                        "seconds": round(time.monotonic() - start, 1),
                        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
            seconds = round(time.monotonic() - start, 1)
            self.run([python, "-c", _WRITE_MARKER_SCRIPT, marker_path, json.dumps(record)], timeout=SHORT_TIMEOUT)
            self.last_install = {**record, "reused": False, "folder": folder}
            log.info("venv %s on %s ready in %.1f s", folder, self.target.where, seconds)
        return python

    def _install_fresh(
        self,
        folder: str,
        text: str,
        wheels: Sequence[Path],
        system_site_packages: bool,
        pip_args: Sequence[str],
        deadline: float,
    ) -> str:
        """The README's two steps in a new ``folder``: ``python3 -m venv .venv``, then ``pip install -r``."""
        self.run(["rm", "-rf", "--", folder], timeout=SHORT_TIMEOUT)
        self.run(["mkdir", "-p", "--", f"{folder}/wheels"], timeout=SHORT_TIMEOUT)
        self._push_wheels(folder, wheels, _remaining(deadline))
        self.run(["sh", "-c", 'printf %s "$1" > "$2"', "sh", text, f"{folder}/requirements.txt"], timeout=SHORT_TIMEOUT)
        self._create_venv(f"{folder}/.venv", system_site_packages, _remaining(deadline))
        self._pip_in(folder, [*pip_args, "-r", "requirements.txt"], _remaining(deadline))
        flag = " --system-site-packages" if system_site_packages else ""
        return f"{self.target.python} -m venv{flag} .venv && .venv/bin/pip install -r requirements.txt"

    @contextlib.contextmanager
    def _remote_lock(self, path: str, *, stale_after: float, wait: float) -> Iterator[None]:
        """Hold the remote folder ``path`` as a lock (``mkdir``), waiting up to ``wait`` seconds."""
        argv = ["sh", "-c", _LOCK_SCRIPT, "sh", path, str(max(1, math.ceil(stale_after / 60))), str(max(1, int(wait)))]
        proc = self.run(argv, timeout=wait + SHORT_TIMEOUT, check=False)
        if proc.returncode == 75:
            raise DeviceError(
                f"another edgeship run is still setting up {path.removesuffix('.lock')} on "
                f"{self.target.where} after {wait:.0f} s; try again when it is done (or remove "
                f"{path} if no run is active)"
            )
        if proc.returncode != 0:
            raise DeviceError(f"cannot take the lock {path} on {self.target.where}: {_last_line(proc.stderr)}")
        try:
            yield
        finally:
            self.run(["rmdir", "--", path], timeout=SHORT_TIMEOUT, check=False)

    def _checked_python(self) -> dict[str, str]:
        facts = self.probe()
        version = tuple(int(p) for p in re.findall(r"\d+", facts.get("python", "0"))[:2])
        if version < MIN_PYTHON:
            raise DeviceError(
                f"{self.target.python} on {self.target.where} is Python {facts.get('python')}; "
                f"edgeship needs {'.'.join(map(str, MIN_PYTHON))}+: install a newer python3 "
                "or pass its path as python= (--remote-python)"
            )
        return facts

    def _read_marker(self, python: str, marker: str) -> dict[str, Any] | None:
        """The venv's completion record, or None when the venv is missing or incomplete."""
        proc = self.run([python, "-c", _READ_MARKER_SCRIPT, marker], timeout=SHORT_TIMEOUT, check=False)
        if proc.returncode != 0:
            return None
        try:
            record = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return None
        return record if isinstance(record, dict) else None

    def _create_venv(self, venv: str, system_site_packages: bool, timeout: float) -> None:
        argv = [self.target.python, "-m", "venv", *(["--system-site-packages"] if system_site_packages else []), venv]
        proc = self.run(argv, timeout=timeout, check=False)
        if proc.returncode != 0:
            hint = " (Debian/Raspberry Pi OS: sudo apt install python3-venv)" if "ensurepip" in proc.stderr else ""
            raise DeviceError(
                f"cannot create a venv with {self.target.python} on {self.target.where}{hint}: "
                f"{_last_line(proc.stderr or proc.stdout)}"
            )

    def _push_wheels(self, folder: str, wheels: Sequence[Path], timeout: float) -> None:
        if wheels:
            self.run(["mkdir", "-p", "--", f"{folder}/wheels"], timeout=SHORT_TIMEOUT)
            self._scp(
                [str(w) for w in wheels],
                self.target.scp_path(f"{folder}/wheels/"),
                timeout=timeout,
                what="copying wheels to",
            )

    def _pip_in(self, folder: str, args: Sequence[str], timeout: float) -> None:
        """``.venv/bin/pip install ARGS`` run in ``folder`` (relative ``./wheels/`` paths resolve there)."""
        script = (
            'cd -- "$1" && shift && exec .venv/bin/python -m pip install --disable-pip-version-check '
            '--no-input --progress-bar off "$@"'
        )
        proc = self.run(["sh", "-c", script, "sh", folder, *args], timeout=timeout, check=False)
        log.debug("pip on %s:\n%s\n%s", self.target.where, proc.stdout, proc.stderr)
        if proc.returncode != 0:
            raise DeviceError(
                f"pip install on {self.target.where} failed (exit {proc.returncode}): "
                f"{_last_line(proc.stderr or proc.stdout, prefer='ERROR:')}"
            )

    def run_module(
        self, venv_python: str, module: str, args: Sequence[str], *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``venv_python -m module args...`` on the device; a non-zero exit raises :class:`DeviceError`."""
        proc = self.run([venv_python, "-m", module, *args], timeout=timeout, check=False)
        if proc.returncode != 0:
            raise DeviceError(
                f"python -m {module} failed on {self.target.where} (exit {proc.returncode}): "
                f"{_last_line(proc.stderr or proc.stdout)}"
            )
        return proc


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeviceError("setting up the device venv ran out of time; raise timeout= (--timeout) for slow devices")
    return left


def _venv_key(
    python: str,
    facts: dict[str, str],
    requirements: Sequence[str],
    wheel_names: Sequence[str],
    system_site_packages: bool,
) -> str:
    blob = json.dumps(
        [python, facts.get("python"), facts.get("machine"), list(requirements), list(wheel_names), system_site_packages]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- collect


def new_job(device: SshDevice) -> str:
    """Create a unique remote job folder on the device; return its path."""
    path = f"{device.workdir()}/job-{uuid.uuid4().hex[:12]}"
    device.run(["mkdir", "-p", "--", path], timeout=SHORT_TIMEOUT)
    return path


def remove_job(device: SshDevice, path: str) -> None:
    """Best-effort removal of a job folder (a failure here must not hide the real result)."""
    try:
        device.run(["rm", "-rf", "--", path], timeout=SHORT_TIMEOUT)
    except DeviceError as exc:
        log.warning("could not remove %s on %s: %s", path, device.target.where, exc)


def remote_collect(
    device: SshDevice,
    model_dir: Path,
    image_dir: Path,
    *,
    requirements: Sequence[str],
    threads: int | None = None,
    use_xnnpack: bool = True,
    wheels: Sequence[Path] | None = None,
    pip_args: Sequence[str] = (),
    system_site_packages: bool = True,
    timeout: float = 1800,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Run ``python -m edgeship.runtime.collect`` on the device and return its outputs.

    Copies the bundle (or ``.tflite`` file) and the images into a fresh remote job
    folder, makes sure the device venv exists, runs the collector there, copies
    ``out.npz`` back and removes the job folder.

    Args:
        device: The device.
        model_dir: Bundle folder (``model_card.json`` + model) or a ``.tflite`` file.
        image_dir: Folder of images.
        requirements: pip requirements of the device runtime (numpy, Pillow, interpreter).
        threads: Interpreter threads (None: the runtime's default).
        use_xnnpack: Use the XNNPACK delegate.
        wheels: Wheels to install; None builds the edgeship wheel from this checkout.
        pip_args: Extra ``pip install`` options for the venv.
        system_site_packages: Let the venv see the device's system packages (the OS's numpy, Pillow).
        timeout: Seconds for the collector run (the venv setup has its own 1800 s).

    Returns:
        (logits ``[N, classes]``, image paths relative to ``image_dir``, runtime description).
    """

    model_dir, image_dir = Path(model_dir), Path(image_dir)
    if not image_dir.is_dir():
        raise InputError(f"image folder {image_dir} does not exist")
    if wheels is None:
        wheels = [build_edgeship_wheel(default_wheel_cache())]
    python = device.ensure_venv(
        requirements, wheels=wheels, pip_args=pip_args, system_site_packages=system_site_packages
    )
    job = new_job(device)
    try:
        model = f"{job}/{'bundle' if model_dir.is_dir() else 'model.tflite'}"  # fixed names: never the user's
        device.push(model_dir, model)
        device.push(image_dir, f"{job}/images")
        args = [model, f"{job}/images", "-o", f"{job}/out.npz"]
        args += [
            *(["--threads", str(threads)] if threads is not None else []),
            *([] if use_xnnpack else ["--no-xnnpack"]),
        ]
        device.run_module(python, "edgeship.runtime.collect", args, timeout=timeout)
        with tempfile.TemporaryDirectory(prefix="edgeship-collect-") as tmp:
            device.pull(f"{job}/out.npz", Path(tmp) / "out.npz")
            logits, files, describe = load_collected(Path(tmp) / "out.npz")
    finally:
        remove_job(device, job)
    return logits, files, {**describe, "device": device.target.where}
