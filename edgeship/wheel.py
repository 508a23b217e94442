"""Build edgeship's own wheel from the source checkout: what bundles ship and device venvs install.

The wheel holds only edgeship's code; its runtime part needs numpy, Pillow and a TFLite
interpreter on the device. Builds are cached by the sources' sizes and times and are
byte-reproducible (fixed ``SOURCE_DATE_EPOCH``), so a device venv reinstalls the wheel
only when the code changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import edgeship
from edgeship._io import atomic_write_json, cache_dir
from edgeship.errors import EdgeshipError, InputError, MissingDependencyError

log = logging.getLogger(__name__)

#: Folders of the source tree that never go into the wheel build.
_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "out", "tests", "__pycache__"}


def source_root() -> Path:
    """The source checkout edgeship is installed from (editable install)."""

    root = Path(edgeship.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise InputError(
            f"edgeship at {Path(edgeship.__file__).parent} is not installed from a source checkout "
            "(no pyproject.toml beside it): build a wheel yourself and pass it as wheels=[...]"
        )
    return root


def _source_files(root: Path) -> list[Path]:
    """Files the wheel is built from, relative to ``root``."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".") and not d.endswith(".egg-info")
        )
        rel = Path(folder).relative_to(root)
        found += [rel / f for f in sorted(files) if not f.endswith((".pyc", ".pyo")) and not f.startswith(".")]
    return found


def _fingerprint(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for rel in files:
        st = (root / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cached_wheel(stamp: Path, fingerprint: str) -> Path | None:
    try:
        record = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    wheel = stamp.parent / str(record.get("wheel", ""))
    return wheel if record.get("fingerprint") == fingerprint and wheel.is_file() else None


def _pip_wheel(src: Path, out: Path) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        raise MissingDependencyError(
            "building the edgeship wheel needs setuptools in this environment: pip install 'setuptools>=69' wheel"
        )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--disable-pip-version-check",
        "-q",
        "-w",
        str(out),
        str(src),
    ]
    # A fixed SOURCE_DATE_EPOCH (1980-01-01, the zip epoch) makes the wheel byte-identical for
    # identical sources, so a device venv only reinstalls it when the code really changed.
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env)
    wheels = sorted(out.glob("edgeship-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise EdgeshipError(
            f"building the edgeship wheel failed (exit {proc.returncode}): {_error_line(proc.stderr or proc.stdout)}"
        )
    return wheels[0]


def build_edgeship_wheel(dest: Path) -> Path:
    """Build the edgeship wheel from the installed source checkout into ``dest`` (cached).

    The build runs on a copy of the source (``pip wheel --no-deps --no-build-isolation``), so
    the checkout gets no ``build/`` folder. The wheel is rebuilt only when a source file's
    size or mtime changed since the last build into ``dest``.

    Returns:
        The wheel's path in ``dest``.
    """
    root = source_root()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = _source_files(root)
    fingerprint = _fingerprint(root, files)
    stamp = dest / ".edgeship-wheel.json"
    cached = _cached_wheel(stamp, fingerprint)
    if cached is not None:
        log.debug("edgeship wheel %s is up to date", cached)
        return cached
    with tempfile.TemporaryDirectory(prefix=".edgeship-wheel-", dir=dest) as tmp:
        src = Path(tmp) / "src"
        for rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
        built = _pip_wheel(src, Path(tmp) / "out")
        wheel = dest / built.name
        os.replace(built, wheel)
    atomic_write_json(stamp, {"fingerprint": fingerprint, "wheel": wheel.name})
    log.info("built %s from %s", wheel.name, root)
    return wheel


def default_wheel_cache() -> Path:
    """The ``wheels`` folder of edgeship's cache (:func:`edgeship._io.cache_dir`)."""
    return cache_dir("wheels")


def _error_line(text: str) -> str:
    """pip's last ``ERROR:`` line, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines
    return errors[-1] if errors else "no error output"


__all__ = ["build_edgeship_wheel", "default_wheel_cache", "source_root"]
