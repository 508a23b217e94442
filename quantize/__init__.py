"""Quantize stage: int8 post-training quantization, as a :class:`QuantizeResult`.

``edgeship.quantize(conversion, calibration, options=...)`` calls :func:`quantize`.
"""

from edgeship._stage import callable_stage
from edgeship.quantize.options import CalibrationMethod as CalibrationMethod
from edgeship.quantize.options import QuantizeOptions as QuantizeOptions
from edgeship.quantize.pipeline import QuantizeResult as QuantizeResult
from edgeship.quantize.pipeline import quantize as quantize

callable_stage(__name__, quantize)

__all__ = ["quantize", "QuantizeOptions", "QuantizeResult", "CalibrationMethod"]
