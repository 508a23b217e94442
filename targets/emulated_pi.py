"""Emulated Raspberry Pis reachable over ssh: a Debian root under qemu-user, with sshd inside.

Each profile (:data:`PROFILES`) runs on a Debian root folder of one release (:data:`RELEASES`:
``bookworm``, Python 3.11, or ``trixie``, Python 3.13, what Raspberry Pi OS is built on) for
``arm64`` (64-bit Raspberry Pi OS) or ``armhf`` (32-bit), built once with Debian's own
``mmdebstrap`` from Debian's mirror and cached under edgeship's cache by its release and package list.
:func:`start` runs the root's own ``/usr/sbin/sshd`` in it (``chroot``; ``/proc``, ``/sys``
and ``/dev`` mounted) on a free ``127.0.0.1`` port, in a private mount namespace
(``unshare --mount``): the mounts exist only while the device runs and vanish with it,
even after a crash or ``kill -9``. qemu-user-static's binfmt entries (flag ``F``) run the
root's ARM programs, so the root holds no emulator; ``QEMU_CPU`` sets the emulated CPU
(``cortex-a72`` for the Pi 4, ``cortex-a76`` for the Pi 5, ``cortex-a7`` for armv7). Logins use one generated user key
and a ``known_hosts`` file holding each running device's host key.

Needs root (mounts, chroot), ``mmdebstrap``, ``qemu-user-static`` with binfmt_misc
registered, and the OpenSSH client. Timings on these devices are an emulator's, not a Pi's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeship._io import atomic_write_json, atomic_write_text, cache_dir
from edgeship.errors import DeviceError, InputError, MissingDependencyError
from edgeship.targets.ssh import SshTarget

log = logging.getLogger(__name__)

#: Debian releases an emulated Pi can run, and the Python 3 each ships. Raspberry Pi OS follows Debian:
#: bookworm (Python 3.11) until late 2025, trixie (Python 3.13) since; a Pi flashed today runs trixie.
RELEASES = {"bookworm": "3.11", "trixie": "3.13"}
DEFAULT_RELEASE = "trixie"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Packages every emulated Pi has (apt adds their dependencies).
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "openssh-server", "ca-certificates")
#: The login on every emulated Pi (Raspberry Pi OS's traditional user).
USER = "pi"
UID = 1000
#: Written into the root when it is complete: what it was built from.
MARKER = "etc/edgeship-emulated.json"
ROOT_FORMAT = 1
#: A cold build of four roots at once on a busy 2-core machine passed one hour (2026-12-07).
BUILD_TIMEOUT = 3 * 3600.0
#: After a timeout, how long mmdebstrap gets to clean up (unmount, remove) on SIGTERM before SIGKILL.
STOP_GRACE = 120.0
START_TIMEOUT = 120.0
HOST_KEY = "etc/ssh/edgeship_host_ed25519_key"
SSHD_CONFIG = "etc/ssh/sshd_config.edgeship"
CA_FILE = "etc/edgeship/host-ca.crt"
PIP_CONF = "etc/pip.conf"


@dataclass(frozen=True)
class PiProfile:
    """One kind of emulated Pi.

    Attributes:
        name: The edgeship target it stands in for.
        debian_arch: Debian architecture of its root.
        machine: What ``uname -m`` says on it.
        qemu_cpu: Emulated CPU (``QEMU_CPU``).
        extra_packages: Debian packages beyond :data:`BASE_PACKAGES` per release (those the target's bundle
            README asks for with ``sudo apt install`` there).
    """

    name: str
    debian_arch: str
    machine: str
    qemu_cpu: str
    extra_packages: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def packages(self, release: str) -> tuple[str, ...]:
        """Debian packages of its root on ``release``."""
        return BASE_PACKAGES + dict(self.extra_packages).get(release, ())

    @property
    def qemu(self) -> str:
        return {"arm64": "qemu-aarch64-static", "armhf": "qemu-arm-static"}[self.debian_arch]


_ARMHF_APT = (
    ("bookworm", ("python3-numpy", "python3-pil")),
    # trixie armhf: no TFLite runtime on PyPI for cp313 armv7l; the OS's own onnxruntime (1.21) instead.
    ("trixie", ("python3-numpy", "python3-pil", "python3-onnxruntime")),
)
PROFILES = {
    "rpi4-aarch64": PiProfile("rpi4-aarch64", "arm64", "aarch64", "cortex-a72"),
    # Pi 5: Cortex-A76 (Armv8.2 dot-product); the same arm64 root as the Pi 4.
    "rpi5-aarch64": PiProfile("rpi5-aarch64", "arm64", "aarch64", "cortex-a76"),
    # Raspberry Pi 2's core: the oldest the rpi-armv7 target names; uname -m says armv7l.
    "rpi-armv7": PiProfile("rpi-armv7", "armhf", "armv7l", "cortex-a7", _ARMHF_APT),
}


def profile(name: str) -> PiProfile:
    """The profile of an emulated Pi by target name; an unknown name lists the valid ones."""
    if name not in PROFILES:
        raise InputError(f"no emulated device for {name!r}; valid: {', '.join(PROFILES)}")
    return PROFILES[name]


def check_release(release: str) -> str:
    """``release`` if an emulated Pi can run it; an unknown one lists the valid ones."""
    if release not in RELEASES:
        raise InputError(f"no emulated Pi runs {release!r}; valid releases: {', '.join(RELEASES)}")
    return release


def emulation_dir(cache: Path | None = None) -> Path:
    """Roots, keys and the state of running devices (``$EDGESHIP_CACHE/emulated-pi``)."""
    return Path(cache).expanduser() if cache is not None else cache_dir("emulated-pi")


# --------------------------------------------------------------------------- tools


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").is_file() else None)
    if not found:
        raise MissingDependencyError(f"{tool} not found (needed for an emulated Pi): sudo apt-get install {package}")
    return found


def check_host(prof: PiProfile, *, build: bool = True) -> None:
    """Root, the ssh tools (and mmdebstrap to ``build``), and a qemu binfmt entry for the profile's CPU."""
    if os.geteuid() != 0:
        raise DeviceError("an emulated Pi needs root (mount, chroot): run edgeship emulate with sudo")
    tools = [
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        (prof.qemu, "qemu-user-static"),
    ]
    for tool, package in [*tools, *([("mmdebstrap", "mmdebstrap")] if build else [])]:
        _require(tool, package)
    entry = Path("/proc/sys/fs/binfmt_misc") / ("qemu-aarch64" if prof.debian_arch == "arm64" else "qemu-arm")
    if not entry.is_file() or "enabled" not in entry.read_text():
        raise DeviceError(
            f"no binfmt_misc entry {entry}: the kernel cannot run {prof.machine} programs; "
            "sudo apt-get install qemu-user-static binfmt-support (or mount binfmt_misc and "
            "run update-binfmts --enable)"
        )
    if "F" not in _binfmt_flags(entry):
        raise DeviceError(
            f"{entry} lacks the F flag, so a chroot cannot find the emulator: reinstall "
            "qemu-user-static (Debian registers it with flags OCF/POF)"
        )


