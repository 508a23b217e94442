"""verify (drift budgets, exit 3), bench, bundle and the model zoo resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HOST = (Path(__file__).parents[1] / "targets" / "x86-host.toml").read_text()


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, calib_images: Path) -> Path:
    out = tmp_path_factory.mktemp("vq") / "int8"
    assert (
        main(["quantize", str(tiny_bundle), "--calib", str(calib_images), "-o", str(out), "-q", "--num-calib", "20"])
        == 0
    )
    return out


def _tight_target(tmp: Path) -> Path:
    path = tmp / "tight.toml"
    path.write_text(
        HOST.replace('name = "x86-host"', 'name = "tight"')
        .replace("min_top1_agreement = 97.5", "min_top1_agreement = 100.0")
        .replace("min_sqnr_db = 18.0", "min_sqnr_db = 80.0")
    )
    return path


def test_verify_passes_inside_budget(
    tmp_path: Path, tiny_onnx: Path, tiny_q: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "drift.json"
    code = main(
        [
            "verify",
            str(tiny_onnx),
            str(tiny_q / "model_int8.tflite"),
            "--images",
            str(calib_images),
            "--target",
            "x86-host",
            "-r",
            str(report),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["images"]["count"] == 30
    assert (
        doc["candidate"]["runtime"]["delegate"] == "xnnpack" and doc["candidate"]["runtime"]["input"]["dtype"] == "int8"
    )
    assert {c["metric"] for c in doc["budget"]} == {"top1_agreement_pct", "top1_drop_points", "sqnr_db"}
    assert "PASS" in out and doc["verdict"].startswith("PASS")
    agreement = next(c for c in doc["budget"] if c["metric"] == "top1_agreement_pct")
    assert agreement["interval"][0] <= agreement["value"] <= agreement["interval"][1]
    assert "top1_agreement_pct: " in out and "(95% CI " in out  # the interval on the CLI line


def test_verify_over_budget_exits_3_naming_every_metric(
    tmp_path: Path, tiny_onnx: Path, tiny_q: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "drift.json"
    code = main(
        [
            "verify",
            str(tiny_onnx),
            str(tiny_q / "model_int8.tflite"),
            "--images",
            str(calib_images),
            "--target",
            str(_tight_target(tmp_path)),
            "-r",
            str(report),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "sqnr_db" in err and "over the drift budget of target tight" in err
    assert not json.loads(report.read_text())["passed"]  # the report is still written


def test_verify_wrong_io_for_target_fails(
    tmp_path: Path, tiny_onnx: Path, tiny_q: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "verify",
            str(tiny_onnx),
            str(tiny_q / "model_int8.tflite"),
            "--images",
            str(calib_images),
            "--target",
            "android-nnapi",
            "-r",
            str(tmp_path / "d.json"),
            "-q",
        ]
    )
    assert code == 4  # a model/target mismatch, found before running (not drift)
    assert "needs uint8" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


def test_verify_report_not_overwritten(
    tmp_path: Path, tiny_onnx: Path, tiny_q: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "drift.json"
    report.write_text("{}")
    code = main(
        [
            "verify",
            str(tiny_onnx),
            str(tiny_q / "model_int8.tflite"),
            "--images",
            str(calib_images),
            "--target",
            "x86-host",
            "-r",
            str(report),
            "-q",
        ]
    )
    assert code == 1 and report.read_text() == "{}"
    assert "--force" in capsys.readouterr().err


def test_bench_local_fields(tmp_path: Path, tiny_bundle: Path, tiny_q: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(tiny_onnx),
            str(tiny_bundle / "model_float32.tflite"),
            str(tiny_q / "model_int8.tflite"),
            "--threads",
            "1,2",
            "--runs",
            "20",
            "--warmup",
            "2",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 6
    for r in doc["results"]:
        for key in (
            "init_ms",
            "first_ms",
            "min_ms",
            "mean_ms",
            "std_ms",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "peak_rss_mb",
            "size_bytes",
            "ratio_p50_to_first",
        ):
            assert isinstance(r[key], (int, float)), key
        assert r["runs"] == 20 and len(r["samples_ms"]) == 20 and r["min_ms"] <= r["p50_ms"] <= r["p99_ms"]
    first = [r for r in doc["results"] if r["threads"] == 1]
    assert first[0]["runtime"]["interpreter"] == "onnxruntime" and first[0]["ratio_p50_to_first"] == 1.0
    assert first[2]["runtime"]["delegate"] == "xnnpack" and first[2]["overhead"]["preprocess_ms"] > 0


def test_bench_errors(tmp_path: Path, tiny_q: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tmp_path / "nope.tflite"), "-o", str(tmp_path / "b.json"), "-q"]) == 1
    assert "does not exist" in capsys.readouterr().err
    code = main(
        [
            "bench",
            str(tiny_q / "model_int8.tflite"),
            "--adb",
            "no-such-serial",
            "--benchmark-binary",
            str(tiny_q / "model_int8.tflite"),
            "-o",
            str(tmp_path / "b.json"),
            "-q",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert ("adb is not installed" in err) or ("no-such-serial" in err), err


def test_adb_output_parser() -> None:
    from edgeship.targets.adb import parse_benchmark_output

    text = """INFO: Initialized session in 3.2ms.
