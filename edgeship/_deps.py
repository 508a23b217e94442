"""One place that imports heavy optional packages and explains how to get them."""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType

from edgeship.errors import MissingDependencyError

#: Which pip extra provides which import name.
_EXTRA_OF = {
    "onnx": "host",
    "onnxruntime": "host",
    "onnxsim": "host",
    "onnx2tf": "host",
    "tensorflow": "host",
    "matplotlib": "host",
    "psutil": "host",
    "ray": "cluster",
}


def require(module: str, *, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra.

    Args:
        module: Import name, e.g. ``"onnxruntime"``.
        purpose: Short description of what needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA_OF.get(module.split(".")[0], "host")
        why = f" (needed to {purpose})" if purpose else ""
        raise MissingDependencyError(
            f"{module} is not installed{why}: pip install 'edgeship[{extra}]' ({exc})"
        ) from exc


def versions(*dists: str) -> dict[str, str | None]:
    """Installed versions of the given distributions (None when absent)."""
    found: dict[str, str | None] = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


HOST_TOOLS = (
    "edgeship",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxsim",
    "onnx2tf",
    "tensorflow",
    "ai-edge-litert",
    "tflite-runtime",
    "Pillow",
)
