"""convert: bad inputs rejected cleanly, tiny models converted and verified for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship._io import sha256_file
from edgeship.cli import main
from tests.conftest import save, tiny_classifier, two_input_model, vector_input_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _bad_cases(tmp: Path, tiny: Path) -> dict[str, Path]:
    text = tmp / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp / "truncated.onnx"
    truncated.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    empty = tmp / "empty.onnx"
    empty.write_bytes(b"")
    return {
        "missing": tmp / "nope.onnx",
        "text": text,
        "truncated": truncated,
        "empty": empty,
        "two_inputs": save(two_input_model(), tmp / "two.onnx"),
        "not_4d": save(vector_input_model(), tmp / "vec.onnx"),
        "folder": tmp,
    }


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "empty", "two_inputs", "not_4d", "folder"])
def test_bad_model_one_line_error_nothing_written(
    case: str, tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _bad_cases(tmp_path, tiny_onnx)[case]
    out = tmp_path / "out"
    code = main(["convert", str(model), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("edgeship convert: error:") and "\n" not in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_dynamic_spatial_dims_need_input_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save(tiny_classifier(size="H"), tmp_path / "dyn.onnx")  # type: ignore[arg-type]
    assert main(["convert", str(model), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "--input-shape" in capsys.readouterr().err


def test_bad_image_folder_rejected_before_work(
    tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    assert main(["convert", str(tiny_onnx), "-o", str(tmp_path / "out"), "--images", str(empty), "-q"]) == 1
    assert "usable image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_converted(tiny_bundle: Path, tiny_onnx: Path) -> Path:
    report = json.loads((tiny_bundle / "convert_report.json").read_text())
    assert sha256_file(tiny_onnx) == report["source"]["sha256"], "the input model must never be modified"
    return tiny_bundle


def test_tiny_outputs_and_report(tiny_converted: Path) -> None:
    names = {p.name for p in tiny_converted.iterdir()}
    assert {"model_float32.tflite", "model_float16.tflite", "model_card.json", "convert_report.json"} <= names
    report = json.loads((tiny_converted / "convert_report.json").read_text())
    assert report["fixes"] == ["dynamic batch dimension 'N' fixed to 1"]
    assert report["layout"] == {"onnx": "NCHW", "tflite": "NHWC"}
    assert report["node_counts"]["before"]["Conv"] == 2
    v32 = report["verification"]["float32"]
    assert v32["passed"] and v32["count"] == 12 and v32["agreement_enforced"]
    assert v32["mean_cosine"] > 0.9999 and v32["top1_agreement"] == 1.0
    assert report["versions"]["onnx2tf"] and report["timings_s"]["onnx2tf"] > 0
    card = json.loads((tiny_converted / "model_card.json").read_text())
    assert card["input"]["layout"] == "NHWC" and card["input"]["shape"] == [1, 32, 32, 3]
    assert card["preprocessing"]["crop"] == [32, 32] and card["num_classes"] == 10
    assert card["source_sha256"] == report["source"]["sha256"]


def test_tflite_matches_onnxruntime_directly(tiny_converted: Path, tiny_onnx: Path) -> None:
    """Independent of edgeship's verifier: run both by hand on one random input."""
    import onnxruntime as ort

    from edgeship.runtime.interpreter import TFLiteModel

    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = TFLiteModel(tiny_converted / "model_float32.tflite").run(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_existing_output_needs_force(tiny_converted: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = tiny_converted / "model_card.json"
    stamp = card.stat().st_mtime_ns
    assert main(["convert", str(tiny_onnx), "-o", str(tiny_converted), "-q"]) == 1
    assert "--force" in capsys.readouterr().err
    assert card.stat().st_mtime_ns == stamp


def test_old_opset7_ir3_with_initializer_inputs(tmp_path: Path, tiny_op7: Path) -> None:
    out = tmp_path / "out"
    assert main(["convert", str(tiny_op7), "-o", str(out), "-q", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((out / "convert_report.json").read_text())
    fixes = " ".join(report["fixes"])
    assert "opset 7 upgraded to 13" in fixes and "initializers listed as graph inputs" in fixes
    assert report["source"]["initializer_inputs"] == 6
    v = report["verification"]["float32"]
    assert v["passed"] and not v["agreement_enforced"] and v["count"] == 16  # generated inputs
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["exit_code"] == 0 and doc["command"] == "convert"


def test_input_shape_override_and_force(tmp_path: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_float32.tflite").write_bytes(b"old")
    assert main(["convert", str(tiny_onnx), "-o", str(out), "--input-shape", "2,3,32,32", "--force", "-q"]) == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert report["input_shape_onnx"] == [2, 3, 32, 32]
    assert "set to [2, 3, 32, 32]" in report["fixes"][0]
    assert json.loads((out / "model_card.json").read_text())["input"]["shape"] == [2, 32, 32, 3]


def test_works_offline_without_venv_on_path(tmp_path: Path, tiny_onnx: Path) -> None:
    """onnx2tf's PATH-dependent onnxsim call and its sample-data download must not be reached."""
    env = dict(
        os.environ, PATH="/usr/bin:/bin", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", NO_PROXY=""
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "edgeship", "convert", str(tiny_onnx), "-o", str(out), "-q"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model_float32.tflite").is_file()
    assert not list(tmp_path.glob("calibration_image_sample_data*"))


def test_newest_ir_version_is_accepted(tmp_path: Path) -> None:
    """onnx 1.19 writes IR 12, newer than the pinned onnxsim and onnxruntime read."""
    model = save(tiny_classifier(ir_version=None), tmp_path / "ir12.onnx")
    assert main(["convert", str(model), "-o", str(tmp_path / "out"), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert report["source"]["ir_version"] == 12
    assert "IR version 12 lowered to 10 for onnxsim" in report["fixes"]


@pytest.mark.parametrize("content", ['{"interpolation": "lanczos"}', '{"crop": 224}', "[1, 2]", "not json"])
def test_bad_preprocessing_json_is_one_line(
    content: str, tmp_path: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prep = tmp_path / "prep.json"
    prep.write_text(content)
    assert main(["convert", str(tiny_onnx), "-o", str(tmp_path / "out"), "--preprocess", str(prep), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeship convert: error:") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_preprocessing_flags_reach_the_card(tmp_path: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                str(tiny_onnx),
                "-o",
                str(out),
                "-q",
                "--mean",
                "0.5,0.5,0.5",
                "--std",
                "0.5,0.5,0.5",
                "--bgr",
                "--resize",
                "0",
            ]
        )
        == 0
    )
    prep = json.loads((out / "model_card.json").read_text())["preprocessing"]
    assert prep["mean"] == [0.5, 0.5, 0.5] and prep["color_order"] == "BGR" and prep["resize_shorter"] is None
    assert prep["crop"] == [32, 32]


@pytest.mark.parametrize("float16", [False, True])
def test_onnx2tf_converts_to_float16_only_when_asked(tmp_path: Path, tiny_onnx: Path, float16: bool) -> None:
    """onnx2tf converts twice (float32, then float16, each a full TFLite conversion); the second runs only
    for a float16 target, and the float32 model is the same either way."""
    from edgeship.convert.onnx2tf_run import run_onnx2tf

    run_onnx2tf(tiny_onnx, tmp_path, float16=float16)
    made = {p.name for p in (tmp_path / "tf").glob("*.tflite")}
    assert made == ({"model_float32.tflite", "model_float16.tflite"} if float16 else {"model_float32.tflite"})
