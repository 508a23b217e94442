"""edgeship: ONNX image classifier -> fast, small, verified int8 TFLite for phones and Pis.

Stages are subpackages: :mod:`edgeship.convert`, :mod:`edgeship.quantize`,
:mod:`edgeship.runtime` (the only part a device needs) and :mod:`edgeship.targets`.
The public entry points are re-exported lazily here so that importing the runtime on a
device never pulls in the host tool chain.
"""

from __future__ import annotations

from typing import Any

from edgeship._version import __version__ as __version__
from edgeship.errors import AccuracyDriftError as AccuracyDriftError
from edgeship.errors import CalibrationError as CalibrationError
from edgeship.errors import ConversionError as ConversionError
from edgeship.errors import DeviceError as DeviceError
from edgeship.errors import EdgeshipError as EdgeshipError
from edgeship.errors import InputError as InputError
from edgeship.errors import MissingDependencyError as MissingDependencyError
from edgeship.errors import ModelTargetMismatchError as ModelTargetMismatchError
from edgeship.errors import NativeCrashError as NativeCrashError
from edgeship.errors import OutputExistsError as OutputExistsError
from edgeship.errors import TargetError as TargetError
from edgeship.errors import VerificationError as VerificationError

_LAZY = {
    "convert": ("edgeship.convert", "convert"),
    "ConvertOptions": ("edgeship.convert", "ConvertOptions"),
    "ConvertResult": ("edgeship.convert", "ConvertResult"),
    "ModelCard": ("edgeship.runtime.card", "ModelCard"),
    "Preprocessing": ("edgeship.runtime.card", "Preprocessing"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgeship' has no attribute {name!r}")


__all__ = [
    "__version__",
    "AccuracyDriftError",
    "CalibrationError",
    "ConversionError",
    "DeviceError",
    "EdgeshipError",
    "InputError",
    "MissingDependencyError",
    "ModelTargetMismatchError",
    "NativeCrashError",
    "OutputExistsError",
    "TargetError",
    "VerificationError",
    *_LAZY,
]
