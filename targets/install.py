"""What a Python target's device installs, and the commands it installs it with.

One source for the bundle's ``requirements.txt`` and README and for edgeship's own
installs over ssh, so a drift check or a benchmark on a device runs from exactly the
install a user makes from the bundle: the device's ``python3 -m venv`` and pip, PyPI
wheels, the OS's numpy and Pillow where the target says so (``runtime.system_packages``;
32-bit Raspberry Pi OS has no numpy/Pillow wheels on PyPI), and no compiler.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from importlib import metadata

from edgeship.runtime.bench_report import RuntimeInfo
from edgeship.targets.profile import Target

REQUIREMENTS = "requirements.txt"
VENV = ".venv"
#: A bundle's guard, run by the device's python3 before pip: one line and exit 1 on a Python it was not verified on.
CHECK_SCRIPT = "check_device.py"


def interpreter_pin(target: Target, verified: str | None = None) -> str:
    """The runtime requirement with the exact interpreter version the checks ran with.

    ``verified`` (the version a drift check reported) wins; else the version installed
    here when the target's range allows it (what this machine's checks run with); else
    the target's own ``==`` pin. A range is kept only when none of these is known.
    """
    rt = target.runtime
    version = verified or _host_version(rt.package, rt.versions)
    if version is None and rt.versions.startswith("=="):
        version = rt.versions[2:]
    return f"{rt.package}=={version}" if version else f"{rt.package}{rt.versions}"


def _host_version(package: str, versions: str) -> str | None:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pragma: no cover - packaging comes with pip's build tools
        return None
    return version if version in SpecifierSet(versions) else None


def verified_version(target: Target, runtime: RuntimeInfo) -> str | None:
    """The interpreter version a drift check ran with, when it ran the target's own runtime package."""
    ran = runtime.interpreter.replace("_", "-")
    version = runtime.interpreter_version
    return version if version and ran == target.runtime.package else None


def device_requirements(target: Target, verified: str | None = None) -> list[str]:
    """pip requirements of the device (the target's, with the interpreter pinned by :func:`interpreter_pin`)."""
    reqs = target.pip_requirements()
    if target.runtime.source == "apt":  # the OS's package: apt pins it, pip has no line for it
        return reqs
    return [*reqs[:-1], interpreter_pin(target, verified)]


def requirements_text(requirements: Sequence[str], wheel_names: Sequence[str]) -> str:
    """``requirements.txt``: the requirements, then the bundled wheels as ``./wheels/NAME``."""
    return "".join(f"{line}\n" for line in [*requirements, *(f"./wheels/{w}" for w in wheel_names)])


def uses_system_packages(target: Target) -> bool:
    """numpy and Pillow come from the OS (``--system-site-packages`` venv)."""
    return bool(target.runtime.system_packages)


def apt_command(target: Target) -> str | None:
    """``sudo apt install ...`` the README asks for first, or None."""
    pkgs = target.runtime.system_packages
    return f"sudo apt install {' '.join(pkgs)}" if pkgs else None


def venv_command(target: Target, python: str = "python3") -> str:
    """The README's install line, run in the bundle folder (edgeship runs the same over ssh)."""
    flag = " --system-site-packages" if uses_system_packages(target) else ""
    return f"{shlex.quote(python)} -m venv{flag} {VENV} && {VENV}/bin/pip install -r {REQUIREMENTS}"


def bundle_install_command(target: Target, python: str = "python3") -> str:
    """The bundle README's install line: the Python guard, then :func:`venv_command`."""
    return f"{shlex.quote(python)} {CHECK_SCRIPT} && {venv_command(target, python)}"


def check_script(target: str, verified: dict[str, str]) -> str:
    """``check_device.py``: stdlib only, runs on any Python 3; ``verified`` maps major.minor to the OS release."""
    want = ", ".join(f"{py} ({rel})" for py, rel in verified.items())
    return f'''"""Stop the install on a Python this bundle was not verified for (run before pip, as the README says)."""
import platform
import sys

VERIFIED = {verified!r}
if "%d.%d" % sys.version_info[:2] not in VERIFIED:
    sys.exit(
        "this {target} bundle was verified on Python {want}, this device has Python %s: "
        "deploy again with --host on this device for a bundle verified here" % platform.python_version()
    )
'''


def system_check_script(target: Target) -> str | None:
    """A Python line that fails when the OS packages the target needs are missing (None: none needed)."""
    if not uses_system_packages(target):
        return None
    return "import numpy, PIL.Image"


__all__ = [
    "CHECK_SCRIPT",
    "REQUIREMENTS",
    "VENV",
    "apt_command",
    "bundle_install_command",
    "check_script",
    "device_requirements",
    "interpreter_pin",
    "requirements_text",
    "system_check_script",
    "uses_system_packages",
    "venv_command",
    "verified_version",
]
