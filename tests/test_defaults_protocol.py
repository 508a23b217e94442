"""benchmarks/defaults.py (issue 33): splits that share no class, paired statistics, and a resumable quick run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_assets

pytest.importorskip("torch", reason="benchmarks/arch_matrix.py imports the matrix builders (pip install -e '.[dev]')")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "defaults.py"


@pytest.fixture(scope="module")
def proto():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("defaults_protocol", SCRIPT)
    module = sys.modules.setdefault("defaults_protocol", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_exact_mcnemar_and_the_decision_rule(proto) -> None:
    a = np.array([True] * 10 + [False] * 90)
    b = np.array([False] * 10 + [False] * 90)
    only_a, only_b, p = proto.mcnemar(a, b)
    assert (only_a, only_b) == (10, 0) and p == pytest.approx(2 * 0.5**10)
    assert proto.mcnemar(a, a)[2] == 1.0
    win = {"only_a": 2, "only_b": 20, "p": 1e-4}
    tie = {"only_a": 9, "only_b": 11, "p": 0.82}
    loss = {"only_a": 30, "only_b": 5, "p": 1e-5}
    assert proto.beats([win, tie]) and not proto.beats([tie]) and not proto.beats([win, win, loss])


def test_bootstrap_interval_of_the_sqnr_difference_covers_it(proto) -> None:
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(200), 4)
    sig = rng.uniform(50, 150, clusters.size)
    noise_a = rng.uniform(0.5, 1.5, clusters.size)
    noise_b = noise_a * rng.uniform(0.3, 0.7, clusters.size)  # about half the noise: about +3 dB
    lo, hi = proto.bootstrap_sqnr_diff(sig, noise_a, noise_b, clusters)
    point = proto.sqnr_db(sig, noise_b) - proto.sqnr_db(sig, noise_a)
    assert lo < point < hi and 2.5 < lo and hi < 3.5
    lo, hi = proto.bootstrap_sqnr_diff(sig, noise_a, noise_a, clusters)
    assert lo == hi == 0.0


def test_only_the_protocols_whole_plan_may_decide(proto) -> None:
    from dataclasses import replace

    assert proto.FULL.covers_protocol() and not proto.QUICK.covers_protocol()
    assert not replace(proto.FULL, draws=2).covers_protocol()
    assert not replace(proto.FULL, models=proto.FULL.models[:3]).covers_protocol()
    assert not replace(proto.FULL, options=("default", "bc_none")).covers_protocol()
    assert replace(proto.FULL, draws=6).covers_protocol()


@needs_assets
def test_splits_share_no_class_and_draws_stay_in_the_choosing_split(proto, assets: Path) -> None:
    files = proto.splits(assets / "data" / "imagenet-sample", None)
    wnids = {k: {f.name.split("_")[0] for f in v} for k, v in files.items()}
    assert len(files["choose"]) == len(files["confirm"]) == 250 and not wnids["choose"] & wnids["confirm"]
    calib0, rest0 = proto.draw(files["choose"], 0, 100)
    calib1, _ = proto.draw(files["choose"], 1, 100)
    assert len(calib0) == 100 and set(calib0) <= set(files["choose"]) and not set(calib0) & set(rest0)
    assert calib0 != calib1 and calib0 == proto.draw(files["choose"], 0, 100)[0]
    v = proto.views_of(files["confirm"][:1], 224, 12)
    assert v.shape == (12, 224, 224, 3) and v.dtype == np.uint8 and not np.array_equal(v[0], v[2])
    assert np.array_equal(v[1], v[0][:, ::-1])  # the mirrored view


@needs_assets
def test_quick_run_writes_its_table_and_a_second_run_reuses_every_cell(tmp_path: Path, assets: Path) -> None:
    env = {**os.environ, "EDGE_ASSETS": str(assets)}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "draw 0 default:" in first.stderr and "FAILED" not in first.stderr, first.stderr[-2000:]
    assert "**bias correction**" in first.stdout and "| confirm | mobilenetv2:tf2onnx | 1 × 48 |" in first.stdout
    assert "ort_qdq" in first.stdout and "Cells: 3 of 3 planned" in first.stdout
    assert "no default is decided" in first.stdout and "decision: none" in first.stdout  # complete, not the protocol
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000, check=False)
    assert second.returncode == 0 and "draw 0" not in second.stderr  # every cell came from the cache
    assert second.stdout == first.stdout
