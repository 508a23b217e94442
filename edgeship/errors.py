"""The one error hierarchy of edgeship.

Library code raises these; only the CLI turns them into exit codes
(see :data:`EXIT_CODES`). Messages say what failed, the values involved and the
next step, on one line.
"""

from __future__ import annotations


class EdgeshipError(Exception):
    """Base class of every error edgeship raises on purpose."""

    exit_code: int = 1

    def cli_message(self) -> str:
        """The message as the ``edgeship`` command shows it (options spelled as flags)."""
        return str(self)


class InputError(EdgeshipError):
    """Bad user input: a missing or unreadable file, a wrong model, an odd folder."""


class ArgumentTypeError(InputError, TypeError):
    """A Python API argument of the wrong type (also a :class:`TypeError`): the message names the type wanted."""


class OutputExistsError(InputError):
    """An output would overwrite something that exists and ``force`` was not given.

    Messages write ``{force}`` where the way to overwrite goes: ``force=True`` from
    Python, ``--force`` from the command line (:meth:`cli_message`).
    """

    FORCE = "{force}"

    def __str__(self) -> str:
        return super().__str__().replace(self.FORCE, "force=True")

    def cli_message(self) -> str:
        return super().__str__().replace(self.FORCE, "--force")


class MissingDependencyError(EdgeshipError):
    """An optional package needed for this step is not installed."""


class ConversionError(EdgeshipError):
    """ONNX checking, simplification or onnx2tf conversion failed."""


class VerificationError(EdgeshipError):
    """A converted model does not match its reference within tolerance."""


class CalibrationError(EdgeshipError):
    """Calibration data is unusable or quantization failed."""


class AccuracyDriftError(EdgeshipError):
    """A deployed model drifted from its float reference beyond the target's budget."""

    exit_code = 3

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class TargetError(EdgeshipError):
    """An unknown or invalid target profile."""


class ModelTargetMismatchError(TargetError):
    """The model is not what the target runs (precision or I/O dtype): found before running anything."""

    exit_code = 4


class DelegateNotAppliedError(EdgeshipError):
    """The device ran the model without the target's delegate (XNNPACK asked, 0 partitions applied).

    Drift figures from such a run say nothing about the deployment, so none are given.
    """

    exit_code = 5


class NativeCrashError(EdgeshipError):
    """Native code (TensorFlow's converter or quantizer, an interpreter) died in the child process that ran it."""


class DeviceError(EdgeshipError):
    """A remote device (ssh, adb) or emulator could not be reached or used."""


class DeviceTimeoutError(DeviceError):
    """A device job did not finish within its time: the device is taken as hung (the message names the job)."""


#: Exit codes of the ``edgeship`` command.
EXIT_CODES = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "accuracy_drift": 3,
    "model_target_mismatch": 4,
    "delegate_not_applied": 5,
}

__all__ = [
    "EdgeshipError",
    "InputError",
    "OutputExistsError",
    "MissingDependencyError",
    "ConversionError",
    "VerificationError",
    "CalibrationError",
    "AccuracyDriftError",
    "TargetError",
    "ModelTargetMismatchError",
    "DeviceError",
    "DeviceTimeoutError",
    "DelegateNotAppliedError",
    "NativeCrashError",
    "EXIT_CODES",
]
