"""Confidence intervals of drift figures and verdicts that know their noise (issue 33, point 3)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.runtime.intervals import independent_difference, paired_difference, wilson
from edgeship.runtime.metrics import DriftFigures, compare
from edgeship.targets import load_target
from edgeship.targets.profile import BudgetCheck


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (392, 400), (400, 400), (2315, 2500)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_paired_interval_covers_the_true_drop_and_beats_the_unpaired_one() -> None:
    """Two highly correlated classifiers (as a float model and its int8 copy are): the paired interval of the
    drop covers the true drop about 95 % of the time and is much narrower than one that ignores the pairing."""
    rng = np.random.default_rng(0)
    n, p_ref, p_flip, runs = 400, 0.86, 0.03, 2000
    true_drop = p_ref * p_flip - (1 - p_ref) * p_flip  # right->wrong minus wrong->right
    covered, widths, widths_indep = 0, [], []
    for _ in range(runs):
        ref = rng.random(n) < p_ref
        flip = rng.random(n) < p_flip
        cand = ref ^ flip
        a, b, c = int(np.sum(ref & cand)), int(np.sum(ref & ~cand)), int(np.sum(~ref & cand))
        lo, hi = paired_difference(a, b, c, n - a - b - c)
        covered += lo <= true_drop <= hi
        widths.append(hi - lo)
        li, hi_i = independent_difference(int(ref.sum()), int(cand.sum()), n)
        widths_indep.append(hi_i - li)
    assert 0.93 <= covered / runs <= 0.99
    assert np.mean(widths) < 0.5 * np.mean(widths_indep)


def test_compare_keeps_the_paired_counts_and_reports_intervals() -> None:
    ref = np.eye(5)[[0, 1, 2, 3, 4, 0, 1, 2]]
    cand = np.eye(5)[[0, 1, 2, 3, 0, 0, 1, 3]]
    labels = [0, 1, 2, 3, 4, 0, 1, None]
    fig = compare(ref, cand, labels)
    assert (fig.labelled, fig.both_right, fig.ref_only_right, fig.cand_only_right) == (7, 6, 1, 0)
    lo, hi = fig.agreement_interval
    assert lo < 75.0 < hi and fig.to_dict()["intervals"]["top1_agreement_pct"] == [lo, hi]
    drop_lo, drop_hi = fig.top1_drop_interval or (0.0, 0.0)
    assert drop_lo < fig.top1_drop < drop_hi  # type: ignore[operator]
    assert DriftFigures.from_dict(fig.to_dict()) == fig


def test_a_verdict_within_noise_of_its_budget_says_so() -> None:
    budget = load_target("x86-host").budget  # >= 97.5 % agreement, <= 1.0 pt drop
    near = DriftFigures(400, 0.98, 0.99, 0.98, 1.0, 25.0)  # 392/400: Wilson [96.1, 98.9] holds 97.5
    line = {c.metric: c for c in budget.check(near)}["top1_agreement_pct"]
    assert line.passed and line.within_noise and line.interval is not None
    clear = DriftFigures(4000, 0.995, 0.99, 0.98, 1.0, 25.0)
    line = {c.metric: c for c in budget.check(clear)}["top1_agreement_pct"]
    assert line.passed and not line.within_noise
    back = BudgetCheck.from_dict(line.to_dict())
    assert back == line and line.to_dict()["within_noise"] is False
