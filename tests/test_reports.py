"""Reports are values: typed sections, to_dict/from_dict, and a schema_version in every JSON file written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeship._version import SCHEMA_VERSION
from edgeship.errors import InputError


def test_convert_report_is_typed_and_round_trips(tiny_bundle: Path) -> None:
    from edgeship.convert import ConvertResult
    from edgeship.convert.report import ConvertReport

    doc = json.loads((tiny_bundle / "convert_report.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["edgeship_report"] == "convert"
    report = ConvertReport.from_dict(doc)
    assert report.to_dict() == doc
    loaded = ConvertResult.load(tiny_bundle).report
    assert loaded == report and loaded.passed
    check = report.verification["float32"]
    assert check.agreement_enforced and check.figures.count == 12 and check.tolerance.min_cosine == 0.9999
    assert report.source.model.input_name and report.preprocessing.crop == report.preprocessing_of_source.crop


def test_every_json_file_of_a_conversion_carries_the_schema_version(tiny_bundle: Path) -> None:
    files = sorted(tiny_bundle.glob("*.json"))
    assert len(files) >= 3  # card, float16 card, report
    for path in files:
        assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION, path.name


def test_a_card_from_a_newer_edgeship_is_refused_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    from edgeship.runtime.card import CARD_FILE, ModelCard

    card = json.loads((tiny_bundle / CARD_FILE).read_text())
    assert ModelCard.from_dict(card).model_file == "model_float32.tflite"  # its own version is read
    (tmp_path / CARD_FILE).write_text(json.dumps({**card, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(InputError, match="upgrade edgeship") as err:
        ModelCard.load(tmp_path / CARD_FILE)
    assert "\n" not in str(err.value)


def _client(runtime_agreement: float):  # type: ignore[no-untyped-def]
    from edgeship.runtime.metrics import compare
    from edgeship.targets.mediapipe_check import ClientDrift

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(8, 5)).astype(np.float32)
    figs = compare(ref, ref + rng.normal(scale=0.1, size=ref.shape).astype(np.float32))
    return ClientDrift("mediapipe 0.10.21", 8, figs, figs, figs, runtime_agreement, {"name": "m"}, True)


def _drift(tmp_path: Path, client):  # type: ignore[no-untyped-def]
    from edgeship.runtime.bench_report import RuntimeInfo
    from edgeship.runtime.metrics import compare
    from edgeship.targets import load_target
    from edgeship.targets.mediapipe_check import client_problems
    from edgeship.verify import DriftResult
    from edgeship.verify.report import DriftCandidate, DriftImages, DriftReference, DriftReport, DriftTarget

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(6, 5)).astype(np.float32)
    cand = ref + rng.normal(scale=0.01, size=ref.shape).astype(np.float32)
    target = load_target("android-arm64-cpu")
    fig = compare(ref, cand)
    checks = tuple(target.budget.check(fig))
    problems = tuple(client_problems(client)) if client else ()
    report = DriftReport(
        DriftTarget.of(target),
        DriftReference("m.onnx"),
        DriftCandidate(
            "model_int8.tflite",
            "int8",
            RuntimeInfo("tflite_runtime", "2.14.0", "xnnpack", details={"image_path": "PIL"}),
            "this machine (x86_64)",
        ),
        DriftImages(str(tmp_path), 6, 0, 0),
        fig,
        checks,
        problems,
        ("a note",),
        all(c.passed for c in checks) and not problems,
        client,
    )
    return DriftResult(report, ref, cand, tuple(tmp_path / f"{i}.jpg" for i in range(6)))


def test_drift_report_round_trips_through_save_and_load(tmp_path: Path) -> None:
    from edgeship.verify import DriftResult

    result = _drift(tmp_path, _client(1.0))
    folder = result.save(tmp_path / "saved")
    doc = json.loads((folder / "drift_report.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["client_check"]["ok"] and doc["passed"]
    # 6 of 6 images agree: Wilson's 95 % interval [61 %, 100 %] holds the 97.5 % budget, and the verdict says so
    assert doc["verdict"] == "PASS (within noise of the budget: top1_agreement_pct)"
    assert doc["figures"]["intervals"]["top1_agreement_pct"][0] == pytest.approx(60.97, abs=0.01)
    loaded = DriftResult.load(folder)
    assert loaded.report == result.report and loaded.passed
    assert loaded.client_check == result.client_check and loaded.report.candidate.image_path == "PIL"
    np.testing.assert_array_equal(loaded.candidate, result.candidate)


def test_a_failing_client_path_is_in_the_verdict_not_patched_into_it(tmp_path: Path) -> None:
    from edgeship.errors import AccuracyDriftError

    result = _drift(tmp_path, _client(0.5))
    assert result.client_check is not None and not result.client_check.ok
    assert not result.passed and "MediaPipe ImageClassifier agrees" in result.report.io_problems[0]
    with pytest.raises(AccuracyDriftError, match="android-arm64-cpu"):
        result.raise_for_budget()
    assert result.to_dict()["passed"] is False
