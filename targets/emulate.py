"""Run edgeship's on-device runtime on an emulated aarch64 CPU (qemu user mode).

A drift check then runs the aarch64 kernels of the TFLite interpreter (XNNPACK's
NEON paths, not the x86 ones) with no device attached. It is slow (about a second
per 224x224 image) but it needs nothing but ``qemu-aarch64-static`` on the host.

The guest is an arm64 *root folder* built once per cache dir and reused:

* Debian arm64 ``.deb`` files for ``python3.11`` and its dependencies, fetched with a
  private apt configuration (``APT::Architecture=arm64``, private state, cache and
  sources) and unpacked with ``dpkg-deb -x``: the host's apt and dpkg are not touched;
* a folder of aarch64 wheels (numpy, Pillow, ai-edge-litert) installed by the host's
  pip with ``--platform ... --only-binary=:all: --target``.

edgeship itself is not installed in the guest: :func:`run_python` puts a small
folder of symlinks to this installation's sources on ``PYTHONPATH``.

``qemu-aarch64-static -L ROOT`` looks up every absolute path in ROOT first, so a
host path that also exists inside the root (say ``/usr/share/x``) is seen as the
root's file by the guest; paths under ``/tmp``, ``/home`` or ``/work`` are safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

import edgeship
from edgeship._io import atomic_write_json, cache_dir
from edgeship._progress import ProgressFn, silent
from edgeship.errors import DeviceError, InputError, MissingDependencyError
from edgeship.runtime.collect import load_collected

log = logging.getLogger(__name__)

#: The qemu user-mode emulator (Debian/Ubuntu package ``qemu-user-static``).
QEMU = "qemu-aarch64-static"
#: Emulated CPU: qemu's default ``max`` CPU gave wrong outputs with XNNPACK.
DEFAULT_CPU = "cortex-a72"
#: The emulated CPU of each aarch64 target: the Pi 5's Cortex-A76 has the Armv8.2 dot-product
#: instructions (``asimddp``) XNNPACK's int8 kernels use; the Pi 4's Cortex-A72 has not.
TARGET_CPUS = {"rpi4-aarch64": "cortex-a72", "rpi5-aarch64": "cortex-a76"}


def cpu_for(target: str) -> str:
    """The qemu CPU model that stands in for ``target``'s (:data:`DEFAULT_CPU` for a target not listed)."""
    return TARGET_CPUS.get(target, DEFAULT_CPU)


#: Debian mirror and release of the guest (override the mirror with $EDGESHIP_DEBIAN_MIRROR).
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Debian packages of the guest (apt adds their dependencies).
DEBIAN_PACKAGES = ("python3.11", "libstdc++6")
#: glibc of bookworm is 2.36: any manylinux_2_17 ... 2_36 aarch64 wheel runs on it.
WHEEL_PLATFORMS = tuple(f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)) + ("manylinux2014_aarch64",)
#: The guest's interpreter: ai-edge-litert 2.3.0 segfaults under qemu 7.2; 2.1.0 works.
LITERT = "ai-edge-litert==2.1.0"
GUEST_PYTHON = "usr/bin/python3.11"
SITE_DIR = "opt/edgeship/site-packages"
SOURCE_DIR = "opt/edgeship/src"
ROOT_NAME = "aarch64-root"
MARKER = ".edgeship-root.json"
ROOT_FORMAT = 1
#: Subpackages that pyproject maps from top-level repository folders.
SUBPACKAGES = ("convert", "quantize", "runtime", "targets")
BUILD_STEP_TIMEOUT = 1800.0


# --------------------------------------------------------------------------- tools


def require_qemu() -> str:
    """Path of ``qemu-aarch64-static``, or :class:`MissingDependencyError` saying how to install it."""
    found = shutil.which(QEMU)
    if not found:
        raise MissingDependencyError(
            f"{QEMU} not found on PATH (needed to emulate an aarch64 device): sudo apt-get install qemu-user-static"
        )
    return found


def _require_build_tools() -> None:
    """apt-get, dpkg-deb, the Debian keyring and pip: what building the root needs."""
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            raise MissingDependencyError(f"{tool} not found: building the aarch64 root needs a Debian or Ubuntu host")
    if not Path(DEBIAN_KEYRING).is_file():
        raise MissingDependencyError(
            f"{DEBIAN_KEYRING} not found (verifies the Debian arm64 packages): "
            "sudo apt-get install debian-archive-keyring"
        )
    if importlib.util.find_spec("pip") is None:
        raise MissingDependencyError(f"pip is not installed for {sys.executable}: {sys.executable} -m ensurepip")


