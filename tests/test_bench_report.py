"""``bench.json`` as a value: :class:`BenchReport` reads every document edgeship writes and writes it back unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship.errors import InputError


@pytest.fixture(scope="module")
def bench_file(tiny_bundle: Path, tiny_onnx: Path, tiny_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real benchmark written by ``python -m edgeship.runtime.bench``: two TFLite models end to end and an ONNX
    model, at two thread counts."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    models = [tiny_bundle / "model_float32.tflite", tiny_bundle / "model_float16.tflite", tiny_onnx]
    args = ["--threads", "1,2", "--runs", "5", "--warmup", "1", "--image", str(tiny_images), "-o", str(out)]
    cmd = [sys.executable, "-m", "edgeship.runtime.bench", *map(str, models), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ), check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def test_a_real_bench_document_round_trips_exactly(bench_file: Path) -> None:
    from edgeship.runtime.bench_report import BenchReport

    text = bench_file.read_text()
    doc = json.loads(text)
    report = BenchReport.from_dict(doc)
    assert json.dumps(report.to_dict(), indent=2) == json.dumps(doc, indent=2)  # same keys, same order
    assert len(report.results) == 6 and {r.threads for r in report.results} == {1, 2}
    tflite = [r for r in report.results if r.model.endswith(".tflite")]
    assert all(r.e2e is not None and r.e2e.images == 12 and r.e2e.steps_p50_ms.decode > 0 for r in tflite)
    assert all(r.runtime.interpreter and r.overhead for r in tflite)
    onnx = next(r for r in report.results if r.model.endswith(".onnx"))
    assert onnx.e2e is None and onnx.overhead == {} and onnx.runtime.interpreter == "onnxruntime"
    assert report.options is not None and report.options.threads == (1, 2) and report.host.machine


def test_the_table_reads_the_report(bench_file: Path) -> None:
    from edgeship.runtime.bench import table
    from edgeship.runtime.bench_report import BenchReport

    lines = table(BenchReport.from_dict(json.loads(bench_file.read_text())))
    assert sum("model_float32.tflite" in line for line in lines) == 4  # invoke and end to end, two thread counts
    assert any(line.startswith("end to end, Classifier.predict on 12 images") for line in lines)


def test_a_newer_schema_is_refused(bench_file: Path) -> None:
    from edgeship.runtime.bench_report import BenchReport

    doc = {**json.loads(bench_file.read_text()), "schema_version": 99}
    with pytest.raises(InputError, match="schema_version 99.*upgrade edgeship"):
        BenchReport.from_dict(doc)


def test_an_adb_document_round_trips(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench --adb``: rows parsed from ``benchmark_model``'s output, the same document type."""
    from edgeship.runtime.bench_report import BenchReport
    from edgeship.targets import adb

    out = (
        "Inference timings in us: Init: 2100, First inference: 950, Warmup (avg): 900, Inference (avg): 810.5\n"
        "count=50 first=900 curr=800 min=700 max=1200 avg=810.5 std=40 p5=720 median=800 p95=1000\n"
        "Memory footprint delta from the start of the tool (MB): init=3.5 overall=9.25\n"
        "Overall peak memory footprint (MB) via periodic monitoring: 21.5\n"
    )
    flags_seen: list[list[str]] = []

    def fake(device: object, binary: Path, model: Path, flags: list[str]) -> dict[str, object]:
        flags_seen.append(flags)
        return {**adb.parse_benchmark_output(out), "device": {"state": "device", "abi": "arm64-v8a"}, "flags": flags}

    monkeypatch.setattr(adb, "run_benchmark", fake)
    model = tiny_bundle / "model_float32.tflite"
    report = adb.adb_benchmark("serial1", model, None, [model], threads=[1], runs=50, warmup=5)
    text = json.dumps(report.to_dict())
    assert json.dumps(BenchReport.from_dict(json.loads(text)).to_dict()) == text
    doc = json.loads(text)
    row = report.results[0]
    assert row.stats.p50_ms == 0.8 and row.stats.p95_ms == 1.0 and row.peak_rss_mb == 21.5
    assert row.adb is not None and row.adb.memory_delta_mb == {"init": 3.5, "overall": 9.25}
    assert doc["host"] == {"adb_serial": "serial1"} and "options" not in doc and flags_seen


def test_a_drift_report_keeps_the_runtime_description(
    tiny_onnx: Path, tiny_bundle: Path, tiny_images: Path, tmp_path: Path
) -> None:
    """The candidate's runtime (a :class:`RuntimeInfo`) reads and writes ``drift_report.json`` unchanged."""
    import edgeship.targets
    from edgeship.verify.report import DriftReport

    report, target = tmp_path / "drift.json", tmp_path / "x86-float.toml"
    profile = (Path(edgeship.targets.__file__).parent / "x86-host.toml").read_text()
    target.write_text(
        profile.replace('"x86-host"', '"x86-float"')
        .replace('"int8"', '"float32"')
        .replace("int8_only = true", "int8_only = false")
    )
    model = tiny_bundle / "model_float32.tflite"
    cmd = [sys.executable, "-m", "edgeship", "verify", str(tiny_onnx), str(model), "--images", str(tiny_images)]
    proc = subprocess.run(
        [*cmd, "--target", str(target), "-r", str(report), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode in (0, 3), proc.stderr
    doc = json.loads(report.read_text())
    drift = DriftReport.from_dict(doc)
    assert json.dumps(drift.to_dict(), indent=2) == json.dumps(doc, indent=2)
    runtime = drift.candidate.runtime
    assert runtime.interpreter and runtime.interpreter_version and runtime.image_path
    assert runtime.delegate != "xnnpack" or (runtime.xnnpack is not None and runtime.xnnpack.partitions >= 1)
    assert list(doc["candidate"]["runtime"])[:3] == ["interpreter", "interpreter_version", "delegate"]
