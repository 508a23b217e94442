"""Locate the shared development assets (real models and images) for tests and benchmarks.

Resolution order: ``$EDGE_ASSETS``, then ``../shared`` beside the repository checkout
(found from the current directory or from this file). A user's machine usually has
neither; callers skip with a clear reason then.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_assets() -> Path | None:
    """The shared assets folder, or None when it is not on this machine."""
    env = os.environ.get("EDGE_ASSETS")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file():
                candidate = folder.parent / "shared"
                if (candidate / "models").is_dir():
                    return candidate
                break
    return None
