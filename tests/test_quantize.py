"""quantize: real int8 models from tiny and real classifiers, bad calibration folders, I/O dtypes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeship.cli import main
from edgeship.quantize.options import CalibrationMethod
from edgeship.quantize.ranges import RANGE_METHODS, Histogram, mse, percentile
from edgeship.runtime import Classifier
from edgeship.runtime.interpreter import TFLiteModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, calib_images: Path) -> Path:
    out = tmp_path_factory.mktemp("q") / "int8"
    assert (
        main(
            [
                "quantize",
                str(tiny_bundle),
                "--calib",
                str(calib_images),
                "-o",
                str(out),
                "-q",
                "--num-calib",
                "20",
            ]
        )
        == 0
    )
    return out


def test_tiny_int8_outputs_and_report(tiny_int8: Path) -> None:
    names = {p.name for p in tiny_int8.iterdir()}
    assert {"model_int8.tflite", "model_int8.card.json", "quant_report.json", "layer_errors.png"} <= names
    report = json.loads((tiny_int8 / "quant_report.json").read_text())
    assert report["calibration"]["count"] == 20 and report["evaluation"]["count"] == 10
    assert report["calibration"]["skipped_files"] == 2  # notes.txt and broken.jpg
    assert len(report["calibration"]["file_list_sha256"]) == 64
    assert report["evaluation"]["held_apart_from_calibration"]
    assert report["sizes"]["int8"] == (tiny_int8 / "model_int8.tflite").stat().st_size  # tiny: headers dominate
    assert report["bias_correction"]["ops"] == ["DEPTHWISE_CONV_2D"]  # per-channel: the depthwise ones by default
    assert report["runs_on"]["float_logits"]  # the scores' layer writes float
    assert report["worst_layers"] and {"rmse_per_scale", "sqnr_db", "name"} <= set(report["worst_layers"][0])
    assert 0.0 <= report["figures"]["top1_agreement"] <= 1.0
    assert report["versions"]["tensorflow"] and report["timings_s"]["calibrate"] > 0
    model = TFLiteModel(tiny_int8 / "model_int8.tflite")
    assert model.input.dtype == np.int8 and model.output.dtype == np.float32
    with Image.open(tiny_int8 / "layer_errors.png") as im:
        assert im.size[0] > 200


def test_int8_agrees_with_float_on_tiny(tiny_int8: Path, tiny_bundle: Path, calib_images: Path) -> None:
    q = Classifier.load(tiny_int8 / "model_int8.tflite")
    f = Classifier.load(tiny_bundle)
    files = sorted(calib_images.glob("img_2*"))
    cos = []
    for path in files:
        a, b = f.logits(path), q.logits(path)
        cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert min(cos) > 0.98, cos


@pytest.mark.parametrize("io", ["uint8", "float32"])
def test_io_dtypes(io: str, tmp_path: Path, tiny_bundle: Path, calib_images: Path, tiny_int8: Path) -> None:
    out = tmp_path / io
    assert (
        main(
            [
                "quantize",
                str(tiny_bundle),
                "--calib",
                str(calib_images),
                "-o",
                str(out),
                "-q",
                "--num-calib",
                "20",
                "--io",
                io,
            ]
        )
        == 0
    )
    model = TFLiteModel(out / "model_int8.tflite")
    assert model.input.dtype == np.dtype(io) and model.output.dtype == np.float32  # float logits, whatever the input
    assert (
        "DEQUANTIZE" in model.op_names()
        and json.loads((out / "quant_report.json").read_text())["runs_on"]["float_logits"]
    )
    # The runtime (de)quantizes whatever the I/O is: all three models answer alike.
    probe = sorted(calib_images.glob("img_2*"))[0]
    ref = Classifier.load(tiny_int8 / "model_int8.tflite").logits(probe)
    got = Classifier.load(out / "model_int8.tflite").logits(probe)
    assert np.max(np.abs(ref - got)) < 0.05 * max(1.0, float(np.max(np.abs(ref))))


def test_int8_logits_keep_the_scores_on_the_int8_grid(tiny_bundle: Path, calib_images: Path, tmp_path: Path) -> None:
    """``--int8-logits``: the full-integer output (and, for uint8 I/O, a QUANTIZE op at both ends)."""
    from edgeship.quantize import QuantizeResult

    out = tmp_path / "grid"
    args = ["quantize", str(tiny_bundle), "--calib", str(calib_images), "-o", str(out), "-q", "--num-calib", "20"]
    assert main([*args, "--int8-logits"]) == 0
    q = QuantizeResult.load(out)
    assert TFLiteModel(q.model).output.dtype == np.int8 and q.report.runs_on.float_logits is None
    u = q.with_io("uint8")
    assert TFLiteModel(u.model).output.dtype == np.uint8 and u.report.ops["QUANTIZE"] == 2


def test_quantize_straight_from_onnx(tmp_path: Path, tiny_onnx: Path, calib_images: Path) -> None:
    out = tmp_path / "out"
    assert (
        main(["quantize", str(tiny_onnx), "--calib", str(calib_images), "-o", str(out), "-q", "--method", "percentile"])
        == 0
    )
    assert (out / "model_float32.tflite").is_file() and (out / "model_int8.tflite").is_file()
    assert json.loads((out / "quant_report.json").read_text())["ranges"]["method"] == "percentile"


def _folder(tmp: Path, count: int, extra: dict[str, bytes] | None = None) -> Path:
    folder = tmp / f"imgs{count}"
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (40, 40), (i * 7 % 255, 30, 90)).save(folder / f"{i}.png")
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "count, needle",
    [
        (0, "calibration needs at least 10"),
        (5, "calibration needs at least 10"),
        (11, "only 9 calibration image(s) left after holding out 2 for evaluation; at least 10 needed"),
    ],
)
def test_too_few_images_nothing_written(
    count: int, needle: str, tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _folder(tmp_path, count, {"readme.md": b"x", "fake.jpg": b"nope"})
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_bundle), "--calib", str(folder), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert "2 other file(s) skipped" in err or count >= 10
    assert not out.exists()


def test_missing_folder_and_bad_model(
    tmp_path: Path, tiny_bundle: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quantize", str(tiny_bundle), "--calib", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "does not exist" in capsys.readouterr().err
    not_convert = tmp_path / "plain"
    not_convert.mkdir()
    assert main(["quantize", str(not_convert), "--calib", str(calib_images), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "not an edgeship convert folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_folder_must_not_overlap(
    tmp_path: Path, tiny_bundle: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "quantize",
                str(tiny_bundle),
                "--calib",
                str(calib_images),
                "--eval",
                str(calib_images),
                "-o",
                str(tmp_path / "o"),
                "-q",
            ]
        )
        == 1
    )
    assert "also calibration images" in capsys.readouterr().err


def test_existing_outputs_need_force(
    tiny_int8: Path, tiny_bundle: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quantize", str(tiny_bundle), "--calib", str(calib_images), "-o", str(tiny_int8), "-q"]) == 1
    assert "--force" in capsys.readouterr().err


def test_range_methods_registry_and_math() -> None:
    assert set(RANGE_METHODS) == set(CalibrationMethod)
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 100_000), [40.0, -35.0]])  # two outliers
    counts, edges = np.histogram(values, bins=2048)
    hist = Histogram(float(edges[0]), float(edges[-1]), counts)
    lo, hi = percentile(hist, 99.9)
    assert -4.5 < lo < -2.5 and 2.5 < hi < 4.5
    # Laplace tails: the MSE-optimal 8-bit clip is about 9.9 b (Banner et al., ACIQ), below the sample max.
    lap = rng.laplace(0, 1, 200_000)
    counts, edges = np.histogram(lap, bins=2048)
    lo, hi = mse(Histogram(float(edges[0]), float(edges[-1]), counts), 0)
    assert 7 < hi < 0.95 * edges[-1] and 0.95 * edges[0] < lo < -7


def test_uint8_interface_is_the_int8_model_rewritten_exactly(
    tiny_int8: Path, calib_images: Path, tmp_path: Path
) -> None:
    """A saved result loads back; ``with_io("uint8")`` adds a QUANTIZE op at the input (the float logits stay
    float) and answers bit for bit alike."""
    from edgeship.errors import InputError
    from edgeship.quantize import QuantizeResult

    q = QuantizeResult.load(tiny_int8)
    assert q.within_budget and q.model == (tiny_int8 / "model_int8.tflite").read_bytes()
    assert (
        q.figures.top1_agreement
        == json.loads((tiny_int8 / "quant_report.json").read_text())["figures"]["top1_agreement"]
    )
    u = q.with_io("uint8").save(tmp_path / "u8")
    model = TFLiteModel(u.model)
    assert model.input.dtype == np.uint8 and model.output.dtype == np.float32
    assert model.input.zero_point == TFLiteModel(q.model).input.zero_point + 128
    assert u.report.interface is not None and u.report.interface.rewritten_from == "int8"
    assert u.report.ops["QUANTIZE"] == 1
    for path in sorted(calib_images.glob("img_2*")):
        a = Classifier.load(tiny_int8 / "model_int8.tflite").logits(path)
        b = Classifier.load(tmp_path / "u8" / "model_int8.tflite").logits(path)
        assert np.array_equal(a, b)
    with pytest.raises(InputError, match="not float32"):
        q.with_io("float32")
    with pytest.raises(InputError, match="no saved quantize result"):
        QuantizeResult.load(tmp_path)


def test_max_drop_counts_top1_against_labels_when_known() -> None:
    """--max-drop: accuracy points lost against labels when known, agreement with float otherwise."""
    from edgeship.quantize import layers, search
    from edgeship.quantize.options import QuantizeOptions
    from edgeship.runtime.metrics import DriftFigures

    labelled = DriftFigures(100, 0.95, 0.99, 0.9, 1.0, 20.0, ref_top1=0.80, cand_top1=0.79)
    unlabelled = DriftFigures(100, 0.95, 0.99, 0.9, 1.0, 20.0)
    assert search.accuracy_drop(labelled) == 1.0 and search.accuracy_drop(unlabelled) == 5.0

    class Judged:  # every float layer kept lifts agreement by one point
        def figures(self, model: bytes, progress: object, label: str = "") -> DriftFigures:
            return DriftFigures(100, 0.95 + 0.01 * model.count(b"+"), 0.99, 0.9, 1.0, 20.0)

    errs = [layers.LayerError(f"l{i}", "CONV_2D", 0.1, 0.1, 1.0, 10.0 - i, 30.0) for i in range(4)]
    options = QuantizeOptions(max_drop=2.0)
    quantized = lambda calibrated, denied: (b"+" * len(denied), {})  # noqa: E731
    _, figs, kept, within = search.accuracy_aware(
        quantized, b"", (b"", labelled), errs, Judged(), options, lambda *a: None
    )
    assert within and kept == () and figs is labelled  # 1 point lost against labels: inside 2 points
    _, figs, kept, within = search.accuracy_aware(
        quantized, b"", (b"", unlabelled), errs, Judged(), options, lambda *a: None
    )
    assert within and len(kept) == 3 and figs.top1_agreement == pytest.approx(0.98)


def test_bias_correction_leaves_convolutions_a_mixed_model_keeps_float(tiny_bundle: Path) -> None:
    """A mixed model's float convolution has a float bias: bias correction corrects only the int8 ones."""
    from edgeship.quantize import tflite_quant
    from edgeship.quantize.bias_correction import correct_biases
    from edgeship.quantize.tflite_quant import op_names_by_output

    float_model = (tiny_bundle / "model_float32.tflite").read_bytes()
    spec = TFLiteModel(tiny_bundle / "model_float32.tflite").input
    x = np.random.default_rng(0).uniform(-1, 1, (12, *spec.shape[1:])).astype(np.float32)
    calibrated = tflite_quant.calibrate(float_model, x)
    convs = [name for name, op in op_names_by_output(calibrated).items() if op == "CONV_2D"]
    mixed = tflite_quant.quantize_calibrated(calibrated, denylisted_nodes=convs[:1])
    q_in = TFLiteModel(mixed).input
    xq = np.clip(np.round(x / q_in.scale + q_in.zero_point), -128, 127).astype(np.int8)
    corrected, report = correct_biases(mixed, calibrated, x, xq, min_count=1)
    assert report["layers"] == len(convs) - 1  # the float one is left alone (the scores come from a dense layer)
    assert TFLiteModel(corrected).input.dtype == np.int8


