"""Issue 25's table in benchmarks/arch_matrix.py: top-1 against labels for edgeship and each peer, and the verdict."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="benchmarks/arch_matrix.py imports the matrix builders (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "arch_matrix", Path(__file__).resolve().parents[1] / "benchmarks" / "arch_matrix.py"
    )
    module = sys.modules.setdefault("arch_matrix", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _fig(top1: float, agreement: float, sqnr: float = 20.0) -> dict:
    return {"top1": top1, "agreement": agreement, "sqnr_db": sqnr}


def test_verdict_counts_one_image_of_400(bench) -> None:
    row = {
        "model": "m",
        "exporter": "dynamo",
        "float_top1": 0.87,
        "edgeship_int8": {**_fig(0.8675, 0.98), "range_method": "minmax", "float_islands": 0},
        "tf_ptq": _fig(0.87, 0.9825),
        "ort_qdq": {"error": "boom"},
    }
    assert bench.verdict(row) == "pass"  # 1 image behind on each is within the bar
    row["aeq_int8"] = _fig(0.8725, 0.98)
    assert bench.verdict(row) == "AI Edge Q top1 +0.50 pt"
    row["edgeship_int8"]["top1"] = 0.86
    assert bench.verdict(row).startswith("drop 1.00 pt")
    lines = bench.accuracy_table([row, {"model": "no_labels", "exporter": "dynamo"}])
    assert len(lines) == 3 and "| m | dynamo | 87.00 | 86.00 / 98.00 / 20.0 | 87.00 / 98.25 / 20.0 | ERR |" in lines[2]


def test_verdict_names_a_peer_above_float_and_the_choices(bench) -> None:
    row = {
        "model": "m",
        "exporter": "dynamo",
        "float_top1": 0.87,
        "edgeship_int8": {
            **_fig(0.87, 0.99),
            "range_method": "percentile 99.99",
            "float_islands": 0,
            "float_logits": True,
            "bias_correction": ["DEPTHWISE_CONV_2D"],
        },
        "tf_ptq": _fig(0.875, 0.975),
    }
    # a model agreeing with float on every image scores 87.00: the note says no faithful quantizer can pass
    assert bench.verdict(row) == "TF PTQ top1 +0.50 pt (above float by 0.50 pt)"
    assert "percentile 99.99, islands 0, float logits, BC depthwise |" in bench.accuracy_table([row])[2]


def test_pooled_table_sums_every_split(bench) -> None:
    def row(float_top1: float, es: dict, tf: dict, seed: str) -> dict:
        split = {"calibration": seed, "eval": 400}
        return {
            "model": "m",
            "exporter": "e",
            "float_top1": float_top1,
            "split": split,
            "edgeship_int8": es,
            "tf_ptq": tf,
        }

    one = row(0.87, _fig(0.87, 0.99, 22.0), _fig(0.875, 0.975, 18.0), "default")
    assert bench.pooled_table([one]) == []  # one split: nothing to pool
    two = row(0.88, _fig(0.8775, 0.995, 23.0), _fig(0.87, 0.98, 19.0), "seed 1")
    lines = bench.pooled_table([one, two])
    assert lines[2] == "| m | e | 2 / 800 | 87.50 | 87.38 / 99.25 / 22.5 | 87.25 / 97.75 / 18.5 | - | - |"
