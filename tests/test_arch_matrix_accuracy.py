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
