"""The Python API: stages called directly, exchanging typed values (issue 11).

The README's snippet runs as written on the real MobileNetV2 with 40 in-memory arrays as
calibration data; the rest checks the values' round trips, the one place target rules
and devices are built, and that the on-device runtime imports nothing host-side.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeship
from edgeship.errors import AccuracyDriftError, InputError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]


def _arrays(folder: Path, count: int) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


@pytest.fixture(scope="module")
def snippet(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The README's snippet, as written, on the real model (40 arrays as calibration data)."""
    from edgeship import ConvertOptions, QuantizeOptions

    model = str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx")
    images = assets / "data" / "imagenet-sample"
    calibration = _arrays(images, 40)
    out = tmp_path_factory.mktemp("api") / "out"

    conv = edgeship.convert(model, options=ConvertOptions())
    q = edgeship.quantize(conv, calibration, options=QuantizeOptions())
    q.save(out)
    d = edgeship.verify(model, q, images, target="x86-host", device=None, max_images=100)
    return {"conv": conv, "q": q, "d": d, "out": out}


@pytest.fixture(scope="module")
def tiny_conv(tiny_onnx: Path) -> object:
    return edgeship.convert(tiny_onnx)


@pytest.mark.slow
def test_snippet_runs_on_real_mobilenetv2(snippet: dict[str, object]) -> None:
    conv, q, d, out = snippet["conv"], snippet["q"], snippet["d"], snippet["out"]
    assert conv.folder is None and conv.model[4:8] == b"TFL3"  # nothing was written by convert
    assert q.model[4:8] == b"TFL3" and q.card.precision == "int8" and q.within_budget
    # 40 arrays: 32 calibrate, the last 8 are held apart and measured.
    assert q.report.calibration.count == 32 and q.figures.count == 8
    assert q.report.calibration.source == "arrays"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model_int8.tflite", "model_int8.card.json", "quant_report.json", "layer_errors.png"]
    )
    assert (out / "model_int8.tflite").read_bytes() == q.model
    assert d.figures.count == 100 and d.figures.top1_agreement >= 0.9, d.figures
    assert d.passed == (not d.failures)
    if d.passed:
        d.raise_for_budget()
    else:
        with pytest.raises(AccuracyDriftError):
            d.raise_for_budget()


@pytest.mark.slow
def test_results_round_trip_through_dicts(snippet: dict[str, object]) -> None:
    from edgeship.convert import ConvertResult
    from edgeship.quantize import QuantizeResult

    conv, q = snippet["conv"], snippet["q"]
    doc = json.loads(json.dumps(conv.to_dict()))
    again = ConvertResult.from_dict(doc, model=conv.model, simplified_onnx=conv.simplified_onnx)
    assert again.card == conv.card and again.model == conv.model
    with pytest.raises(InputError, match="sha256"):
        ConvertResult.from_dict(doc, model=conv.model + b"x")
    qdoc = json.loads(json.dumps(q.to_dict(), default=str))
    assert QuantizeResult.from_dict(qdoc, model=q.model).figures == q.figures
    assert qdoc["source"]["model_sha256"] == doc["model_sha256"]


