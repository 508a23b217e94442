"""int8 ONNX QDQ models for onnxruntime targets: the writer on the real MobileNetV2, the runtime's onnxruntime
backend (Classifier, ``python -m edgeship.runtime``, the drift check's staging), as users run them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeship.errors import InputError
from edgeship.quantize import onnx_qdq
from edgeship.quantize.onnx_qdq import QDQ_CARD_FILE, QDQ_FILE, QDQ_REPORT_FILE, QdqOptions, quantize_qdq
from edgeship.runtime import Classifier
from edgeship.runtime.card import ModelCard
from edgeship.verify.drift import resolve_candidate, stage_candidate

#: Heavy host packages the device side must not need (onnxruntime is allowed: it is the ONNX model's runtime).
BLOCK_HOST_TOOLS = textwrap.dedent("""
    import sys
    for name in ("tensorflow", "onnx", "onnx2tf", "onnxsim", "tf_keras", "keras", "ai_edge_litert", "tflite_runtime"):
        sys.modules[name] = None  # any import of these now raises ImportError
""")
MACAW = 88


@pytest.fixture(scope="module")
def qdq_folder(tmp_path_factory: pytest.TempPathFactory, real_bundle: Path, assets: Path) -> Path:
    """MobileNetV2's QDQ model, calibrated on 16 images chosen as the TFLite path does, measured on 48 others."""
    out = tmp_path_factory.mktemp("qdq")
    result = quantize_qdq(
        real_bundle, assets / "data" / "imagenet-sample", options=QdqOptions(num_calib=16, max_eval=48)
    )
    result.save(out)
    return out


def test_writer_calibrates_like_the_tflite_path_and_stays_close_to_float(qdq_folder: Path, real_bundle: Path) -> None:
    report = json.loads((qdq_folder / QDQ_REPORT_FILE).read_text())
    assert report["calibration"]["count"] == 16 and report["evaluation"]["count"] == 48
    assert report["calibration"]["selection"].startswith("round-robin")  # the TFLite path's choice
    assert report["evaluation"]["held_apart_from_calibration"] is True
    figures = report["figures"]
    # 16 calibration images: looser than the 100-image budget, far from a broken model (random: ~0 %, ~0 dB)
    assert figures["top1_agreement"] >= 0.9 and figures["sqnr_db"] >= 15, figures
    kernels = report["runtime"]["kernels"]
    assert kernels.get("QLinearConv", 0) >= 30, kernels  # onnxruntime fused the QDQ convolutions to int8 kernels
    assert report["opset"] <= onnx_qdq.MAX_OPSET and report["ir_version"] <= onnx_qdq.MAX_IR_VERSION
    model = onnx.load(str(qdq_folder / QDQ_FILE))
    assert not [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]  # standard ops only
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    per_channel = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)
    ]
    assert per_channel, "weights should be per-channel"
    card = ModelCard.load(qdq_folder / QDQ_CARD_FILE)
    assert card.model_file == QDQ_FILE and card.precision == "int8" and card.runtime == "onnxruntime"
    assert card.input.dtype == "int8" and card.input.layout == "NCHW" and card.input.scale
    float_card = ModelCard.load(real_bundle)
    assert card.preprocessing == float_card.preprocessing and card.labels_file == float_card.labels_file
    assert card.labels_file  # the conversion's labels, written beside the model (a bundle ships them)
    assert (qdq_folder / card.labels_file).read_bytes() == (real_bundle / card.labels_file).read_bytes()


def test_command_refuses_to_overwrite(qdq_folder: Path, real_bundle: Path, assets: Path) -> None:
    before = (qdq_folder / QDQ_FILE).read_bytes()
    cmd = [sys.executable, "-m", "edgeship.quantize.onnx_qdq", str(real_bundle), "--calib", str(assets / "data")]
    out = subprocess.run([*cmd, "-o", str(qdq_folder)], capture_output=True, text=True, check=False)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "exists" in out.stderr, out.stderr
    assert (qdq_folder / QDQ_FILE).read_bytes() == before


def test_options_refuse_bad_values() -> None:
    with pytest.raises(InputError, match="method must be one of"):
        QdqOptions(method="kl")
    with pytest.raises(InputError, match="io must be"):
        QdqOptions(io="uint8")


