"""The device side of a drift check: the deployed model's outputs on images.

Also ``python -m edgeship.runtime.collect``; the host side (reference, comparison,
budget) is :mod:`edgeship.verify`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from edgeship.runtime.classifier import Classifier


def candidate_outputs(
    model: str | os.PathLike[str],
    files: Sequence[str | os.PathLike[str]],
    *,
    num_threads: int | None = None,
    use_xnnpack: bool = True,
    progress: Callable[[str, int | None, int | None], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Dequantized outputs of the deployed model on each image, and how it ran."""
    clf = Classifier.load(model, num_threads=num_threads, use_xnnpack=use_xnnpack)
    # Decoded on one thread per core while the interpreter runs; the same image path as predict().
    step = (lambda stage, done, total: progress("run candidate", done, total)) if progress else None
    return clf.logits_many(files, progress=step), clf.describe()
