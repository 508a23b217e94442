"""onnxsim simplification."""

from __future__ import annotations

import logging
from typing import Any

from edgeship._deps import require
from edgeship.errors import ConversionError

log = logging.getLogger(__name__)


def simplify(model: Any) -> Any:
    """Simplify with onnxsim (constant folding, shape inference, dead-node removal).

    Raises:
        ConversionError: onnxsim failed or could not prove the result equivalent.
    """
    onnxsim = require("onnxsim", purpose="simplify ONNX models")
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        raise ConversionError(f"onnxsim failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if not ok:
        raise ConversionError("onnxsim could not validate the simplified model against the original")
    return simplified
