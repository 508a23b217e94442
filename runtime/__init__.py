"""On-device runtime: numpy, Pillow and one TFLite interpreter, nothing else.

``import edgeship.runtime`` works on a Raspberry Pi without TensorFlow or ONNX.
"""

from edgeship.runtime.card import ModelCard as ModelCard
from edgeship.runtime.card import Preprocessing as Preprocessing
from edgeship.runtime.interpreter import TFLiteModel as TFLiteModel

__all__ = ["ModelCard", "Preprocessing", "TFLiteModel"]