def _with_labels(qdq_folder: Path, real_bundle: Path) -> Path:
    """The QDQ model, its card and the conversion's labels in one folder, as a bundle would hold them."""
    card = ModelCard.load(qdq_folder / QDQ_CARD_FILE)
    if card.labels_file and not (qdq_folder / card.labels_file).exists():
        (qdq_folder / card.labels_file).write_bytes((real_bundle / card.labels_file).read_bytes())
    return qdq_folder / QDQ_FILE


def test_classifier_runs_the_qdq_model_on_onnxruntime_without_host_tools(
    qdq_folder: Path, real_bundle: Path, assets: Path
) -> None:
    model = _with_labels(qdq_folder, real_bundle)
    code = BLOCK_HOST_TOOLS + textwrap.dedent(f"""
        import json
        from edgeship.runtime import Classifier
        clf = Classifier.load({str(model)!r})
        top = clf.predict({str(assets / "data" / "images" / "parrot.jpg")!r}, top_k=3)
        info = clf.describe()
        loaded = [m for m in ("tensorflow", "onnx", "tflite_runtime") if sys.modules.get(m) is not None]
        print(json.dumps({{"top": top[0].class_index, "label": top[0].label, "info": info, "loaded": loaded}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["top"] == MACAW and "macaw" in got["label"], got
    info = got["info"]
    assert info["interpreter"] == "onnxruntime" and info["interpreter_version"]
    assert info["execution_provider"] == "CPUExecutionProvider"
    assert info["kernel_kinds"]["int8"] >= 30 and info["input"]["dtype"] == "int8"
    assert not got["loaded"]


def test_runtime_cli_names_onnxruntime_and_its_kernels(qdq_folder: Path, real_bundle: Path, assets: Path) -> None:
    model = _with_labels(qdq_folder, real_bundle)
    parrot = assets / "data" / "images" / "parrot.jpg"
    out = subprocess.run(
        [sys.executable, "-m", "edgeship.runtime", str(model), str(parrot), "-k", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    first, _, pred = out.stdout.splitlines()
    assert "on onnxruntime" in first and "CPUExecutionProvider" in first and "int8" in first, first
    assert f"{MACAW:5d}" in pred and "macaw" in pred


def test_a_tflite_model_does_not_import_onnxruntime(real_bundle: Path, assets: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from edgeship.runtime import Classifier
        Classifier.load({str(real_bundle)!r}).predict({str(assets / "data" / "images" / "parrot.jpg")!r})
        assert sys.modules.get("onnxruntime") is None, "onnxruntime imported for a TFLite model"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_not_an_onnx_file_is_one_line(tmp_path: Path, qdq_folder: Path, assets: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\xff\xd8 not a protobuf" * 10)
    card = ModelCard.load(qdq_folder / QDQ_CARD_FILE).with_(model_file="model.onnx", labels_file=None)
    (tmp_path / "model.card.json").write_text(json.dumps(card.to_dict()))
    out = subprocess.run(
        [sys.executable, "-m", "edgeship.runtime", str(bad), str(assets / "data" / "images" / "parrot.jpg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "not an ONNX model" in out.stderr, out.stderr
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes((qdq_folder / QDQ_FILE).read_bytes()[:5000])
    with pytest.raises(InputError, match="onnxruntime .* cannot load"):
        Classifier.load(truncated, preprocessing=card.preprocessing)


def test_drift_check_stages_the_onnx_model_under_its_own_name(qdq_folder: Path, tmp_path: Path) -> None:
    path, card, _ = resolve_candidate(qdq_folder / QDQ_FILE)
    assert path.name == QDQ_FILE
    staged, staged_card, _, _ = stage_candidate(qdq_folder / QDQ_FILE, tmp_path / "bundle")
    assert staged_card.model_file == "model.onnx" and (staged / "model.onnx").is_file()
    clf = Classifier.load(staged)
    assert clf.describe()["interpreter"] == "onnxruntime"
    x = np.zeros(clf.model.input.shape, np.float32)
    assert clf.model.run(x).shape == (1, card.num_classes)
