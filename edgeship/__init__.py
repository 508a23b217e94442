"""edgeship: ONNX image classifier -> fast, small, verified int8 TFLite for phones and Pis.

Stages are subpackages you can call, each passing a typed value to the next::

    conv = edgeship.convert("model.onnx", options=edgeship.ConvertOptions())   # ConvertResult
    q = edgeship.quantize(conv, "calib/", options=edgeship.QuantizeOptions())   # QuantizeResult
    d = edgeship.verify("model.onnx", q, "images/", target="x86-host")          # DriftResult

:mod:`edgeship.runtime` is the only part a device needs; :mod:`edgeship.targets` holds the
target profiles and devices. Everything here is imported lazily, so importing the runtime
on a device never pulls in the host tool chain.
"""

from __future__ import annotations

import importlib
from typing import Any

from edgeship._version import __version__ as __version__
from edgeship.errors import AccuracyDriftError as AccuracyDriftError
from edgeship.errors import CalibrationError as CalibrationError
from edgeship.errors import ConversionError as ConversionError
from edgeship.errors import DelegateNotAppliedError as DelegateNotAppliedError
from edgeship.errors import DeviceError as DeviceError
from edgeship.errors import DeviceTimeoutError as DeviceTimeoutError
from edgeship.errors import EdgeshipError as EdgeshipError
from edgeship.errors import InputError as InputError
from edgeship.errors import MissingDependencyError as MissingDependencyError
from edgeship.errors import ModelTargetMismatchError as ModelTargetMismatchError
from edgeship.errors import NativeCrashError as NativeCrashError
from edgeship.errors import OutputExistsError as OutputExistsError
from edgeship.errors import TargetError as TargetError
from edgeship.errors import VerificationError as VerificationError

#: The callable stage packages (``edgeship.convert(...)`` calls ``edgeship.convert.convert``).
_STAGES = ("convert", "quantize", "verify")
_LAZY = {
    "ConvertOptions": ("edgeship.convert", "ConvertOptions"),
    "ConvertResult": ("edgeship.convert", "ConvertResult"),
    "ConvertReport": ("edgeship.convert.report", "ConvertReport"),
    "QuantizeOptions": ("edgeship.quantize", "QuantizeOptions"),
    "QuantizeResult": ("edgeship.quantize", "QuantizeResult"),
    "QuantizeReport": ("edgeship.quantize.report", "QuantizeReport"),
    "DriftResult": ("edgeship.verify", "DriftResult"),
    "DriftReport": ("edgeship.verify.report", "DriftReport"),
    "DeviceSpec": ("edgeship.targets.devices", "DeviceSpec"),
    "load_target": ("edgeship.targets", "load_target"),
    "ModelCard": ("edgeship.runtime.card", "ModelCard"),
    "Preprocessing": ("edgeship.runtime.card", "Preprocessing"),
}


def __getattr__(name: str) -> Any:
    if name in _STAGES:
        return importlib.import_module(f"edgeship.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgeship' has no attribute {name!r}")


__all__ = [
    "__version__",
    "AccuracyDriftError",
    "CalibrationError",
    "ConversionError",
    "DelegateNotAppliedError",
    "DeviceError",
    "DeviceTimeoutError",
    "EdgeshipError",
    "InputError",
    "MissingDependencyError",
    "ModelTargetMismatchError",
    "NativeCrashError",
    "OutputExistsError",
    "TargetError",
    "VerificationError",
    *_STAGES,
    *_LAZY,
]
