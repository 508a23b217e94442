"""Convert stage: ONNX image classifier -> verified float TFLite, as a :class:`ConvertResult`.

``edgeship.convert(path, options=...)`` calls :func:`convert`. Heavy packages (onnx,
onnxsim, onnxruntime, onnx2tf, TensorFlow) are imported only inside the functions that
need them.
"""

from edgeship._stage import callable_stage
from edgeship.convert.converter import ConvertOptions as ConvertOptions
from edgeship.convert.converter import convert as convert
from edgeship.convert.result import ConvertResult as ConvertResult

callable_stage(__name__, convert)

__all__ = ["convert", "ConvertOptions", "ConvertResult"]