def _binfmt_flags(entry: Path) -> str:
    for line in entry.read_text().splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


# --------------------------------------------------------------------------- the root


def root_spec(prof: PiProfile, mirror: str, release: str) -> dict[str, Any]:
    """What a root is made of; its digest names the cached folder."""
    return {
        "format": ROOT_FORMAT,
        "suite": release,
        "arch": prof.debian_arch,
        "packages": list(prof.packages(release)),
        "mirror": mirror,
        "variant": "apt",
    }


def root_path(
    prof: PiProfile, release: str = DEFAULT_RELEASE, *, cache: Path | None = None, mirror: str | None = None
) -> Path:
    spec = root_spec(prof, mirror or _mirror(), check_release(release))
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return emulation_dir(cache) / "roots" / f"{release}-{prof.debian_arch}-{digest}"


def _mirror() -> str:
    return os.environ.get("EDGESHIP_DEBIAN_MIRROR") or DEFAULT_MIRROR


def root_ready(root: Path) -> bool:
    return (root / MARKER).is_file() and (root / "usr/sbin/sshd").exists()


def ensure_root(name: str, release: str = DEFAULT_RELEASE, *, cache: Path | None = None, progress: Any = None) -> Path:
    """Build the profile's root once with mmdebstrap (under a lock, published by rename), then reuse it.

    Returns:
        The root folder.

    Raises:
        MissingDependencyError: mmdebstrap or qemu-user-static is missing.
        DeviceError: Not root, no binfmt entry, or mmdebstrap failed (its last line in the message).
    """
    prof = profile(name)
    root = root_path(prof, release, cache=cache)
    if root_ready(root):
        return root
    check_host(prof)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f".{root.name}.lock"):
        if root_ready(root):
            return root
        for stale in root.parent.glob(f".{root.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
        try:
            if progress:
                progress(f"build the {release} {prof.debian_arch} root with mmdebstrap (minutes, once)", None, None)
            seconds = _mmdebstrap(prof, release, work / "root")
            _prepare_root(work / "root", prof, release, seconds)
            if root.exists():
                shutil.rmtree(root)
            os.replace(work / "root", root)
        finally:
            _unmount_under(work)  # never let rmtree descend into a mount a killed mmdebstrap left behind
            shutil.rmtree(work, ignore_errors=True)
    return root


def _unmount_under(folder: Path) -> None:
    """Unmount (lazily, deepest first) every mount point inside ``folder``."""
    prefix = os.path.realpath(folder) + os.sep
    with contextlib.suppress(OSError):
        points = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines() if len(ln.split()) > 1]
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60, check=False)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mmdebstrap(prof: PiProfile, release: str, dest: Path) -> float:
    cmd = [
        "mmdebstrap",
        "--variant=apt",
        f"--arch={prof.debian_arch}",
        f"--include={','.join(prof.packages(release))}",
        release,
        str(dest),
        _mirror(),
    ]
    log.info("run %s", " ".join(cmd))
    start = time.monotonic()
    proc = _run_build(cmd, f"mmdebstrap of the {release} {prof.debian_arch} root")
    if proc.returncode != 0:
        log_file = dest.parent.parent / f"{dest.parent.name.split('.building-')[0].lstrip('.')}.mmdebstrap.log"
        atomic_write_text(log_file, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        raise DeviceError(
            f"mmdebstrap of the {release} {prof.debian_arch} root failed (exit {proc.returncode}): "
            f"{_first_error(proc.stderr or proc.stdout)} (whole output: {log_file})"
        )
    return time.monotonic() - start


def _run_build(cmd: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; past :data:`BUILD_TIMEOUT` stop the whole group (TERM, then KILL)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise DeviceError(f"{what} did not finish in {BUILD_TIMEOUT:.0f} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=STOP_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def _first_error(text: str) -> str:
    """mmdebstrap's first ``E:`` line that says more than that it failed, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:") and "mmdebstrap failed to run" not in ln]
    return (errors or lines or ["no output"])[0 if errors else -1]


def _prepare_root(root: Path, prof: PiProfile, release: str, seconds: float) -> None:
    """The user ``pi``, a host key and sshd's configuration; the marker last."""
    _add_user(root)
    host_key = root / HOST_KEY
    host_key.unlink(missing_ok=True)
    _keygen(host_key, "edgeship-emulated-pi")
    (root / "run/sshd").mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        root / MARKER,
        {
            "spec": root_spec(prof, _mirror(), release),
            "profile": asdict(prof),
            "build_seconds": round(seconds, 1),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _add_user(root: Path) -> None:
    """``pi`` (uid 1000, bash, home /home/pi), written into the root's account files directly."""
    lines = {
        "etc/passwd": f"{USER}:x:{UID}:{UID}:Raspberry Pi user:/home/{USER}:/bin/bash",
        "etc/group": f"{USER}:x:{UID}:",
        "etc/shadow": f"{USER}:*:19000:0:99999:7:::",
    }
    for rel, line in lines.items():
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if not any(ln.split(":")[0] == USER for ln in text.splitlines()):
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
    home = root / "home" / USER
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    for path in (home, home / ".ssh"):
        os.chown(path, UID, UID)


def _keygen(path: Path, comment: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


# --------------------------------------------------------------------------- a running device


@dataclass(frozen=True)
class EmulatedPi:
    """A running emulated Pi: how to reach it over ssh and how to stop it.

    Attributes:
        name: Target name (``rpi4-aarch64``, ``rpi5-aarch64``, ``rpi-armv7``).
        root: Its root folder.
        port: sshd's port on 127.0.0.1.
        identity: Private key of the user ``pi``.
        known_hosts: known_hosts file holding the device's host key.
        pid: Process id of its sshd (the leader of its process group).
        machine: ``uname -m`` on it.
        qemu_cpu: The emulated CPU.
        release: The Debian release of its root (``bookworm``, ``trixie``).
    """

    name: str
    root: Path
    port: int
    identity: Path
    known_hosts: Path
    pid: int
    machine: str
    qemu_cpu: str
    release: str = "bookworm"

    @property
    def host(self) -> str:
        """``pi@127.0.0.1:PORT``, what ``--host`` takes."""
        return f"{USER}@127.0.0.1:{self.port}"

    def target(self, **overrides: Any) -> Any:
        """An :class:`~edgeship.targets.ssh.SshTarget` that reaches it."""

        return SshTarget.parse(
            self.host,
            **{"identity": self.identity, "known_hosts": self.known_hosts, "connect_timeout": 30, **overrides},
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmulatedPi:
        """The state file's fields (its ``schema_version`` stamp is not one)."""
        fields = {k: v for k, v in d.items() if k != "schema_version"}
        return cls(**{**fields, **{k: Path(d[k]) for k in ("root", "identity", "known_hosts")}})


def _state_file(name: str, release: str, cache: Path | None) -> Path:
    return emulation_dir(cache) / "run" / f"{name}.{release}.json"


def client_files(cache: Path | None = None) -> tuple[Path, Path]:
    """(user key, known_hosts) shared by every emulated Pi, so one ``--identity``/``--known-hosts`` serves all."""
    folder = emulation_dir(cache)
    folder.mkdir(parents=True, exist_ok=True)
    identity = folder / "id_ed25519"
    if not identity.is_file():
        _keygen(identity, "edgeship-emulated-pi-user")
    return identity, folder / "known_hosts"


def running(cache: Path | None = None) -> list[EmulatedPi]:
    """The emulated Pis started and not stopped (whose sshd still lives)."""
    found = []
    for state in sorted((emulation_dir(cache) / "run").glob("*.json")):
        try:
            pi = EmulatedPi.from_dict(json.loads(state.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if _alive(pi.pid):
            found.append(pi)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(
    name: str,
    release: str = DEFAULT_RELEASE,
    *,
    cache: Path | None = None,
    port: int | None = None,
    ca_bundle: Path | None = None,
    progress: Any = None,
) -> EmulatedPi:
    """Build (once) and start the emulated Pi for target ``name``; return how to reach it.

    Args:
        name: ``rpi4-aarch64``, ``rpi5-aarch64`` or ``rpi-armv7``.
        release: Debian release of its root (:data:`RELEASES`; default :data:`DEFAULT_RELEASE`).
        cache: Folder for roots, keys and state (default ``$EDGESHIP_CACHE/emulated-pi``).
        port: sshd port on 127.0.0.1 (default: a free one).
        ca_bundle: A CA bundle the device's pip trusts (written to the root's ``/etc/pip.conf``).
            Only for networks whose TLS is re-signed by a local CA: pass this machine's bundle,
            e.g. ``/etc/ssl/certs/ca-certificates.crt``.
        progress: Progress hook.

    Raises:
        DeviceError: Already running, the host cannot emulate it, or sshd did not come up.
    """
    prof = profile(name)
    state = _state_file(name, check_release(release), cache)
    if any(pi.name == name and pi.release == release for pi in running(cache)):
        raise DeviceError(
            f"an emulated {name} on {release} is already running; stop it first: edgeship emulate stop {name}"
        )
    root = root_path(prof, release, cache=cache)
    sharing = [pi.name for pi in running(cache) if pi.root == root]
    if sharing:  # one sshd per root: stopping either would end the other's processes
        raise DeviceError(f"the emulated {sharing[0]} runs on the same {release} root; stop it first")
    check_host(prof, build=not root_ready(root))
    root = ensure_root(name, release, cache=cache, progress=progress)
    identity, known_hosts = client_files(cache)
    _authorize(root, identity)
    _pip_settings(root, ca_bundle)
    port = port or _free_port()
    atomic_write_text(root / SSHD_CONFIG, _sshd_config(port, prof))
    if progress:
        progress(f"start sshd in the emulated {name} on 127.0.0.1:{port}", None, None)
    proc = _launch(root, prof)
    pi = EmulatedPi(name, root, port, identity, known_hosts, proc.pid, prof.machine, prof.qemu_cpu, release)
    try:
        _wait_ssh(pi, proc)
    except BaseException:
        _kill(pi)
        raise
    _set_known_host(known_hosts, port, (root / f"{HOST_KEY}.pub").read_text())
    state.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state, pi.to_dict())
    return pi


def _authorize(root: Path, identity: Path) -> None:
    keys = root / "home" / USER / ".ssh" / "authorized_keys"
    keys.write_text(identity.with_name(identity.name + ".pub").read_text())
    os.chown(keys, UID, UID)


def _pip_settings(root: Path, ca_bundle: Path | None) -> None:
    """The device's ``/etc/pip.conf``: a CA bundle when given, else none (pip's own certifi)."""
    conf = root / PIP_CONF
    if ca_bundle is None:
        conf.unlink(missing_ok=True)
        return
    if not Path(ca_bundle).is_file():
        raise InputError(f"CA bundle {ca_bundle} does not exist")
    (root / CA_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_bundle, root / CA_FILE)
    conf.write_text(f"[global]\ncert = /{CA_FILE}\n")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sshd_config(port: int, prof: PiProfile) -> str:
    return "\n".join(
        [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey /{HOST_KEY}",
            "PidFile none",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PermitRootLogin no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "LogLevel INFO",
            # The CPU every program of a login runs on (sshd gives sessions a fresh environment).
            f"SetEnv QEMU_CPU={prof.qemu_cpu}",
            "Subsystem sftp internal-sftp",
            "",
        ]
    )


#: Run as ``sh -c SCRIPT sh ROOT`` inside ``unshare --mount``: the mounts live in that namespace only.
_LAUNCH = (
    'set -e; r=$1; mount -t proc proc "$r/proc"; mount -t sysfs sysfs "$r/sys"; '
    'mount --rbind /dev "$r/dev"; mkdir -p "$r/run/sshd"; '
    f'exec chroot "$r" /usr/sbin/sshd -D -e -f /{SSHD_CONFIG}'
)


def _launch(root: Path, prof: PiProfile) -> subprocess.Popen[bytes]:
    log_path = root.parent / f"{root.name}.sshd.log"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "QEMU_CPU": prof.qemu_cpu, "LANG": "C.UTF-8"}
    with open(log_path, "wb") as fh:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _LAUNCH, "sh", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_ssh(pi: EmulatedPi, proc: subprocess.Popen[bytes]) -> None:
    """Wait until sshd answers with an SSH banner (the emulated sshd takes a few seconds)."""
    deadline = time.monotonic() + START_TIMEOUT
    log_path = pi.root.parent / f"{pi.root.name}.sshd.log"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace").strip().splitlines()
            raise DeviceError(
                f"sshd of the emulated {pi.name} exited ({proc.returncode}): {text[-1] if text else 'no output'}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", pi.port), timeout=5) as sock:
            sock.settimeout(10)
            if sock.recv(64).startswith(b"SSH-"):
                return
        time.sleep(0.5)
    raise DeviceError(
        f"sshd of the emulated {pi.name} did not answer on 127.0.0.1:{pi.port} within {START_TIMEOUT:g} s"
    )


def _set_known_host(known_hosts: Path, port: int, host_key: str) -> None:
    """Put ``[127.0.0.1]:port key`` in known_hosts, replacing an older line for that port."""
    prefix = f"[127.0.0.1]:{port} "
    lines = known_hosts.read_text().splitlines() if known_hosts.is_file() else []
    kept = [ln for ln in lines if not ln.startswith(prefix)]
    key = " ".join(host_key.split()[:2])
    atomic_write_text(known_hosts, "\n".join([*kept, prefix + key]) + "\n")


def stop(name: str | None = None, *, cache: Path | None = None, release: str | None = None) -> list[str]:
    """Stop the named emulated Pi, on every release or ``release`` (all when None); return the names stopped."""
    stopped = []
    for state in sorted((emulation_dir(cache) / "run").glob("*.json")):
        try:
            pi = EmulatedPi.from_dict(json.loads(state.read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            state.unlink(missing_ok=True)
            continue
        if (name is not None and pi.name != name) or (release is not None and pi.release != release):
            continue
        _kill(pi)
        _drop_known_host(pi)
        state.unlink(missing_ok=True)
        stopped.append(pi.name)
    if name is not None and not stopped:
        raise InputError(
            f"no emulated {name} is running (running: {', '.join(p.name for p in running(cache)) or 'none'})"
        )
    return stopped


def _kill(pi: EmulatedPi) -> None:
    """TERM (then KILL) sshd's process group and every process still inside the root.

    Logged-in sessions run in their own sessions, so they are found by their root
    directory; when the last one is gone its mount namespace, and the mounts, go too.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _inside(pi.root)
        if not pids:
            _alive_child(pi.pid)
            return
        if pi.pid in pids:  # still our sshd (not a reused pid): its whole group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pi.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_inside(pi.root) or _alive_child(pi.pid)):
            time.sleep(0.2)


def _alive_child(pid: int) -> bool:
    """Reap ``pid`` if it is our child and exited; True while it runs."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return _alive(pid)


def _inside(root: Path) -> set[int]:
    """Pids of processes whose root directory is ``root``."""
    real = os.path.realpath(root)
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == real:
                    found.add(int(entry.name))
    return found


def _drop_known_host(pi: EmulatedPi) -> None:
    if pi.known_hosts.is_file():
        prefix = f"[127.0.0.1]:{pi.port} "
        kept = [ln for ln in pi.known_hosts.read_text().splitlines() if not ln.startswith(prefix)]
        atomic_write_text(pi.known_hosts, "".join(ln + "\n" for ln in kept))


@contextlib.contextmanager
def emulated(name: str, **kw: Any) -> Iterator[EmulatedPi]:
    """Run an emulated Pi while the block runs; stopped on exit, error, Ctrl-C or SIGTERM."""
    pi = start(name, **kw)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    with contextlib.suppress(ValueError):  # not the main thread: no handler, the finally still stops it
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield pi
    finally:
        stop(name, cache=kw.get("cache"), release=pi.release)
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous)


__all__ = [
    "DEFAULT_RELEASE",
    "PROFILES",
    "RELEASES",
    "EmulatedPi",
    "PiProfile",
    "check_release",
    "client_files",
    "emulated",
    "ensure_root",
    "profile",
    "root_path",
    "running",
    "start",
    "stop",
]
