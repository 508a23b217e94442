"""Drift metrics between a reference's outputs and a candidate's (numpy only).

Each metric is registered by name so reports, budgets and checks share one table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeship.runtime.intervals import CONFIDENCE, independent_difference, paired_difference, percent, wilson

MetricFn = Callable[[np.ndarray, np.ndarray], float]
METRICS: dict[str, MetricFn] = {}


def metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register a reference-vs-candidate metric under ``name``."""

    def wrap(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return wrap


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def cosine_per_sample(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    r, c = _rows(ref), _rows(cand)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    dot = np.sum(r * c, axis=1)
    return np.where(denom > 0, dot / np.maximum(denom, 1e-300), np.where(np.all(r == c, axis=1), 1.0, 0.0))


@metric("top1_agreement")
def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the same."""
    return float(np.mean(np.argmax(_rows(ref), 1) == np.argmax(_rows(cand), 1)))


@metric("mean_cosine")
def mean_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.mean(cosine_per_sample(ref, cand)))


@metric("min_cosine")
def min_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.min(cosine_per_sample(ref, cand)))


@metric("max_abs_error")
def max_abs_error(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.max(np.abs(_rows(ref) - _rows(cand))))


@metric("sqnr_db")
def sqnr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    r = _rows(ref)
    noise = np.sum((r - _rows(cand)) ** 2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(np.sum(r**2) / noise))


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, best first."""
    rows = _rows(logits)
    k = min(k, rows.shape[1])
    idx = np.argpartition(-rows, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(rows, idx, 1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1)


def accuracy(logits: np.ndarray, labels: Sequence[int | None], k: int = 1) -> float | None:
    """Top-k accuracy over samples with a known label (None when none is known)."""
    known = [i for i, y in enumerate(labels) if y is not None]
    if not known:
        return None
    top = topk(np.asarray(logits)[known], k)
    return float(np.mean([labels[i] in top[j] for j, i in enumerate(known)]))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class DriftFigures:
    """Reference-vs-candidate figures over one image set."""

    count: int
    top1_agreement: float
    mean_cosine: float
    min_cosine: float
    max_abs_error: float
    sqnr_db: float
    ref_top1: float | None = None
    ref_top5: float | None = None
    cand_top1: float | None = None
    cand_top5: float | None = None
    disagreements: tuple[int, ...] = ()
    #: Labelled images, and on how many of them both / only the reference / only the candidate are right
    #: (None in reports written before they were kept: the intervals then take the pairing as unknown).
    labelled: int | None = None
    both_right: int | None = None
    ref_only_right: int | None = None
    cand_only_right: int | None = None

    @property
    def top1_drop(self) -> float | None:
        """Top-1 accuracy points lost (positive = worse), when labels are known."""
        if self.ref_top1 is None or self.cand_top1 is None:
            return None
        # Rounded: 100 * (0.87 - 0.86) is 1.0000000000000009, which would fail a 1.0 pt budget.
        return round(100.0 * (self.ref_top1 - self.cand_top1), 9)

    @property
    def agreement_pct(self) -> float:
        """Top-1 agreement in percent, rounded so that budgets compare exactly (99/100 is 99.0)."""
        return round(100.0 * self.top1_agreement, 9)

    @property
    def agreement_drop(self) -> float:
        """Points of top-1 agreement lost against the reference (100 - agreement %)."""
        return round(100.0 - self.agreement_pct, 9)

    @property
    def agreement_interval(self) -> tuple[float, float]:
        """95 % Wilson interval of the top-1 agreement, in percent."""
        return percent(wilson(round(self.top1_agreement * self.count), self.count))

    def _top1_interval(self, top1: float | None) -> tuple[float, float] | None:
        n = self.labelled if self.labelled is not None else self.count
        return None if top1 is None else percent(wilson(round(top1 * n), n))

    @property
    def ref_top1_interval(self) -> tuple[float, float] | None:
        """95 % Wilson interval of the reference's top-1 (percent), when labels are known."""
        return self._top1_interval(self.ref_top1)

    @property
    def cand_top1_interval(self) -> tuple[float, float] | None:
        """95 % Wilson interval of the candidate's top-1 (percent), when labels are known."""
        return self._top1_interval(self.cand_top1)

    @property
    def top1_drop_interval(self) -> tuple[float, float] | None:
        """95 % interval of the top-1 drop in points: Newcombe's paired interval (same images, both models)."""
        if self.ref_top1 is None or self.cand_top1 is None:
            return None
        pairs = (self.both_right, self.ref_only_right, self.cand_only_right)
        if self.labelled is None or any(k is None for k in pairs):
            n = self.count
            return percent(independent_difference(round(self.ref_top1 * n), round(self.cand_top1 * n), n))
        a, b, c = (int(k or 0) for k in pairs)
        return percent(paired_difference(a, b, c, self.labelled - a - b - c))

    def intervals(self) -> dict[str, object]:
        """Every interval, for reports: confidence, method and [low, high] per figure (None: no labels)."""
        pair = {"top1_agreement_pct": self.agreement_interval, "ref_top1_pct": self.ref_top1_interval}
        pair |= {"cand_top1_pct": self.cand_top1_interval, "top1_drop_points": self.top1_drop_interval}
        return {
            "confidence": CONFIDENCE,
            "method": "Wilson score (proportions), Newcombe paired (drop)",
            **{k: list(v) if v is not None else None for k, v in pair.items()},
        }

    def to_dict(self) -> dict[str, object]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["disagreements"] = list(self.disagreements)
        d["top1_drop_points"] = self.top1_drop
        d["intervals"] = self.intervals()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftFigures:
        """The inverse of :meth:`to_dict` (derived entries such as ``top1_drop_points`` are recomputed)."""
        figs = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        figs["disagreements"] = tuple(figs.get("disagreements", ()))
        return cls(**figs)


def compare(ref: np.ndarray, cand: np.ndarray, labels: Sequence[int | None] | None = None) -> DriftFigures:
    """All drift figures for reference and candidate outputs of the same inputs."""
    ref, cand = _rows(ref), _rows(cand)
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, candidate {cand.shape}")
    labels = list(labels) if labels is not None else [None] * len(ref)
    differs = np.nonzero(np.argmax(ref, 1) != np.argmax(cand, 1))[0]
    labelled, both, ref_only, cand_only = _right_counts(ref, cand, labels)
    return DriftFigures(
        count=len(ref),
        top1_agreement=top1_agreement(ref, cand),
        mean_cosine=mean_cosine(ref, cand),
        min_cosine=min_cosine(ref, cand),
        max_abs_error=max_abs_error(ref, cand),
        sqnr_db=sqnr_db(ref, cand),
        ref_top1=accuracy(ref, labels, 1),
        ref_top5=accuracy(ref, labels, 5),
        cand_top1=accuracy(cand, labels, 1),
        cand_top5=accuracy(cand, labels, 5),
        disagreements=tuple(int(i) for i in differs),
        labelled=labelled,
        both_right=both,
        ref_only_right=ref_only,
        cand_only_right=cand_only,
    )


def _right_counts(
    ref: np.ndarray, cand: np.ndarray, labels: Sequence[int | None]
) -> tuple[int | None, int | None, int | None, int | None]:
    """Labelled images, and on how many both models / only the reference / only the candidate are right."""
    known = [i for i, y in enumerate(labels) if y is not None]
    if not known:
        return None, None, None, None
    truth = np.array([labels[i] for i in known])
    r, c = np.argmax(ref[known], 1) == truth, np.argmax(cand[known], 1) == truth
    return len(known), int(np.sum(r & c)), int(np.sum(r & ~c)), int(np.sum(~r & c))