def test_stage_packages_are_callable_whatever_was_imported_first() -> None:
    code = (
        "import edgeship.quantize.pipeline, edgeship.convert.result, edgeship.verify.drift, edgeship\n"
        "assert all(callable(getattr(edgeship, s)) for s in ('convert', 'quantize', 'verify'))\n"
        "assert edgeship.convert.ConvertOptions is edgeship.ConvertOptions\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_imports_nothing_host_side() -> None:
    code = (
        "import sys, edgeship.runtime, edgeship.runtime.candidate, edgeship.runtime.collect, edgeship.runtime.bench\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'tensorflow', 'onnx2tf'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in (ROOT / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                # onnxruntime is a device runtime (armv7 on trixie): only ort_model.py names it, in a function
                device_ort = path.name == "ort_model.py" and name == "onnxruntime"
                assert device_ort or name.split(".")[0] not in ("onnx", "onnxruntime", "tensorflow", "onnx2tf"), (
                    path,
                    name,
                )
                assert not name.startswith(("edgeship.convert", "edgeship.quantize", "edgeship.verify")), (path, name)


def test_over_budget_is_a_result_not_a_lost_exception(tiny_conv: object, calib_images: Path, tmp_path: Path) -> None:
    from edgeship.errors import OutputExistsError
    from edgeship.quantize import QuantizeOptions

    q = edgeship.quantize(
        tiny_conv, calib_images, options=QuantizeOptions(num_calib=20, min_sqnr_db=99.0, float_islands=False)
    )
    assert not q.within_budget and q.model_file == "model_int8_OVER_BUDGET.tflite"
    with pytest.raises(AccuracyDriftError, match="SQNR budget of 99.0 dB"):
        q.raise_for_budget()
    saved = q.save(tmp_path / "q")
    assert (tmp_path / "q" / "model_int8_OVER_BUDGET.tflite").read_bytes() == q.model
    assert not (tmp_path / "q" / "model_int8.tflite").exists()
    with pytest.raises(AccuracyDriftError, match=str(saved.model_path)):
        saved.raise_for_budget()
    within = edgeship.quantize(tiny_conv, calib_images, options=QuantizeOptions(num_calib=20))
    with pytest.raises(OutputExistsError):  # the earlier outcome's files are outputs too: kept without force
        within.save(tmp_path / "q")
    assert (tmp_path / "q" / "model_int8_OVER_BUDGET.tflite").is_file()
    within.save(tmp_path / "q", force=True)
    assert (tmp_path / "q" / "model_int8.tflite").is_file() and not (
        tmp_path / "q" / "model_int8_OVER_BUDGET.tflite"
    ).exists()


def test_arrays_and_folders_give_the_same_pixels(tiny_conv: object, tiny_images: Path) -> None:
    from edgeship.quantize import data

    prep = tiny_conv.card.preprocessing
    from PIL import Image

    files = sorted(tiny_images.iterdir())
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    split = data.Split(num_calib=8, min_calib=2)
    calib_a, eval_a = data.from_arrays(arrays, None, split, prep)
    calib_f, eval_f = data.from_folders(tiny_images, None, split, prep, None)
    assert np.array_equal(calib_a.pixels, calib_f.pixels) and np.array_equal(eval_a.pixels, eval_f.pixels)
    assert calib_a.report.selection == "evenly spaced"
    assert calib_f.report.selection == "evenly spaced over the sorted list"
    first, given = data.from_arrays(arrays[:8], arrays[8:], split, prep)
    assert not np.array_equal(calib_a.pixels, first.pixels), "evenly spaced, not the first 8"
    assert len(given) == 4 and given.report.held_apart_from_calibration is False
    calib_b, eval_b = data.from_arrays(arrays, None, data.Split(num_calib=5, min_calib=2), prep)
    assert len(calib_b) == 5 and len(eval_b) == 7  # like a folder: the rest are evaluated
    calib_c, eval_c = data.from_arrays(arrays, None, data.Split(num_calib=50, min_calib=2), prep)
    assert len(calib_c) == 10 and len(eval_c) == 2  # fewer than num_calib: eval_split held apart


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), "a.jpg"])
def test_bad_arrays_are_one_clear_error(tiny_conv: object, bad: object) -> None:
    with pytest.raises(InputError, match="calibration image 1 must be an HxWx3 uint8 RGB array"):
        edgeship.quantize(tiny_conv, [np.zeros((8, 8, 3), np.uint8), bad])


