"""Issue 13's table in benchmarks/arch_matrix.py: partitions, ops outside, float32 vs the target's model."""

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


def _row(model: str, speedup: float, outside: dict[str, int] | None = None) -> dict:
    return {
        "model": model,
        "exporter": "dynamo",
        "target_int8": {
            "file": "model_int8.tflite",
            "sqnr_db": 19.04,
            "float_ops": 3,
            "float_islands": 2,
            "delegation_float32": {"partitions": 1, "outside": {}},
            "delegation_target": {"partitions": 2 if outside else 1, "outside": outside or {}},
            "latency": {
                "float32_ms": 10.0,
                "target_ms": round(10.0 / speedup, 2),
                "speedup": speedup,
                "default_int8_ms": 4.0,
            },
        },
    }


def test_target_table_flags_slow_models(bench) -> None:
    rows = [
        _row("fast", 2.5),
        _row("marginal", 1.2, {"GATHER": 1}),
        _row("slow", 0.8),
        {"model": "broken", "exporter": "dynamo", "target_int8": {"error": "edgeship quantize exit 1: boom"}},
        {"model": "no_column", "exporter": "dynamo"},
    ]
    lines = bench.target_table(rows)
    by = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| ")}
    assert "| 1/1 | none | none | 10.0 | 4.0 | 2.5 |" in by["fast (dynamo)"]
    assert "| 1/2 | none | GATHER x1 |" in by["marginal (dynamo)"] and "1.2 (<1.3)" in by["marginal (dynamo)"]
    assert "0.8 (SLOWER)" in by["slow (dynamo)"] and "| 19.0 | 5 | model_int8.tflite |" in by["slow (dynamo)"]
    assert "| ERR |" in by["broken (dynamo)"] and "broken (dynamo) target_int8: edgeship quantize exit 1: boom" in lines
    assert "no_column (dynamo)" not in by
