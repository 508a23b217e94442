"""Quantize stage: int8 post-training quantization from a folder of calibration images."""

from edgeship.quantize.options import CalibrationMethod as CalibrationMethod
from edgeship.quantize.options import QuantizeOptions as QuantizeOptions
from edgeship.quantize.pipeline import QuantizeResult as QuantizeResult
from edgeship.quantize.pipeline import quantize as quantize

__all__ = ["quantize", "QuantizeOptions", "QuantizeResult", "CalibrationMethod"]
