"""Host-side checks: is the deployed model still the same model?

``edgeship.verify(reference_onnx, candidate, images, target=...)`` calls :func:`verify`
(:mod:`edgeship.verify.drift`): the candidate on its target against onnxruntime, judged by
the target's budget. :mod:`edgeship.reference` runs models on the same pixels (also
used by convert's float check and quantize's measurements).
"""

from edgeship._stage import callable_stage
from edgeship.verify.drift import DriftResult as DriftResult
from edgeship.verify.drift import verify as verify

callable_stage(__name__, verify)

__all__ = ["verify", "DriftResult"]
