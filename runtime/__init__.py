"""On-device runtime: numpy, Pillow and one TFLite interpreter, nothing else.

``import edgeship.runtime`` works on a Raspberry Pi without TensorFlow or ONNX.
"""

from edgeship.runtime.card import ModelCard as ModelCard
from edgeship.runtime.card import Preprocessing as Preprocessing
from edgeship.runtime.classifier import Classifier as Classifier
from edgeship.runtime.classifier import Prediction as Prediction
from edgeship.runtime.interpreter import TFLiteModel as TFLiteModel

__all__ = ["Classifier", "ModelCard", "Preprocessing", "Prediction", "TFLiteModel"]
