"""The checks ``convert`` makes: onnxruntime on the original against the simplified model, and each float
TFLite against onnxruntime on real or generated inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeship import reference
from edgeship._progress import Progress
from edgeship.convert.options import ConvertOptions
from edgeship.convert.report import FloatCheck, SimplifyCheck
from edgeship.errors import ConversionError, VerificationError
from edgeship.reference import OrtRunner
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import ImageSet, list_images
from edgeship.runtime.metrics import compare


def verification_images(options: ConvertOptions) -> ImageSet | None:
    if options.images is None:
        return None
    images = list_images(options.images, minimum=1)
    if options.max_images:
        images = images.sample(options.max_images)
    return images


def check_simplified(
    original: Any,
    simplified: Any,
    inputs: reference.VerifyInputs,
    prep: Preprocessing,
    model_prep: Preprocessing,
    batch: int,
) -> SimplifyCheck:
    """onnxruntime on the original vs the simplified (and folded) model, on a few of the inputs."""
    pixels = inputs.pixels[: max(batch, 8)]
    x = reference.nchw_batches(pixels, prep, batch=len(pixels))[0]
    ref = OrtRunner(original).run(x)
    refuse_non_finite(original, ref)
    got = OrtRunner(simplified).run(reference.nchw_batches(pixels, model_prep, batch=len(pixels))[0])
    fig = compare(ref.reshape(len(x), -1), got.reshape(len(x), -1))
    result = SimplifyCheck(len(x), fig.max_abs_error, fig.mean_cosine, fig.top1_agreement)
    bad = int(np.count_nonzero(~np.isfinite(got)))
    if bad:
        raise ConversionError(
            f"the simplified model gives NaN or infinite scores ({bad} of {got.size}) where the original does not"
        )
    if fig.mean_cosine < 0.99999:
        raise ConversionError(
            f"simplified model differs from the original: mean cosine {fig.mean_cosine:.6f}, "
            f"max-abs {fig.max_abs_error:.3g}"
        )
    return result


def refuse_non_finite(original: Any, scores: np.ndarray) -> None:
    """The source model's own scores are NaN or infinite: say so (and where), not "cosine 0"."""
    bad = int(np.count_nonzero(~np.isfinite(scores)))
    if not bad:
        return
    from onnx import numpy_helper  # heavy optional dependency: deferred

    weights = sum(
        int(np.count_nonzero(~np.isfinite(a)))
        for a in map(numpy_helper.to_array, original.graph.initializer)
        if a.dtype.kind == "f"
    )
    where = f"{weights} of its weight values are NaN or infinite" if weights else "its weights are finite"
    raise ConversionError(
        f"the source model's scores are NaN or infinite ({bad} of {scores.size} on the check "
        f"inputs; {where}); nothing was written"
    )


def verify_one(
    path: Path, expected: Any, inputs: reference.VerifyInputs, prep: Preprocessing, precision: str, progress: Progress
) -> FloatCheck:
    got = reference.run_tflite(path, inputs.pixels, prep, progress=progress, label=f"run {precision} tflite")
    fig = reference.figures(expected, got, inputs)
    tol = reference.TOLERANCES[precision]
    return FloatCheck(fig, tol, inputs.real, tuple(reference.failures(fig, tol, real=inputs.real)))


def raise_on_failures(checks: dict[str, FloatCheck]) -> None:
    problems = [f"{name}: {p}" for name, c in checks.items() for p in c.failures]
    if problems:
        raise VerificationError("converted TFLite does not match onnxruntime: " + "; ".join(problems))