INFO: count=56 first=13117 curr=8730 min=8564 max=13117 avg=8903.7 std=688
INFO: count=112 first=8915 curr=8849 min=8542 max=9440 avg=8892.9 std=158 p5=8600 median=8850 p95=9300
INFO: Inference timings in us: Init: 3200, First inference: 13117, Warmup (avg): 8903.7, Inference (avg): 8892.9
INFO: Memory footprint delta from the start of the tool (MB): init=2.5 overall=8.1
INFO: Overall peak memory footprint (MB) via periodic monitoring: 10.7
"""
    r = parse_benchmark_output(text)
    assert r["init_ms"] == 3.2 and r["first_ms"] == 13.117 and r["runs"] == 112 and r["p50_ms"] == 8.85
    assert r["std_ms"] == 0.158 and r["peak_rss_mb"] == 10.7 and r["memory_delta_mb"]["overall"] == 8.1


def test_bundle(tmp_path: Path, tiny_q: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert main(["bundle", str(tiny_q / "model_int8.tflite"), "--target", "rpi4-aarch64", "-o", str(out), "-q"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model_int8.tflite", "model_card.json", "requirements.txt", "README.md", "wheels"} <= names
    reqs = (out / "requirements.txt").read_text()
    # The interpreter is pinned to the version this machine's checks ran with: what was verified ships.
    # No numpy<2 beside ai-edge-litert: numpy 1.x has no wheel for Python 3.13 (Raspberry Pi OS trixie).
    assert "ai-edge-litert==2.1.0" in reqs and "numpy>=1.23.2" in reqs and "./wheels/edgeship-" in reqs
    assert "python -m edgeship.runtime . IMAGE.jpg" in (out / "README.md").read_text()
    armv7 = tmp_path / "armv7"
    assert main(["bundle", str(tiny_q / "model_int8.tflite"), "--target", "rpi-armv7", "-o", str(armv7), "-q"]) == 0
    assert "tflite-runtime==2.14.0" in (armv7 / "requirements.txt").read_text()
    # A float model is refused for an int8 target, and an int8 one for the GPU target.
    assert (
        main(
            ["bundle", str(tiny_q / "model_int8.tflite"), "--target", "android-gpu", "-o", str(tmp_path / "gpu"), "-q"]
        )
        == 4
    )
    assert "runs float16 models" in capsys.readouterr().err and not (tmp_path / "gpu").exists()


def test_bundle_runs_from_its_own_folder(tmp_path: Path, tiny_q: Path, calib_images: Path) -> None:
    """The bundle's second README command, run with the runtime only (wheel already importable here)."""
    import subprocess
    import sys

    out = tmp_path / "bundle"
    assert main(["bundle", str(tiny_q / "model_int8.tflite"), "--target", "x86-host", "-o", str(out), "-q"]) == 0
    img = str(sorted(calib_images.glob("img_0*"))[0])
    proc = subprocess.run(
        [sys.executable, "-m", "edgeship.runtime", ".", img, "--threads", "2"],
        cwd=out,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model_int8.tflite (int8)" in proc.stdout


def test_zoo_offline_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship import zoo

    monkeypatch.setenv("EDGESHIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGESHIP_MODELS", raising=False)
    with pytest.raises(InputError) as exc:
        zoo.resolve("mobilenetv2-7", download=False)
    msg = str(exc.value)
    assert (
        "mobilenetv2-7.onnx" in msg
        and str(tmp_path / "cache" / "models") in msg
        and zoo.ZOO["mobilenetv2-7"].sha256 in msg
    )
    bad = tmp_path / "models" / "mobilenetv2-7.onnx"
    bad.parent.mkdir()
    bad.write_bytes(b"not the model")
    monkeypatch.setenv("EDGESHIP_MODELS", str(bad.parent))
    with pytest.raises(InputError, match="is not mobilenetv2-7.onnx"):
        zoo.resolve("mobilenetv2-7", download=False)
    assert zoo.resolve("some/path.onnx") == Path("some/path.onnx")


def test_budget_drop_is_counted_in_images() -> None:
    from edgeship.runtime.metrics import DriftFigures
    from edgeship.targets import load_target

    budget = load_target("x86-host").budget
    small = DriftFigures(100, 0.98, 0.99, 0.98, 1.0, 25.0, ref_top1=0.87, cand_top1=0.86)
    drop = {c.metric: c for c in budget.check(small)}["top1_drop_points"]
    assert drop.passed and drop.value == 1.0
    assert "one image is 1.00 pt" in drop.note
    large = DriftFigures(1000, 0.98, 0.99, 0.98, 1.0, 25.0, ref_top1=0.87, cand_top1=0.855)
    drop = {c.metric: c for c in budget.check(large)}["top1_drop_points"]
    assert not drop.passed and drop.note == ""


def test_budget_edges_compare_exactly() -> None:
    """99/100 images agreeing is a 1.0 point drop, not 1.0000000000000009."""
    from edgeship.runtime.metrics import DriftFigures
    from edgeship.targets import load_target

    fig = DriftFigures(100, 99 / 100, 0.99, 0.98, 1.0, 25.0)
    assert fig.agreement_drop == 1.0
    edge = DriftFigures(100, 29 / 100, 0.99, 0.98, 1.0, 25.0)
    assert edge.agreement_pct == 29.0  # 0.29 * 100 is 28.999999999999996 in floating point
    budget = load_target("x86-host").budget
    at_limit = DriftFigures(400, budget.min_top1_agreement / 100, 0.99, 0.98, 1.0, budget.min_sqnr_db)
    assert all(c.passed for c in budget.check(at_limit))
