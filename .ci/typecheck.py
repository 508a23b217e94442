"""Run mypy on the modules [tool.mypy] names, through a symlinked view of the import package.

The repository maps folders (convert/, runtime/, ...) under one import package with setuptools'
package-dir, which an editable install serves through an import hook that mypy cannot follow; the
view puts every module where its import name says.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("convert", "quantize", "runtime", "targets", "verify")


def make_view(dest: Path) -> Path:
    package = dest / "edgeship"
    package.mkdir()
    for path in (ROOT / "edgeship").iterdir():
        if path.suffix in (".py", ".pyi", ".typed"):
            (package / path.name).symlink_to(path)
    for sub in SUBPACKAGES:
        (package / sub).symlink_to(ROOT / sub, target_is_directory=True)
    return dest


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgeship-mypy-") as tmp:
        view = make_view(Path(tmp))
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *sys.argv[1:]]
        return subprocess.run(cmd, cwd=view, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