def default_cache_dir() -> Path:
    """edgeship's cache (:func:`edgeship._io.cache_dir`)."""

    return cache_dir()


# --------------------------------------------------------------------------- the root


def root_spec() -> dict[str, Any]:
    """What the root is made of; a root whose marker records another spec is rebuilt."""
    return {
        "format": ROOT_FORMAT,
        "suite": DEBIAN_SUITE,
        "packages": list(DEBIAN_PACKAGES),
        "wheels": _wheel_requirements(),
    }


def _wheel_requirements() -> list[str]:
    """numpy < 2, Pillow and :data:`LITERT`; numpy and Pillow pinned to the host's versions when installed.

    The same numpy and Pillow on both sides leave only the interpreter's kernels to differ
    (Pillow's resizing changes between versions). tflite-runtime 2.14 needs numpy < 2.
    """
    numpy_version, pillow_version = _host_version("numpy"), _host_version("Pillow")
    numpy_req = f"numpy=={numpy_version}" if numpy_version and numpy_version.startswith("1.") else "numpy<2"
    pillow_req = f"Pillow=={pillow_version}" if pillow_version else "Pillow"
    return [numpy_req, pillow_req, LITERT]


def _host_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def root_info(root: Path) -> dict[str, Any] | None:
    """The marker of a completely built root (what it holds, how long it took), else None."""
    try:
        marker = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and (Path(root) / GUEST_PYTHON).exists() else None


def root_ready(root: Path) -> bool:
    """True when ``root`` was completely built with the current :func:`root_spec`."""
    info = root_info(root)
    return info is not None and info.get("spec") == root_spec()


