"""Histograms of a calibrated model's activations: collected over images, merged over folds of them.

Every histogrammed tensor of the calibrated float model is read with all intermediate tensors
preserved; the bins span the range TensorFlow's calibrator recorded, so histograms of disjoint
sets of images merge into exactly the histograms of one pass over all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeship.runtime.interpreter import debug_interpreter

BINS = 2048


@dataclass
class Histogram:
    """Counts of one tensor's values over fixed bins spanning ``[lo, hi]``.

    ``seen_min``/``seen_max`` are the true extremes observed (the bins may span a wider
    range: TensorFlow's calibrator records in-place ADD ranges on the producer too).
    """

    lo: float
    hi: float
    counts: np.ndarray
    seen_min: float = float("inf")
    seen_max: float = float("-inf")
    #: Builtin op names of the ops that read this tensor (for the consumer-aware ``auto`` method).
    consumers: tuple[str, ...] = ()

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2


def collect_histograms(
    model: bytes,
    tensors: dict[int, tuple[str, float, float]],
    samples: Iterable[np.ndarray],
    progress: Callable[[int], None] | None = None,
) -> dict[int, Histogram]:
    """Histogram every listed tensor over the samples (float model, all tensors kept)."""

    interp = debug_interpreter(model)
    inp = interp.get_input_details()[0]["index"]
    readers: dict[int, list[str]] = {}
    for op in interp._get_ops_details():  # noqa: SLF001 - the interpreter's only view of the graph
        for t in op["inputs"]:
            readers.setdefault(int(t), []).append(op["op_name"])
    hists = {
        i: Histogram(lo, hi, np.zeros(BINS, np.int64), consumers=tuple(readers.get(i, ())))
        for i, (_, lo, hi) in tensors.items()
        if hi > lo
    }
    for k, x in enumerate(samples):
        interp.set_tensor(inp, x.astype(np.float32))
        interp.invoke()
        for i, h in hists.items():
            values = interp.get_tensor(i).ravel()
            h.seen_min = min(h.seen_min, float(values.min()))
            h.seen_max = max(h.seen_max, float(values.max()))
            h.counts += np.bincount(_bin_index(values, h.lo, h.hi), minlength=BINS)
        if progress:
            progress(k + 1)
    return hists


def _bin_index(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Each value's bin over ``[lo, hi]``, values outside counted in the end bins (NaN in the first).

    Clipped in float, in place, before the integer conversion: the same bins as truncating first
    and clipping after, in fewer passes over the tensor.
    """
    x = values - np.float32(lo) if values.dtype == np.float32 else (values - lo).astype(np.float32)
    x *= np.float32(BINS / (hi - lo))
    np.fmax(x, 0, out=x)  # NaN becomes 0 here, as truncating it did
    np.fmin(x, BINS - 1, out=x)
    return x.astype(np.intp)


def merge_histograms(parts: Sequence[dict[int, Histogram]]) -> dict[int, Histogram]:
    """One histogram per tensor from histograms of the same tensors over the same bins."""
    merged: dict[int, Histogram] = {}
    for part in parts:
        for i, h in part.items():
            m = merged.get(i)
            if m is None:
                merged[i] = Histogram(h.lo, h.hi, h.counts.copy(), h.seen_min, h.seen_max, h.consumers)
                continue
            if (m.lo, m.hi, len(m.counts)) != (h.lo, h.hi, len(h.counts)):
                raise ValueError(f"tensor {i}: histograms over different bins cannot be merged")
            m.counts += h.counts
            m.seen_min, m.seen_max = min(m.seen_min, h.seen_min), max(m.seen_max, h.seen_max)
    return merged
