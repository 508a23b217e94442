"""Which model form a target ships on its device's OS release, and how a host check of it is judged.

Most releases run the TFLite model. A release whose profile entry says ``model_format = "onnx-qdq"``
(rpi-armv7 on Raspberry Pi OS trixie: no TFLite runtime for Python 3.13 on armv7l, the OS's
``python3-onnxruntime`` instead) runs edgeship's int8 ONNX QDQ model. ``deploy`` asks the target's own
ssh device (``--host``) which release it runs, as the drift check will.
"""

from __future__ import annotations

from typing import Any

from edgeship.runtime.metrics import DriftFigures
from edgeship.targets.devices import DeviceSpec, ssh_device
from edgeship.targets.profile import ONNX_QDQ, Access, Release, Target


def device_release(spec: DeviceSpec | None, target: Target) -> Release | None:
    """The OS release of ``target``'s own ssh device (its ``/etc/os-release``, else its Python); None when the
    target has no ssh device (its model runs on this machine) or the device runs no release the profile names."""
    one = spec.for_target(target.name) if spec else None
    if one is None or one.kind != "ssh" or target.access != Access.SSH or not target.releases:
        return None
    facts = ssh_device(one).probe()
    return target.release_for(facts.get("release"), facts.get("python"))


def runs_onnx_qdq(spec: DeviceSpec | None, target: Target) -> bool:
    """Whether ``target``'s device runs the int8 ONNX QDQ model (its release's ``model_format``)."""
    release = device_release(spec, target)
    return release is not None and not release.refuse and release.model_format == ONNX_QDQ


def host_check(figures: DriftFigures, target: Target, model: str) -> dict[str, Any]:
    """The QDQ model's own arithmetic against the float model on this machine (its quantize report's figures),
    judged by ``target``'s budget: what deploy verified before the device ran it."""
    checks = target.budget.check(figures)
    return {
        "model": model,
        "what": "int8 ONNX QDQ model against the float model on this machine (QDQ groups unfused: the model's own "
        "arithmetic)",
        "figures": figures.to_dict(),
        "budget": [c.to_dict() for c in checks],
        "passed": all(c.passed for c in checks),
    }


__all__ = ["ONNX_QDQ", "device_release", "host_check", "runs_onnx_qdq"]
