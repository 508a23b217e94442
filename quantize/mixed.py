"""Budget-driven mixed precision: keep the cheapest set of ops float that meets an SQNR budget.

XNNPACK runs float islands inside an int8 graph (QUANTIZE/DEQUANTIZE at their edges), so
keeping cheap elementwise and nonlinear ops float (SE gating ``MUL``, ``HARD_SWISH``,
SiLU's ``LOGISTIC``/``MUL``, ``SOFTMAX``, LayerNorm's pieces, residual ``ADD``) costs far
less than keeping convolutions float. The search:

1. groups the float model's ops into candidates (:func:`candidates`), each with an
   estimated latency cost (:func:`op_cost`): connected runs of elementwise ops of the same
   shape (an SE gate, a LayerNorm, a GELU: keeping a whole run float keeps the tensors
   *inside* it float, which is where int8 loses; one op alone still reads and writes int8),
   grouped by kind and part of the graph, and contiguous segments of the graph (whole
   blocks, convolutions included: dearer, chosen when nothing cheaper meets the budget);
2. measures each candidate's SQNR gain alone (the int8 model TensorFlow's quantizer makes
   with those ops denylisted, measured against the float model);
3. adds candidates in order of gain per cost, re-measuring after each and dropping one
   that does not help, or one that would make the model too slow (an optional measured
   speed floor: at most ``min_speedup`` x float32's time), until the budget is met
   (:func:`search`).

The measuring is a callable handed in by the pipeline, so this module needs no
interpreter and the search can be tested with any scorer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from edgeship.errors import EdgeshipError
from edgeship.quantize.op_groups import (  # noqa: F401 - the search's vocabulary, re-exported
    ELEMENT_COST,
    ELEMENTWISE,
    MAC_COST,
    MATRIX,
    NORM_MARKERS,
    SLOW_DEPTHWISE_TAPS,
    VECTOR_ELEMENTS,
    Candidate,
    OpInfo,
    candidates,
    elementwise_runs,
    float_except_matrix,
    graph_segments,
    normalization_groups,
    normalization_nodes,
    op_cost,
    read_ops,
    slow_int8_candidates,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One measurement of the search."""

    phase: str  # "sensitivity" or "greedy"
    candidate: str
    sqnr_db: float
    kept: bool
    #: Set when the candidate helped but the model with it failed the speed floor.
    too_slow: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "candidate": self.candidate,
            "sqnr_db": round(self.sqnr_db, 3),
            "kept": self.kept,
            **({"too_slow": True} if self.too_slow else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Step:
        return cls(str(d["phase"]), str(d["candidate"]), float(d["sqnr_db"]), bool(d["kept"]), bool(d.get("too_slow")))


@dataclass(frozen=True)
class SearchResult:
    """What the budget search chose (``budget_db``: the SQNR it aimed at on its own images)."""

    budget_db: float
    base_db: float
    sqnr_db: float
    kept: tuple[Candidate, ...]
    steps: tuple[Step, ...] = field(default=())
    #: SQNR with every op but the large matrix ops float (:func:`float_except_matrix`), measured when
    #: the search ends under budget: near the most any model with int8 convolutions reaches.
    ceiling_db: float | None = None

    @property
    def within_budget(self) -> bool:
        return self.sqnr_db >= self.budget_db

    @property
    def nodes(self) -> list[str]:
        return [n for c in self.kept for n in c.nodes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_sqnr_db": round(self.budget_db, 3),
            "all_int8_sqnr_db": round(self.base_db, 3),
            "sqnr_db": round(self.sqnr_db, 3),
            "within_budget": self.within_budget,
            "kept_float": [c.to_dict() for c in self.kept],
            "float_ops": len(self.nodes),
            "measurements": len(self.steps),
            "steps": [s.to_dict() for s in self.steps],
            **({"int8_matrix_ceiling_db": round(self.ceiling_db, 3)} if self.ceiling_db is not None else {}),
        }


def sensitivities(
    cands: Sequence[Candidate], measure: Callable[[Sequence[str]], float], base_db: float
) -> tuple[dict[str, float], list[Step]]:
    """SQNR gain (dB) of keeping each candidate float alone."""
    gains, steps = {}, []
    for c in cands:
        db = measure(c.nodes)
        gains[c.name] = db - base_db
        steps.append(Step("sensitivity", c.name, db, False))
    return gains, steps


def order_by_value(cands: Sequence[Candidate], gains: dict[str, float], min_gain_db: float = 0.05) -> list[Candidate]:
    """Candidates that help, best SQNR gain per unit of cost first."""
    useful = [c for c in cands if gains[c.name] > min_gain_db]
    return sorted(useful, key=lambda c: -gains[c.name] / max(c.cost, 1.0))


def search(
    cands: Sequence[Candidate],
    measure: Callable[[Sequence[str]], float],
    budget_db: float,
    base_db: float,
    fast_enough: Callable[[Sequence[str]], bool] | None = None,
    ceiling_nodes: Sequence[str] = (),
) -> SearchResult:
    """Keep the cheapest set of candidates float that meets ``budget_db`` (greedy by gain per cost).

    Args:
        cands: Candidate op groups (see :func:`candidates`).
        measure: SQNR (dB) of the int8 model with the given nodes kept float.
        budget_db: SQNR to reach.
        base_db: SQNR of the all-int8 model (nothing kept float beyond what the pipeline keeps).
        fast_enough: The speed floor: False when the model with the given nodes kept float is
            too slow (asked only of sets that raise the SQNR). None: no floor.
        ceiling_nodes: Measured once when the search ends under budget, as ``ceiling_db``
            (:func:`float_except_matrix`: what int8 convolutions alone cap the SQNR at).

    Returns:
        The kept candidates and the SQNR they reach; ``within_budget`` is False when even
        every useful candidate together stays below the budget (the best set is returned).
    """
    if base_db >= budget_db:
        return SearchResult(budget_db, base_db, base_db, ())
    gains, steps = sensitivities(cands, measure, base_db)
    kept: list[Candidate] = []
    current = base_db
    for c in order_by_value(cands, gains):
        nodes = [n for k in (*kept, c) for n in k.nodes]
        db = measure(nodes)
        slow = db > current and fast_enough is not None and not fast_enough(nodes)
        better = db > current and not slow
        steps.append(Step("greedy", c.name, db, better, too_slow=slow))
        if better:
            kept, current = [*kept, c], db
        if current >= budget_db:
            break
    ceiling = _measured_or_none(measure, ceiling_nodes) if current < budget_db and ceiling_nodes else None
    return SearchResult(budget_db, base_db, current, tuple(kept), tuple(steps), ceiling)


def _measured_or_none(measure: Callable[[Sequence[str]], float], nodes: Sequence[str]) -> float | None:
    """``measure(nodes)``, None when that model cannot be made or run: the ceiling only explains a shortfall,
    it must not cost the user the best model found."""
    try:
        return measure(nodes)
    except EdgeshipError as exc:
        log.warning("could not measure the int8 ceiling (every op but the large matrix ops float): %s", exc)
        return None


#: The search aims this far above the budget (plus the gap it sees between its images and
#: held-apart ones): it measures on calibration images, the verdict is on held-apart ones.
MARGIN_DB = 0.5


def budgeted(
    calibrated: bytes,
    measure: Callable[[Sequence[str]], float],
    budget_db: float,
    held_apart_db: float | None = None,
    parts: int = 2,
    fast_enough: Callable[[Sequence[str]], bool] | None = None,
) -> SearchResult:
    """Run the budget search on a calibrated float model (``measure``, ``fast_enough`` as for :func:`search`).

    ``held_apart_db``: the all-int8 model's SQNR on the evaluation images; when the search
    images flatter the model by more (their ranges were calibrated on them), the search
    aims higher by that gap.
    """
    base = measure(())
    gap = max(0.0, base - held_apart_db) if held_apart_db is not None else 0.0
    ops = read_ops(calibrated)
    return search(
        candidates(ops, parts),
        measure,
        budget_db + MARGIN_DB + gap,
        base,
        fast_enough,
        ceiling_nodes=float_except_matrix(ops),
    )