def test_bad_calibration_folder_is_found_before_converting(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgeship.quantize.source as source
    from edgeship.errors import CalibrationError

    monkeypatch.setattr(source, "convert", lambda *a, **k: pytest.fail("converted before listing the images"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="calibration needs at least 10"):
        edgeship.quantize(tiny_onnx, tmp_path / "empty")


def test_options_round_trip_and_target_rules() -> None:
    from edgeship.convert import ConvertOptions
    from edgeship.quantize import QuantizeOptions
    from edgeship.runtime.card import Preprocessing
    from edgeship.targets import load_target

    c = ConvertOptions(input_shape=(1, 3, 224, 224), images=Path("/x"), preprocessing=Preprocessing.imagenet(224, 224))
    assert ConvertOptions.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    q = QuantizeOptions(method="mse", max_drop=1.0)
    assert QuantizeOptions.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    with pytest.raises(InputError, match="unknown quantize option"):
        QuantizeOptions.from_dict({"eval_dir": "/x"})
    nnapi = QuantizeOptions.for_target(load_target("android-nnapi"), num_calib=50)
    assert (
        not nnapi.float_islands
        and nnapi.num_calib == 50
        and nnapi.min_sqnr_db == load_target("android-nnapi").budget.min_sqnr_db
    )
    assert QuantizeOptions.for_target(load_target("android-arm64-cpu")).io.value == "uint8"
    given = QuantizeOptions.for_target(load_target("x86-host"), io="float32", min_sqnr_db=25.0, float_islands=False)
    assert given.io.value == "float32" and given.min_sqnr_db == 25.0 and not given.float_islands
    # Timed placement measures here: only for XNNPACK targets of this machine's architecture.
    from edgeship.runtime.delegation import host_arch

    for name in ("x86-host", "rpi5-aarch64", "android-gpu"):
        target = load_target(name)
        placed = QuantizeOptions.for_target(target).timed_placement
        assert placed == (target.arch.value == host_arch() and target.execution.use_xnnpack), name
    assert not QuantizeOptions.for_target(load_target("rpi5-aarch64")).timed_placement or host_arch() == "aarch64"


def test_devices_are_built_in_one_place() -> None:
    from edgeship.targets import load_target
    from edgeship.targets.devices import DeviceSpec, LocalDevice, StagedDevice, make_device

    device, note = make_device(DeviceSpec("emulate"), load_target("x86-host"))
    assert isinstance(device, LocalDevice) and "--emulate runs aarch64 only" in str(note)
    device, note = make_device(DeviceSpec("emulate"), load_target("rpi4-aarch64"))
    assert isinstance(device, StagedDevice) and note is None
    device, note = make_device(DeviceSpec("ssh", host="pi@pi5"), load_target("x86-host"))
    assert isinstance(device, LocalDevice) and "not reached over ssh" in str(note)
    with pytest.raises(InputError, match="Python on the phone"):
        make_device(DeviceSpec("adb", host="serial"), load_target("android-arm64-cpu"))
    spec = DeviceSpec("ssh", host="pi@pi5:2222", identity=Path("/k"), pip_args=("--no-index",))
    assert DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def _fake_latencies(ms: dict[str, float]):  # type: ignore[no-untyped-def]
    def latencies(models, work, runs=60, stat="p50_ms"):  # type: ignore[no-untyped-def]  # speed.latencies' signature
        return {label: ms[label] for label in models}

    return latencies


@pytest.mark.parametrize(
    "ms, offered, words",
    [
        ({"float32": 2.0, "int8": 1.0, "all_int8": 1.0}, None, None),
        ({"float32": 1.0, "int8": 1.5, "all_int8": 1.5}, "float32", "SLOWER than float32"),
        ({"float32": 1.0, "int8": 0.9, "all_int8": 0.9}, None, "only 1.11x as fast as float32"),
        ({"float32": 1.0, "int8": 1.2, "all_int8": 0.5}, "all_int8", "model_int8_FAST.tflite (all-int8"),
    ],
)
def test_speed_check_says_when_int8_is_not_faster(
    ms: dict[str, float], offered: str | None, words: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edgeship.quantize import speed as speed_module
    from edgeship.runtime.metrics import DriftFigures

    monkeypatch.setattr(speed_module, "latencies", _fake_latencies(ms))
    written = b"mixed" if offered == "all_int8" else b"int8"
    speed = speed_module.speed_check(
        b"float", written, (b"int8", DriftFigures(8, 0.5, 0.9, 0.8, 1.0, 12.0)), tmp_path, 1.3, lambda *a: None
    )
    assert speed.measured and speed.speedup_vs_float32 == round(ms["float32"] / ms["int8"], 3)
    assert (speed.offered.kind if speed.offered else None) == offered
    assert (words is None) == (speed.verdict is None) and (words is None or words in str(speed.verdict))


@pytest.mark.parametrize("floor", [0.0, 0.5])
def test_a_low_speed_floor_never_hides_a_model_slower_than_float(
    floor: float, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from edgeship.quantize import speed as speed_module
    from edgeship.runtime.metrics import DriftFigures

    monkeypatch.setattr(speed_module, "latencies", _fake_latencies({"float32": 1.0, "int8": 1.5}))
    speed = speed_module.speed_check(
        b"float", b"int8", (b"int8", DriftFigures(8, 0.5, 0.9, 0.8, 1.0, 12.0)), tmp_path, floor, lambda *a: None
    )
    assert "SLOWER than float32" in str(speed.verdict) and speed.min_speedup == 1.0


def test_offered_all_int8_model_is_saved_beside_and_removed_later(
    tiny_conv: object, calib_images: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from edgeship.quantize import QuantizeOptions

    q = edgeship.quantize(tiny_conv, calib_images, options=QuantizeOptions(num_calib=20))
    assert q.report.speed.measured and q.report.speed.ms["float32"] > 0
    offered = replace(q, faster=q.model, report=replace(q.report, speed=replace(q.report.speed, verdict="slow")))
    offered.save(tmp_path / "q")
    assert (tmp_path / "q" / "model_int8_FAST.tflite").read_bytes() == q.model
    assert (
        json.loads((tmp_path / "q" / "model_int8_FAST.card.json").read_text())["model_file"] == "model_int8_FAST.tflite"
    )
    q.save(tmp_path / "q", force=True)
    assert not (tmp_path / "q" / "model_int8_FAST.tflite").exists()