def test_quant_report_is_typed_and_round_trips(tiny_int8: Path, tmp_path: Path) -> None:
    """quant_report.json reads into a QuantizeReport and writes back key for key; results carry the value."""
    from edgeship._version import SCHEMA_VERSION
    from edgeship.quantize import QuantizeResult
    from edgeship.quantize.report import QuantizeReport

    doc = json.loads((tiny_int8 / "quant_report.json").read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["edgeship_report"] == "quantize"
    report = QuantizeReport.from_dict(doc)
    assert report.to_dict() == doc
    q = QuantizeResult.load(tiny_int8)
    assert q.report == report and q.figures == report.figures and report.output == "model_int8.tflite"
    assert report.calibration.count == doc["calibration"]["count"] and report.options.num_calib == 20
    assert report.runs_on.delegation.partitions >= 1 and report.sizes.int8 == len(q.model)
    u = q.with_io("uint8").save(tmp_path / "u8")
    saved = json.loads((tmp_path / "u8" / "quant_report.json").read_text())
    assert saved["interface"] == {"rewritten_from": "int8", "to": "uint8", "exact": True}
    assert saved["options"]["io"] == "uint8" and QuantizeReport.from_dict(saved) == u.report


def test_raise_for_budget_reads_the_report_fields(tiny_int8: Path) -> None:
    """An over-budget result names the budget, the float ops kept, the speed verdict and why the search fell short."""
    from dataclasses import replace

    from edgeship.errors import AccuracyDriftError
    from edgeship.quantize import QuantizeResult
    from edgeship.quantize.search_report import MixedPrecision

    q = QuantizeResult.load(tiny_int8)
    r = q.report
    mixed = MixedPrecision(99.0, searched=True, float_ops=3, int8_output_limit_db=40.0)
    over = replace(
        q,
        within_budget=False,
        report=replace(
            r,
            options=replace(r.options, min_sqnr_db=99.0, float_islands=True),
            mixed_precision=mixed,
            speed=replace(r.speed, verdict="too slow here"),
        ),
    )
    with pytest.raises(AccuracyDriftError, match="99.0 dB after keeping 3 op") as err:
        over.raise_for_budget()
    assert "too slow here" in str(err.value) and "hold only 40.0 dB" in str(err.value)


def test_cli_summary_reads_the_typed_report(tiny_int8: Path) -> None:
    """The quantize summary comes from the report's fields: the budget search's line names what it kept float."""
    from dataclasses import replace

    from edgeship.cli import _quant_summary
    from edgeship.quantize import QuantizeResult
    from edgeship.quantize.op_groups import Candidate
    from edgeship.quantize.search_report import MixedPrecision

    report = QuantizeResult.load(tiny_int8).report
    lines = _quant_summary(report)
    assert lines[0].startswith(f"wrote model_int8.tflite ({report.sizes.int8 / 1e6:.2f} MB")
    assert f"calibrated on {report.calibration.count} images (auto)" in lines[1]
    lo, hi = report.figures.agreement_interval  # the agreement's 95 % interval on the line (issue 33)
    assert any(f"(95% CI {lo:g}..{hi:g})" in line for line in lines)
    mixed = MixedPrecision(
        30.0,
        searched=True,
        kept_float=(Candidate("HARD_SWISH x2 1/2", ("a", "b"), 3.0),),
        eval_sqnr_db_all_int8=21.04,
        eval_sqnr_db=31.06,
        latency_ms_1_thread={"float32": 2.0, "all_int8": 1.0, "budgeted": 1.25},
    )
    last = _quant_summary(replace(report, mixed_precision=mixed))[-1]
    assert last == (
        "  SQNR budget 30.0 dB: kept float HARD_SWISH x2 1/2 (2); SQNR 21.0 -> 31.1 dB; "
        "1-thread ms float32 2.00, all_int8 1.00, budgeted 1.25"
    )


def test_bias_correction_undoes_a_shift_put_into_a_convolutions_bias(tiny_bundle: Path) -> None:
    """A shift of 4 output steps added to one int8 conv's int32 bias comes back out (within one step)."""
    from edgeship import tflite_graph
    from edgeship.quantize import tflite_quant
    from edgeship.quantize.bias_correction import correct_biases

    float_model = (tiny_bundle / "model_float32.tflite").read_bytes()
    spec = TFLiteModel(tiny_bundle / "model_float32.tflite").input
    x = np.random.default_rng(1).uniform(-1, 1, (24, *spec.shape[1:])).astype(np.float32)
    calibrated = tflite_quant.calibrate(float_model, x)
    quant = tflite_quant.quantize_calibrated(calibrated)
    q_in = TFLiteModel(quant).input
    xq = np.clip(np.round(x / q_in.scale + q_in.zero_point), -128, 127).astype(np.int8)
    clean, _ = correct_biases(quant, calibrated, x, xq, min_count=1)

    def first_conv_bias(model: bytes) -> tuple[np.ndarray, float]:
        obj = tflite_graph.read(model)
        sub = obj.subgraphs[0]
        op = next(op for op in sub.operators if tflite_graph.op_name(obj, op) == "CONV_2D")
        bias, out = sub.tensors[op.inputs[2]], sub.tensors[op.outputs[0]]
        steps = float(out.quantization.scale[0]) / np.asarray(bias.quantization.scale, dtype=np.float64)
        return np.frombuffer(bytes(bytearray(obj.buffers[bias.buffer].data)), dtype=np.int32), steps

    def with_bias(model: bytes, value: np.ndarray) -> bytes:
        obj = tflite_graph.read(model)
        sub = obj.subgraphs[0]
        op = next(op for op in sub.operators if tflite_graph.op_name(obj, op) == "CONV_2D")
        obj.buffers[sub.tensors[op.inputs[2]].buffer].data = value.astype(np.int32).view(np.uint8)
        return tflite_graph.write(obj)

    bias, step = first_conv_bias(clean)
    shifted = with_bias(clean, bias + np.round(4 * step).astype(np.int64))
    corrected, report = correct_biases(shifted, calibrated, x, xq, min_count=1)
    back, _ = first_conv_bias(corrected)
    assert report["max_layer_shift_in_steps"] > 2
    assert np.all(np.abs(back - bias) <= step)


def test_bias_correction_in_batches_of_layers_makes_the_same_model(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float outputs held for one layer at a time (the float model run again per layer) or for all layers at once:
    the same corrected model, byte for byte."""
    from edgeship import tflite_graph
    from edgeship.quantize import bias_correction, tflite_quant

    float_model = (tiny_bundle / "model_float32.tflite").read_bytes()
    spec = TFLiteModel(tiny_bundle / "model_float32.tflite").input
    x = np.random.default_rng(2).uniform(-1, 1, (16, *spec.shape[1:])).astype(np.float32)
    calibrated = tflite_quant.calibrate(float_model, x)
    quant = tflite_quant.quantize_calibrated(calibrated)
    q_in = TFLiteModel(quant).input
    xq = np.clip(np.round(x / q_in.scale + q_in.zero_point), -128, 127).astype(np.int8)
    monkeypatch.setattr(bias_correction, "FLOAT_BYTES", 1)
    convs = bias_correction._convs(tflite_graph.read(quant), tflite_graph.read(calibrated), ("CONV_2D",))
    assert len(convs) == 2 and len(bias_correction._batches(convs, len(x))) == 2
    one_by_one, _ = bias_correction.correct_biases(quant, calibrated, x, xq, min_count=1)
    monkeypatch.setattr(bias_correction, "FLOAT_BYTES", 2**40)
    all_at_once, _ = bias_correction.correct_biases(quant, calibrated, x, xq, min_count=1)
    assert one_by_one == all_at_once and one_by_one != quant


def test_bias_correction_is_asked_for_on_a_per_channel_model(
    tiny_bundle: Path, calib_images: Path, tmp_path: Path
) -> None:
    """``--bias-correction`` corrects every convolution but the scores' (off by default for per-channel)."""
    out = tmp_path / "bc"
    args = ["quantize", str(tiny_bundle), "--calib", str(calib_images), "-o", str(out), "-q", "--num-calib", "20"]
    assert main([*args, "--bias-correction"]) == 0
    report = json.loads((out / "quant_report.json").read_text())
    assert report["bias_correction"]["enabled"] and report["bias_correction"]["layers"] == 2
