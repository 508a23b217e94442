"""Convert stage: ONNX image classifier -> verified float TFLite.

Heavy packages (onnx, onnxsim, onnxruntime, onnx2tf, TensorFlow) are imported only
inside the functions that need them.
"""

from edgeship.convert.pipeline import ConvertOptions as ConvertOptions
from edgeship.convert.pipeline import ConvertResult as ConvertResult
from edgeship.convert.pipeline import convert as convert

__all__ = ["convert", "ConvertOptions", "ConvertResult"]
