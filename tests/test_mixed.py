"""Range choice by measured error and the budget-driven mixed-precision search (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeship.cli import main
from edgeship.quantize import mixed
from edgeship.quantize.options import CalibrationMethod
from edgeship.quantize.ranges import (
    CONSUMER_FNS,
    CROSS_FIT_CANDIDATES,
    Histogram,
    candidate_ranges,
    consumer_errors,
    entropy,
    least_consumer_error,
    minmax,
    mse,
    percentile,
)
from tests.test_ranges import _folds, _rounding_model  # the fake fold model, one copy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _hist(values: np.ndarray, consumers: tuple[str, ...] = ()) -> Histogram:
    counts, edges = np.histogram(values, bins=2048)
    return Histogram(float(edges[0]), float(edges[-1]), counts, float(values.min()), float(values.max()), consumers)


# ----------------------------------------------------------------------------- range choice
@pytest.mark.parametrize("consumer", [(), ("LOGISTIC",), ("HARD_SWISH",), ("TANH",)])
def test_auto_range_has_the_least_error_at_the_consumer(consumer: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    hist = _hist(np.concatenate([rng.normal(0, 3, 200_000), [30.0, -25.0]]), consumer)
    chosen = np.array([least_consumer_error(hist, 99.999)])
    err = consumer_errors(hist, chosen)[0]
    for name, fixed in {
        "minmax": minmax(hist, 0),
        "mse": mse(hist, 0),
        "p99.999": percentile(hist, 99.999),
        "p99.9": percentile(hist, 99.9),
    }.items():
        assert err <= consumer_errors(hist, np.array([fixed]))[0] + 1e-9, name


def test_saturating_consumers_get_clipped_where_the_function_is_flat() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 4, 200_000)
    lo_lin, hi_lin = least_consumer_error(_hist(values), 99.999)
    lo_sig, hi_sig = least_consumer_error(_hist(values, ("LOGISTIC",)), 99.999)
    lo_hs, hi_hs = least_consumer_error(_hist(values, ("HARD_SWISH",)), 99.999)
    assert hi_sig < 0.75 * hi_lin and lo_sig > 0.75 * lo_lin  # the sigmoid is flat past |x| ~ 6
    assert -4.5 < lo_hs < -2.5  # HardSwish is 0 below -3: no need to represent -15
    assert hi_hs > 0.9 * hi_lin  # ...but linear above +3


def test_consumer_error_of_the_identity_is_the_quantization_mse() -> None:
    rng = np.random.default_rng(2)
    values = rng.uniform(-1, 1, 100_000)
    hist = _hist(values)
    lo, hi = -0.5, 0.5
    step = (hi - lo) / 255
    q = np.clip(np.round((np.clip(values, lo, hi) - lo) / step) * step + lo, lo, hi)
    measured = float(np.sum((values - q) ** 2))
    assert consumer_errors(hist, np.array([[lo, hi]]))[0] == pytest.approx(measured, rel=0.05)


def test_candidates_include_the_fixed_methods() -> None:
    rng = np.random.default_rng(3)
    hist = _hist(rng.laplace(0, 1, 50_000))
    rows = {tuple(np.round(r, 6)) for r in candidate_ranges(hist, 99.999)}
    for fixed in (minmax(hist, 0), mse(hist, 0), percentile(hist, 99.99)):
        assert tuple(np.round(fixed, 6)) in rows
    assert set(CONSUMER_FNS) >= {"LOGISTIC", "HARD_SWISH", "GELU"}


def test_entropy_penalises_clipping() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(0, 1, 200_000)
    lo, hi = entropy(_hist(values), 0)
    assert 2.5 < hi <= values.max() and values.min() <= lo < -2.5  # clips the sparse tails, never the body


# ----------------------------------------------------------------------------- budget search
def _ops() -> list[mixed.OpInfo]:
    """conv -> hard_swish -> SE gate (mean -> fc -> logistic -> mul) -> conv -> add (+ first conv) -> fc."""
    o = mixed.OpInfo
    return [
        o("CONV_2D", "c1", 50_000, 5_000_000, (0,), (1,)),
        o("HARD_SWISH", "hs", 50_000, 0, (1,), (2,)),
        o("MEAN", "m", 16, 0, (2,), (3,)),
        o("FULLY_CONNECTED", "fc1", 16, 256, (3,), (4,)),
        o("LOGISTIC", "g", 16, 0, (4,), (5,)),
        o("MUL", "gate", 50_000, 0, (2, 5), (6,)),
        o("CONV_2D", "c2", 50_000, 800_000, (6,), (7,)),
        o("ADD", "res", 50_000, 0, (7, 1), (8,)),
        o("FULLY_CONNECTED", "logits", 10, 10_000, (8,), (9,)),
    ]


def test_candidates_are_connected_runs_and_segments() -> None:
    cands = mixed.candidates(_ops(), parts=1, segments=3)
    names = [c.name for c in cands]
    se = next(c for c in cands if "LOGISTIC" in c.name)
    assert set(se.nodes) == {"hs", "m", "fc1", "g", "gate"}  # the SE gate is one run, its FC included
    assert any(set(c.nodes) == {"res", "logits"} for c in cands)  # the residual ADD feeds the classifier
    assert [c for c in names if c.startswith("ops ")] == ["ops 0-2", "ops 3-5", "ops 6-8"]
    assert all(c.cost > 0 for c in cands)


def _additive(gains: dict[str, float], base: float):
    """A fake measurement: SQNR = base + sum of the gains of the nodes kept float."""
    calls: list[tuple[str, ...]] = []

    def measure(nodes):
        calls.append(tuple(nodes))
        return base + sum(gains.get(n, 0.0) for n in nodes)

    return measure, calls


def test_search_keeps_the_cheapest_set_that_meets_the_budget() -> None:
    cands = [
        mixed.Candidate("cheap_small", ("a",), 1.0),
        mixed.Candidate("dear_big", ("b",), 100.0),
        mixed.Candidate("cheap_big", ("c",), 2.0),
        mixed.Candidate("harmful", ("d",), 0.5),
    ]
    measure, calls = _additive({"a": 1.0, "b": 6.0, "c": 3.0, "d": -2.0}, base=15.0)
    found = mixed.search(cands, measure, budget_db=18.5, base_db=15.0)
    assert [c.name for c in found.kept] == ["cheap_big", "cheap_small"]  # best dB per cost first; 19 dB, no dear one
    assert found.within_budget and found.sqnr_db == pytest.approx(19.0)
    assert "d" not in found.nodes
    assert len(calls) == 4 + 2  # one sensitivity each, then two greedy re-measurements


def test_search_reports_over_budget_with_the_best_set() -> None:
    cands = [mixed.Candidate("x", ("a",), 1.0), mixed.Candidate("y", ("b",), 1.0)]
    measure, _ = _additive({"a": 1.0, "b": 1.0}, base=10.0)
    found = mixed.search(cands, measure, budget_db=20.0, base_db=10.0)
    assert not found.within_budget and found.sqnr_db == pytest.approx(12.0) and len(found.kept) == 2


def test_search_drops_a_candidate_that_stops_helping_together() -> None:
    cands = [mixed.Candidate("x", ("a",), 1.0), mixed.Candidate("y", ("b",), 1.0)]

    def measure(nodes):  # each helps alone, the two together are worse than x alone
        s = set(nodes)
        return 10.0 + (2.0 if s == {"a"} else 1.0 if s == {"b"} else 0.5 if s else 0.0)

    found = mixed.search(cands, measure, budget_db=30.0, base_db=10.0)
    assert [c.name for c in found.kept] == ["x"] and found.sqnr_db == 12.0


def test_search_skips_a_candidate_that_breaks_the_speed_floor() -> None:
    cands = [
        mixed.Candidate("cheap", ("a",), 1.0),
        mixed.Candidate("slow", ("b",), 2.0),
        mixed.Candidate("other", ("c",), 3.0),
    ]
    measure, _ = _additive({"a": 1.0, "b": 5.0, "c": 2.0}, base=10.0)
    asked: list[tuple[str, ...]] = []

    def fast_enough(nodes):
        asked.append(tuple(nodes))
        return "b" not in nodes

    found = mixed.search(cands, measure, budget_db=20.0, base_db=10.0, fast_enough=fast_enough)
    assert [c.name for c in found.kept] == ["cheap", "other"] and found.sqnr_db == pytest.approx(13.0)
    assert asked == [("b",), ("a",), ("a", "c")]  # best gain per cost first; only sets that help are timed
    slow = [s for s in found.steps if s.too_slow]
    assert [s.candidate for s in slow] == ["slow"] and not slow[0].kept


def test_search_measures_the_int8_matrix_ceiling_only_when_over_budget() -> None:
    cands = [mixed.Candidate("x", ("a",), 1.0)]
    measure, calls = _additive({"a": 1.0, "e": 2.0, "f": 0.5}, base=10.0)
    over = mixed.search(cands, measure, budget_db=20.0, base_db=10.0, ceiling_nodes=("e", "f"))
    assert over.ceiling_db == pytest.approx(12.5) and calls[-1] == ("e", "f")
    assert over.to_dict()["int8_matrix_ceiling_db"] == pytest.approx(12.5)
    calls.clear()
    met = mixed.search(cands, measure, budget_db=10.5, base_db=10.0, ceiling_nodes=("e", "f"))
    assert met.within_budget and met.ceiling_db is None and ("e", "f") not in calls
    assert "int8_matrix_ceiling_db" not in met.to_dict()


def test_a_ceiling_that_cannot_be_made_leaves_the_search_result_alone() -> None:
    from edgeship.errors import CalibrationError

    def measure(nodes):
        if "e" in nodes:
            raise CalibrationError("the int8 model TensorFlow's quantizer wrote does not run")
        return 10.0 + len(nodes)

    found = mixed.search(
        [mixed.Candidate("x", ("a",), 1.0)], measure, budget_db=20.0, base_db=10.0, ceiling_nodes=("e",)
    )
    assert found.ceiling_db is None and found.sqnr_db == 11.0 and [c.name for c in found.kept] == ["x"]


@pytest.mark.parametrize(
    ("limit", "ceiling", "says"),
    [
        (19.3, 11.0, "scores rounded to this int8 output's grid hold only 19.3 dB"),  # the output decides first
        (40.0, 11.0, "it reaches 11.0 dB on the calibration images, so this budget needs convolutions float"),
        (40.0, 20.7, "it reaches 20.7 dB"),  # over the budget but under what the search aimed at (20.9) on these images
        (40.0, 21.0, ""),  # the convolutions leave room: the speed floor or the candidates stopped the search
        (None, 30.0, ""),
    ],
)
def test_over_budget_note_names_the_limit_that_decides(limit: float | None, ceiling: float, says: str) -> None:
    from edgeship.quantize.options import QuantizeOptions
    from edgeship.quantize.result import _shortfall_note
    from edgeship.quantize.search_report import MixedPrecision

    mixed_report = MixedPrecision(
        20.0, searched=True, int8_matrix_ceiling_db=ceiling, target_sqnr_db=20.9, int8_output_limit_db=limit
    )
    note = _shortfall_note(mixed_report, QuantizeOptions(min_sqnr_db=20.0, min_speedup=1.25))
    assert (says in note) if says else note == ""
    assert note.count(";") <= 1


def test_float_except_matrix_leaves_only_the_large_matrix_ops_int8() -> None:
    ops = [
        mixed.OpInfo("CONV_2D", "conv", 112 * 112 * 32, 10**7),
        mixed.OpInfo("LOGISTIC", "sig", 112 * 112 * 32, 0),
        mixed.OpInfo("MEAN", "pool", 32, 0),
        mixed.OpInfo("FULLY_CONNECTED", "se_fc", 8, 256),
        mixed.OpInfo("DEPTHWISE_CONV_2D", "dw", 56 * 56 * 32, 10**6),
        mixed.OpInfo("FULLY_CONNECTED", "logits", 1000, 10**6),
        mixed.OpInfo("BATCH_MATMUL", "attn", 197 * 197 * 3, 10**7),
    ]
    assert mixed.float_except_matrix(ops) == ["sig", "pool", "se_fc", "logits"]


def test_no_search_when_already_within_budget() -> None:
    measure, calls = _additive({}, base=25.0)
    found = mixed.search([mixed.Candidate("x", ("a",), 1.0)], measure, budget_db=20.0, base_db=25.0)
    assert found.within_budget and not found.kept and not calls


# ----------------------------------------------------------------------------- end to end, tiny model
@pytest.fixture(scope="module")
def tiny_conv(tiny_bundle: Path) -> Path:
    return tiny_bundle


def test_full_integer_under_budget_exits_3_with_the_best_model(
    tmp_path: Path, tiny_bundle: Path, calib_images: Path
) -> None:
    out = tmp_path / "q"
    code = main(
        [
            "quantize",
            str(tiny_bundle),
            "--calib",
            str(calib_images),
            "-o",
            str(out),
            "-q",
            "--num-calib",
            "20",
            "--full-integer",
            "--min-sqnr",
            "90",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 3
    assert (out / "model_int8_OVER_BUDGET.tflite").is_file() and not (out / "model_int8.tflite").exists()
    report = json.loads((out / "quant_report.json").read_text())
    assert report["mixed_precision"]["searched"] is False  # full-integer: nothing may stay float


def test_budget_search_on_a_tiny_model_meets_the_budget(
    tmp_path: Path, tiny_bundle: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    args = [
        "quantize",
        str(tiny_bundle),
        "--calib",
        str(calib_images),
        "-o",
        str(out),
        "-q",
        "--num-calib",
        "20",
        "--method",
        "auto",
        "--no-bias-correction",
        "--int8-logits",
    ]
    assert main([*args, "--min-sqnr", "90"]) == 3  # nothing reaches 90 dB: best model kept, exit 3
    report = json.loads((out / "quant_report.json").read_text())
    ceiling = report["mixed_precision"]["int8_matrix_ceiling_db"]  # int8 convolutions alone cap it under 90 dB
    limit = report["mixed_precision"]["int8_output_limit_db"]  # so does the int8 output's grid, whatever is float
    all_int8 = report["mixed_precision"]["eval_sqnr_db_all_int8"]
    # The int8 model's scores lie on that grid, never nearer to the float scores than their own rounding.
    assert np.isfinite(ceiling) and ceiling < 90 and all_int8 - 1e-3 <= limit < 90
    err = capsys.readouterr().err
    assert f"scores rounded to this int8 output's grid hold only {limit:.1f} dB on the evaluation images" in err
    assert "needs convolutions float" not in err  # the output's grid already decides it
    auto = report["ranges"]["auto"]
    assert set(auto["cross_fitted_sqnr_db"]) == {c.label for c in CROSS_FIT_CANDIDATES}
    assert auto["chosen"] in auto["cross_fitted_sqnr_db"]
    # Above all-int8 (something must stay float) and under the output grid's limit (no model beats that grid).
    budget = round(min(all_int8 + 6.0, limit - 0.5), 1)
    assert budget > all_int8 + 1.0
    assert main([*args, "--min-sqnr", str(budget), "--min-speedup", "0", "--force"]) == 0
    mixed_report = json.loads((out / "quant_report.json").read_text())["mixed_precision"]
    assert mixed_report["searched"] and mixed_report["kept_float"]
    assert mixed_report["eval_sqnr_db"] >= budget
    assert set(mixed_report["latency_ms_1_thread"]) == {"float32", "all_int8", "budgeted"}
    assert mixed_report["speed_measurements"] == []  # no floor: nothing timed during the search
    # A floor no mixed model can meet: the search keeps nothing float, the best model is all-int8, exit 3.
    assert main([*args, "--min-sqnr", str(budget), "--min-speedup", "1000", "--force"]) == 3
    mixed_report = json.loads((out / "quant_report.json").read_text())["mixed_precision"]
    assert mixed_report["speed_measurements"] and not mixed_report["kept_float"]
    timed = mixed_report["speed_measurements"]
    assert timed[0]["float_ops"] == 0  # all-int8 first, then each candidate that raised the SQNR, all too slow
    assert len(timed) - 1 == sum(bool(s.get("too_slow")) for s in mixed_report["steps"]) >= 1
    assert any(s.get("too_slow") for s in mixed_report["steps"])


# ----------------------------------------------------------------------------- normalisation groups
def _layer_norm_ops() -> list[mixed.OpInfo]:
    """fc -> residual add -> LayerNorm (mean, squared_difference, mean, add eps, rsqrt, mul, mul, sub, add) -> fc,
    then an SE-style gate (mean -> logistic -> mul) that holds no normalisation."""
    o = mixed.OpInfo
    return [
        o("FULLY_CONNECTED", "fc0", 37_824, 7_000_000, (0,), (1,)),
        o("ADD", "res", 37_824, 0, (1, 0), (2,)),
        o("MEAN", "mu", 197, 0, (2,), (3,)),
        o("SQUARED_DIFFERENCE", "sq", 37_824, 0, (2, 3), (4,)),
        o("MEAN", "var", 197, 0, (4,), (5,)),
        o("ADD", "eps", 197, 0, (5,), (6,)),
        o("RSQRT", "inv", 197, 0, (6,), (7,)),
        o("MUL", "scale", 197, 0, (7,), (8,)),
        o("MUL", "xs", 37_824, 0, (2, 8), (9,)),
        o("MUL", "ms", 197, 0, (3, 8), (10,)),
        o("SUB", "shift", 197, 0, (10,), (11,)),
        o("ADD", "ln", 37_824, 0, (9, 11), (12,)),
        o("FULLY_CONNECTED", "fc1", 37_824, 7_000_000, (12,), (13,)),
        o("MEAN", "pool", 192, 0, (13,), (14,)),
        o("LOGISTIC", "g", 192, 0, (14,), (15,)),
        o("MUL", "gate", 37_824, 0, (13, 15), (16,)),
    ]


def test_normalization_groups_hold_the_whole_layer_norm_and_nothing_else() -> None:
    groups = mixed.normalization_groups(_layer_norm_ops())
    assert len(groups) == 1
    assert set(groups[0].nodes) == {"res", "mu", "sq", "var", "eps", "inv", "scale", "xs", "ms", "shift", "ln"}
    assert groups[0].cost > 0 and groups[0].name == "normalisation x1"


def test_no_normalization_groups_without_a_normalisation() -> None:
    assert mixed.normalization_groups(_ops()) == []  # conv net with an SE gate: nothing to keep float


# ----------------------------------------------------------------------------- cross-fitted range choice
def test_cross_fitted_choice_takes_min_max_when_unseen_images_exceed_the_tails() -> None:
    from edgeship.quantize.ranges import choose_cross_fitted

    rng = np.random.default_rng(7)
    # each fold has its own rare, large values: clipping the tails fitted on one fold cuts the other's
    values = [np.concatenate([rng.normal(0, 1, 100_000), rng.uniform(20, 40, 400) * s]) for s in (1, -1, 1, -1)]
    two = (CalibrationMethod.PERCENTILE, CalibrationMethod.MINMAX)
    method, report = choose_cross_fitted(_folds(values), 99.9, _rounding_model(values), methods=two)
    assert method.method == CalibrationMethod.MINMAX, report
    assert report["folds"] == 4 and set(report["cross_fitted_sqnr_db"]) == {"percentile", "minmax"}


def test_cross_fitted_choice_takes_percentile_when_the_tails_are_rare_noise() -> None:
    from edgeship.quantize.ranges import choose_cross_fitted

    rng = np.random.default_rng(8)
    values = [np.concatenate([rng.normal(0, 1, 200_000), [60.0 * (-1) ** k]]) for k in range(4)]
    two = (CalibrationMethod.PERCENTILE, CalibrationMethod.MINMAX)
    method, report = choose_cross_fitted(_folds(values), 99.99, _rounding_model(values), methods=two)
    assert method.method == CalibrationMethod.PERCENTILE and method.param is None, report


def test_merge_histograms_adds_counts_and_extremes() -> None:
    from edgeship.quantize.ranges import merge_histograms

    rng = np.random.default_rng(9)
    a, b = rng.normal(0, 1, 1000), rng.normal(3, 1, 1000)
    merged = merge_histograms(_folds([a, b]))[7]
    assert merged.counts.sum() == 2000
    assert merged.seen_min == pytest.approx(min(a.min(), b.min())) and merged.seen_max == pytest.approx(
        max(a.max(), b.max())
    )
    with pytest.raises(ValueError):
        merge_histograms([{1: Histogram(0, 1, np.zeros(4, np.int64))}, {1: Histogram(0, 2, np.zeros(4, np.int64))}])


# ----------------------------------------------------------------------------- timed placement (issue 13)
@pytest.mark.parametrize("ms, kept", [({"int8": 10.0, "placed": 8.0}, True), ({"int8": 10.0, "placed": 9.8}, False)])
def test_timed_placement_keeps_large_depthwise_float_only_when_measured_faster(
    ms: dict[str, float], kept: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edgeship.quantize import speed, worker
    from edgeship.quantize.options import QuantizeOptions
    from edgeship.quantize.report import RunsOn
    from edgeship.runtime.delegation import Delegation

    made: list[tuple[str, ...]] = []

    def fake_quantize(native, calibrated, options, nodes=()):
        made.append(tuple(nodes))
        return b"q:" + ",".join(nodes).encode(), RunsOn(Delegation(1, 1))

    monkeypatch.setattr(worker, "_quantize_checked", fake_quantize)
    monkeypatch.setattr(mixed, "slow_int8_candidates", lambda model: ["dw1", "dw2"])
    monkeypatch.setattr(speed, "latencies", lambda models, work, runs, stat="p50_ms": dict(ms))
    quantized = worker.Quantizer(None, QuantizeOptions())
    base = quantized(b"calibrated")
    (model, _), report = speed.timed_placement(quantized, b"calibrated", base, tmp_path, lambda *a: None)
    assert report.kept_float is kept and report.candidates == 2
    assert model == (b"q:dw1,dw2" if kept else b"q:")
    quantized(b"calibrated", ["se"])  # every later model keeps the placed nodes float too
    assert made[-1] == (("dw1", "dw2", "se") if kept else ("se",))
