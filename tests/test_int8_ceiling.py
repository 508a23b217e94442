"""benchmarks/int8_ceiling.py: the weights-only model it simulates, and its table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="benchmarks/int8_ceiling.py imports the matrix builders (pip install -e '.[dev]')")
pytest.importorskip("tensorflow", reason="the weights-only simulation edits models with TensorFlow's flatbuffer tools")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "int8_ceiling.py"
    spec = importlib.util.spec_from_file_location("int8_ceiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]  # it puts the repository root on sys.path itself
    return module


def _weights(model: bytes) -> dict[str, tuple[str, np.ndarray]]:
    from edgeship import tflite_graph as g

    m = g.read(model)
    sg = m.subgraphs[0]
    found = {}
    for op in sg.operators:
        name = g.op_name(m, op)
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            t = sg.tensors[op.inputs[1]]
            found[g.tensor_name(t)] = (name, g.constant(m, op.inputs[1]))
    return found


def test_weights_only_rounds_every_weight_to_its_channel_grid(bench, tiny_bundle: Path) -> None:
    original = (tiny_bundle / "model_float32.tflite").read_bytes()
    before, after = _weights(original), _weights(bench.weights_only(original))
    assert before.keys() == after.keys() and before
    changed = 0
    for name, (op, w) in before.items():
        axis = bench.CHANNEL_AXIS[op]
        other = tuple(i for i in range(w.ndim) if i != axis)
        step = np.abs(w).max(axis=other, keepdims=True) / 127
        q = after[name][1]
        levels = q / np.where(step == 0, 1, step)
        assert np.allclose(levels, np.round(levels), atol=1e-3)  # on the grid...
        assert np.all(np.abs(q - w) <= step / 2 + 1e-6)  # ...at the nearest point
        assert np.abs(levels).max() <= 127 + 1e-3
        changed += int(not np.array_equal(q, w))
    assert changed == len(before)  # float weights are never already on an int8 grid


def test_table_shows_each_column_and_errors(bench) -> None:
    row = {
        "model": "m",
        "exporter": "dynamo",
        "weights": {"sqnr_db": 27.7},
        "io": {"input_grid_db": 32.2, "output_grid_db": 19.3},
        "default": {"sqnr_db": 9.0},
        "ceiling": {"sqnr_db": 11.1, "float_ops": 194},
        "budget": {"sqnr_db": 19.1, "float_ops": 391},
        "floor": {"error": "boom"},
        "int16": {"error": "TensorFlow's 16x8 quantizer does not support HARD_SWISH"},
        "speed": {
            "float32": {"p50_ms": 12.0},
            "default": {"p50_ms": 6.0},
            "ceiling": {"p50_ms": 8.0},
            "budget": {"p50_ms": 12.0},
        },
    }
    line = bench.table([row])[-1]
    assert line == (
        "| m (dynamo) | 27.7 | 32.2 / 19.3 | 9.0 / 2.00x | 11.1 / 1.50x (194) | 19.1 / 1.00x (391) | "
        "error: boom | TensorFlow's 16x8 quantizer does not support HARD_SWISH |"
    )