def ensure_root(cache_dir: Path | None = None, *, progress: ProgressFn | None = None) -> Path:
    """Build the arm64 guest root once, then reuse it.

    The root is built in a temporary folder beside its final place and renamed into
    place only when complete (marker file written, guest Python checked), under a
    file lock, so a half-built root is never reused and two processes never build
    at the same time. A root built from another :func:`root_spec` is replaced.

    Args:
        cache_dir: Folder holding ``aarch64-root`` (default: :func:`default_cache_dir`).
        progress: Called with (stage, done, total) while building.

    Returns:
        The root folder.

    Raises:
        MissingDependencyError: qemu-aarch64-static, apt-get, dpkg-deb, the Debian
            keyring or pip is missing.
        DeviceError: Downloading or unpacking the packages or wheels failed.
    """
    qemu = require_qemu()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = cache / ROOT_NAME
    if root_ready(root):
        return root
    _require_build_tools()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f".{ROOT_NAME}.lock"):
        if root_ready(root):  # built by another process while we waited
            return root
        _remove_leftovers(cache)
        work = Path(tempfile.mkdtemp(prefix=f".{ROOT_NAME}.building-", dir=cache))
        try:
            _build_root(work, qemu, progress or silent)
            _publish(work / "root", root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_leftovers(cache: Path) -> None:
    """Builds interrupted by a crash or Ctrl-C (safe: we hold the build lock)."""
    for stale in cache.glob(f".{ROOT_NAME}.*-*"):
        if stale.is_dir():
            log.info("removing an unfinished aarch64 root %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _publish(new: Path, root: Path) -> None:
    """Rename ``new`` to ``root``, moving an outdated or broken ``root`` out of the way first."""
    old = None
    if root.exists() or root.is_symlink():
        old = root.with_name(f".{ROOT_NAME}.old-{os.getpid()}")
        os.replace(root, old)
    os.replace(new, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_root(work: Path, qemu: str, progress: ProgressFn) -> None:
    """Fetch and unpack everything into ``work/root`` and write its marker last."""
    start = time.perf_counter()
    root = work / "root"
    root.mkdir()
    debs = _download_debs(work / "apt", progress)
    _extract_debs(debs, root, progress)
    _relativize_symlinks(root)
    wheels = _install_wheels(root / SITE_DIR, progress)
    _compile_and_check(root, qemu, progress)
    seconds = round(time.perf_counter() - start, 1)
    atomic_write_json(
        root / MARKER,
        {
            "spec": root_spec(),
            "debs": sorted(d.name for d in debs),
            "wheels": wheels,
            "mirror": _mirror(),
            "qemu": _qemu_version(qemu),
            "build_seconds": seconds,
        },
    )
    log.info("built the aarch64 root in %.0f s", seconds)


def _mirror() -> str:
    return os.environ.get("EDGESHIP_DEBIAN_MIRROR") or DEBIAN_MIRROR


def _apt_config(work: Path) -> Path:
    """A private apt configuration for arm64: its own sources, state, cache, no host keys."""
    etc, state, cache = work / "etc", work / "state", work / "cache"
    for sub in (
        etc / "apt.conf.d",
        etc / "preferences.d",
        etc / "sources.list.d",
        etc / "trusted.gpg.d",
        state / "lists" / "partial",
        cache / "archives" / "partial",
    ):
        sub.mkdir(parents=True, exist_ok=True)
    (state / "status").write_text("")  # nothing installed: apt fetches every dependency
    (etc / "sources.list").write_text(f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {_mirror()} {DEBIAN_SUITE} main\n")
    lines = [
        'APT::Architecture "arm64";',
        'APT::Architectures { "arm64"; };',
        f'Dir::Etc "{etc}";',
        f'Dir::State "{state}";',
        f'Dir::State::status "{state / "status"}";',
        f'Dir::Cache "{cache}";',
        'Acquire::Languages "none";',
        'APT::Install-Recommends "false";',
        'APT::Update::Error-Mode "any";',  # a failed index download is an error, not a warning
    ]
    if os.geteuid() == 0:
        lines.append('APT::Sandbox::User "root";')  # the private folders may not be readable by _apt
    conf = work / "apt.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _download_debs(work: Path, progress: ProgressFn) -> list[Path]:
    """Resolve and download the arm64 packages with a private apt (no host changes)."""
    conf = _apt_config(work)
    env = {**os.environ, "APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    progress(f"apt-get update (arm64, {_mirror()} {DEBIAN_SUITE})", None, None)
    _run_step(["apt-get", "-q", "update"], env=env, what=f"apt-get update of {_mirror()} {DEBIAN_SUITE} arm64")
    progress("download arm64 packages", None, None)
    _run_step(
        ["apt-get", "-q", "-y", "--download-only", "install", *DEBIAN_PACKAGES],
        env=env,
        what=f"apt-get download of {' '.join(DEBIAN_PACKAGES)} (arm64)",
    )
    debs = sorted((work / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise DeviceError(f"apt-get downloaded no arm64 packages for {' '.join(DEBIAN_PACKAGES)}")
    return debs


def _extract_debs(debs: Sequence[Path], root: Path, progress: ProgressFn) -> None:
    for i, deb in enumerate(debs):
        _run_step(["dpkg-deb", "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}")
        progress("unpack arm64 packages", i + 1, len(debs))


def _relativize_symlinks(root: Path) -> None:
    """Absolute links inside the root (``/etc/...``) would point into the host: make them relative."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            link = Path(folder) / name
            if link.is_symlink() and os.readlink(link).startswith("/"):
                target = root / os.readlink(link).lstrip("/")
                link.unlink()
                link.symlink_to(os.path.relpath(target, link.parent))


def _install_wheels(site: Path, progress: ProgressFn) -> dict[str, str]:
    """pip-install the aarch64 wheels for CPython 3.11 into ``site``; their versions."""
    reqs = _wheel_requirements()
    progress(f"pip install aarch64 wheels: {' '.join(reqs)}", None, None)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    _run_step(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-warn-conflicts",
            "--no-compile",
            "--target",
            str(site),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            "3.11",
            *platforms,
            *reqs,
        ],
        what="pip install of the aarch64 wheels",
    )
    names = (d.name.removesuffix(".dist-info").split("-", 1) for d in sorted(site.glob("*.dist-info")))
    return {name: version for name, version in names}


def _compile_and_check(root: Path, qemu: str, progress: ProgressFn) -> None:
    """Byte-compile the guest's modules with the guest Python, then import the runtime's packages.

    Compiling once here keeps every later run from recompiling under emulation, and
    proves that the emulated interpreter and the wheels work before the root is published.
    """
    progress("byte-compile and check the guest Python (emulated)", None, None)
    script = (
        "import compileall, re, sys\n"
        "skip = re.compile(r'/tests?/')\n"
        "ok = all([compileall.compile_dir(d, quiet=1, rx=skip) for d in sys.argv[1:]])\n"
        "import numpy, PIL.Image, ai_edge_litert.interpreter\n"
        "sys.exit(0 if ok else 'byte-compiling failed')\n"
    )
    env = _guest_env(root, [], None, write_bytecode=True)
    proc = _run_guest(
        ["-c", script, str(root / "usr/lib/python3.11"), str(root / SITE_DIR)],
        root=root,
        qemu=qemu,
        cpu=DEFAULT_CPU,
        timeout=BUILD_STEP_TIMEOUT,
        env=env,
    )
    _check_guest(proc, "checking the new aarch64 root")


def _qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else "unknown"


def _run_step(cmd: list[str], *, what: str, env: dict[str, str] | None = None) -> None:
    """Run one build command; a failure becomes one :class:`DeviceError` line."""
    log.debug("run %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUILD_STEP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"building the aarch64 root: {what} timed out after {exc.timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise DeviceError(
            f"building the aarch64 root: {what} failed (exit code {proc.returncode}): "
            f"{last_line(proc.stderr) or last_line(proc.stdout)}"
        )


def last_line(text: str | bytes | None) -> str:
    """Last non-blank line of a process output (what usually says what went wrong)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# --------------------------------------------------------------------------- running the guest


def source_folder(root: Path) -> Path:
    """A folder with an ``edgeship`` package of symlinks to this installation's sources.

    pyproject maps the top-level folders ``runtime/``, ``targets/``... to ``edgeship.*``
    subpackages, so the repository root on ``PYTHONPATH`` is not enough. The folder is
    named after what it links to and created (atomically) when missing.
    """
    links = _source_links()
    digest = hashlib.sha256(json.dumps(sorted(links.items())).encode()).hexdigest()[:16]
    folder = root / SOURCE_DIR / digest
    if (folder / "edgeship" / "__init__.py").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=folder.parent))
    try:
        (tmp / "edgeship").mkdir()
        for name, target in links.items():
            (tmp / "edgeship" / name).symlink_to(target)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "edgeship" / "__init__.py").exists():  # not created by a concurrent run either
            raise
    return folder


def _source_links() -> dict[str, str]:
    """Entry name in the guest's ``edgeship/`` -> absolute host path of the source."""

    package = Path(edgeship.__file__).resolve().parent
    links = {p.name: str(p) for p in package.iterdir() if p.name != "__pycache__" and not p.name.startswith(".")}
    for sub in SUBPACKAGES:
        spec = importlib.util.find_spec(f"edgeship.{sub}")
        if spec is not None and spec.submodule_search_locations:
            links[sub] = str(Path(list(spec.submodule_search_locations)[0]).resolve())
    return links


def _guest_env(
    root: Path, python_path: Sequence[Path], extra: dict[str, str] | None, *, write_bytecode: bool = False
) -> dict[str, str]:
    """The host environment without the host Python's and loader's settings, plus the guest's path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "VIRTUAL_ENV", "CONDA"))}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*python_path, root / SITE_DIR])
    env["PYTHONNOUSERSITE"] = "1"  # the host user's site-packages hold x86 builds
    env["PYTHONSAFEPATH"] = "1"  # no cwd on sys.path: in the repository root, edgeship/ lacks runtime/
    if not write_bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # runs never write into the root or the source tree
    env.update(extra or {})
    return env


def _no_core_dumps() -> None:
    """A crashing guest makes qemu write a core file of the whole emulator into the cwd: not wanted."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run_guest(
    args: Sequence[str], *, root: Path, qemu: str, cpu: str, timeout: float, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the guest Python; a timeout becomes a :class:`DeviceError`."""
    cmd = [qemu, "-L", str(root), "-cpu", cpu, str(root / GUEST_PYTHON), *args]
    log.debug("run %s", " ".join(cmd))
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False, preexec_fn=_no_core_dumps
        )
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(
            f"emulated aarch64 python ({cpu}) timed out after {timeout:g} s running "
            f"{_short(args)}; last output: {last_line(exc.stderr)}"
        ) from exc


def _check_guest(proc: subprocess.CompletedProcess[str], what: str) -> None:
    """Raise one :class:`DeviceError` line for a crash or a non-zero exit of the guest."""
    if proc.returncode == 0:
        return
    if proc.returncode < 0:
        how = f"crashed ({_signal_name(-proc.returncode)})"
    else:
        how = f"exited with code {proc.returncode}"
    raise DeviceError(f"emulated aarch64 python {how} {what}: {last_line(proc.stderr) or last_line(proc.stdout)}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _short(args: Sequence[str]) -> str:
    text = " ".join(args)
    return text if len(text) <= 80 else text[:77] + "..."


def run_python(
    args: list[str],
    *,
    root: Path,
    cpu: str = DEFAULT_CPU,
    timeout: float = 3600,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the root's arm64 ``python3.11`` under ``qemu-aarch64-static`` (no shell).

    ``PYTHONPATH`` holds this installation's edgeship sources (see :func:`source_folder`)
    and the aarch64 wheels, so ``-m edgeship.runtime.collect`` works in the guest.

    Args:
        args: Arguments of ``python3.11``, e.g. ``["-m", "edgeship.runtime.collect", ...]``.
        root: A root from :func:`ensure_root`.
        cpu: qemu CPU model (``cortex-a72`` gives correct results; ``max`` did not).
        timeout: Seconds before the emulator is killed.
        env: Extra environment variables for the guest.
        check: Raise :class:`DeviceError` on a crash or a non-zero exit.

    Returns:
        The finished process, with text ``stdout`` and ``stderr``.

    Raises:
        MissingDependencyError: qemu-aarch64-static is not installed.
        DeviceError: ``root`` is not a complete root, the run timed out, or (with
            ``check``) the guest crashed or exited non-zero; the message ends with
            the last line of its stderr.
    """
    qemu = require_qemu()
    root = Path(root)
    if root_info(root) is None:
        raise DeviceError(f"{root} is not a complete aarch64 root (no {MARKER}): build one with ensure_root()")
    guest_env = _guest_env(root, [source_folder(root)], env)
    proc = _run_guest(args, root=root, qemu=qemu, cpu=cpu, timeout=timeout, env=guest_env)
    if check:
        _check_guest(proc, f"running {_short(args)}")
    return proc


# --------------------------------------------------------------------------- the device


class EmulatedDevice:
    """An aarch64 device emulated by qemu user mode: runs edgeship's runtime with no hardware.

    Args:
        root: A root from :func:`ensure_root`; built (or reused) on first use when None.
        cpu: qemu CPU model.
        cache_dir: Where :func:`ensure_root` keeps the root (when ``root`` is None).
        progress: Progress hook for building the root.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        cpu: str = DEFAULT_CPU,
        cache_dir: Path | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self._root = Path(root) if root is not None else None
        self.cpu = cpu
        self.cache_dir = cache_dir
        self.progress = progress

    @property
    def root(self) -> Path:
        """The guest root (built on first access when not given)."""
        if self._root is None:
            self._root = ensure_root(self.cache_dir, progress=self.progress)
        return self._root

    def describe(self) -> dict[str, str]:
        return {"access": "emulated", "machine": "aarch64", "emulator": QEMU, "cpu": self.cpu, "root": str(self.root)}

    def collect_outputs(
        self,
        model: str | os.PathLike[str],
        image_dir: str | os.PathLike[str],
        *,
        threads: int | None = None,
        use_xnnpack: bool = True,
        timeout: float = 3600,
    ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
        """Run ``python -m edgeship.runtime.collect`` on the emulated CPU.

        Args:
            model: Bundle folder or ``.tflite`` file (on the host: the guest sees host files).
            image_dir: Folder of images (all are run, sorted).
            threads: Interpreter threads (None: the interpreter's default).
            use_xnnpack: Use the XNNPACK delegate.
            timeout: Seconds for the whole run (about 1 s per 224x224 image).

        Returns:
            (logits ``[N, classes]``, file names relative to ``image_dir``, runtime
            description with ``machine == "aarch64"`` and the emulated ``cpu``).

        Raises:
            InputError: A path is hidden from the guest by a same-named path inside the root.
            DeviceError: The guest failed (its last stderr line is in the message).
        """

        paths = [Path(model).resolve(), Path(image_dir).resolve()]
        for path in paths:
            self._check_visible(path)
        with tempfile.TemporaryDirectory(prefix="edgeship-emulate-") as tmp:
            out = Path(tmp) / "outputs.npz"
            args = ["-m", "edgeship.runtime.collect", *map(str, paths), "-o", str(out)]
            args += ["--threads", str(threads)] if threads is not None else []
            args += [] if use_xnnpack else ["--no-xnnpack"]
            run_python(args, root=self.root, cpu=self.cpu, timeout=timeout)
            if not out.is_file():
                raise DeviceError(f"the emulated collect run wrote no {out.name}")
            logits, files, describe = load_collected(out)
        if describe.get("machine") != "aarch64":
            raise DeviceError(f"the emulated run reports machine {describe.get('machine')!r}, not 'aarch64'")
        return logits, files, {**describe, "emulator": QEMU, "cpu": self.cpu}

    def _check_visible(self, path: Path) -> None:
        """qemu -L maps a path that also exists in the root to the root's copy: refuse those."""
        if (self.root / str(path).lstrip("/")).exists():
            raise InputError(
                f"{path} also exists inside the aarch64 root {self.root}, which hides it from the "
                "emulated device: move it (e.g. under /tmp)"
            )


__all__ = [
    "DEFAULT_CPU",
    "TARGET_CPUS",
    "cpu_for",
    "EmulatedDevice",
    "QEMU",
    "default_cache_dir",
    "ensure_root",
    "require_qemu",
    "root_info",
    "root_ready",
    "run_python",
    "source_folder",
]
