"""Artifacts that Android's own libraries load: TFLite Metadata, client I/O, MediaPipe Tasks' own path.

The MediaPipe tests run the real ``mediapipe`` package (the ``android`` extra, installed in CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship.cli import main
from edgeship.errors import TargetError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _mediapipe() -> None:
    pytest.importorskip("mediapipe", reason="mediapipe not installed: pip install 'edgeship[android]'")


# ---------------------------------------------------------------- values and targets
def test_folded_values_are_written_exactly() -> None:
    from edgeship.convert.fold import simple_value

    # What folding MobileNetV2's float32 Mul+Add gives, and values that must stay as they are.
    assert [simple_value(v) for v in (0.49999998555, 0.4999999984, 0.50000001417)] == [0.5, 0.5, 0.5]
    for v in (0.485, 0.229, 1 / 255, 1 / 127.5, 0.0, -1.0):
        assert simple_value(v) == v


def test_fold_of_a_float32_input_affine_gives_simple_values(tiny_onnx: Path) -> None:
    import onnx
    from onnx import helper, numpy_helper

    from edgeship.convert.fold import fold_input_affine
    from edgeship.runtime.card import Preprocessing

    prep = Preprocessing.imagenet(32, 32)
    std, mean = np.array(prep.std), np.array(prep.mean)
    scale = (std / 0.5).astype(np.float32).reshape(1, 3, 1, 1)  # ImageNet-normalised -> the network's [-1, 1]
    shift = ((mean - 0.5) / 0.5).astype(np.float32).reshape(1, 3, 1, 1)
    m = onnx.load(str(tiny_onnx))
    for n in m.graph.node:
        n.input[:] = ["s" if i == "x" else i for i in n.input]
    nodes = [helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Add", ["m", "b"], ["s"]), *m.graph.node]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend([numpy_helper.from_array(scale, "k"), numpy_helper.from_array(shift, "b")])
    _, folded, notes = fold_input_affine(m, "x", prep, 3)
    assert folded.mean == (0.5, 0.5, 0.5) and folded.std == (0.5, 0.5, 0.5), (folded, notes)


@pytest.mark.parametrize("shared_weight", [False, True])
def test_normalization_into_graph_is_exact(tiny_onnx: Path, shared_weight: bool) -> None:
    """Per-channel mean/std inside the graph: raw pixels in, the same logits out (Sub+conv form, else Mul+Add)."""
    import onnx
    import onnxruntime as ort

    from edgeship.convert.fold import normalization_into_graph, per_tensor
    from edgeship.runtime.card import Preprocessing
    from edgeship.runtime.images import normalize

    m = onnx.load(str(tiny_onnx))
    if shared_weight:  # the first conv's weights used elsewhere too: the fallback form
        from onnx import helper

        m.graph.node.append(helper.make_node("Identity", ["w1"], ["w1_copy"]))
        m.graph.output.append(helper.make_tensor_value_info("w1_copy", onnx.TensorProto.FLOAT, None))
    prep = Preprocessing.imagenet(32, 32)
    new, new_prep, notes = normalization_into_graph(m, "x", prep, 3)
    assert per_tensor(new_prep) and new_prep.pixel_scale == 1.0 and new_prep.mean == (0.0,)
    ops = [n.op_type for n in new.graph.node[:2]]
    assert ops == (["Mul", "Add"] if shared_weight else ["Sub", "Conv"]), ops
    assert "0..255 pixels" in notes[0]
    rng = np.random.default_rng(0)
    pixels = (rng.random((4, 32, 32, 3)) * 256).astype(np.uint8)

    def run(model: object, x: np.ndarray) -> np.ndarray:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(["logits"], {"x": x.transpose(0, 3, 1, 2).astype(np.float32)})[0]

    want = run(m, normalize(pixels, prep))
    got = run(new, pixels.astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    unchanged, same_prep, none = normalization_into_graph(
        m, "x", Preprocessing(crop=(32, 32), mean=(0.5,), std=(0.5,)), 3
    )
    assert unchanged is m and none == []


def test_android_targets_say_which_client() -> None:
    from edgeship.targets import load_target

    for name in ("android-arm64-cpu", "android-gpu", "android-nnapi", "android-nnapi-pertensor"):
        t = load_target(name)
        assert t.runtime.client.value == "mediapipe" and t.to_dict()["runtime"]["client"] == "mediapipe"
        assert t.model.io_dtype.value == ("float32" if t.model.precision.value == "float16" else "uint8")
    assert load_target("x86-host").runtime.client.value == "edgeship"


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ('client = "mediapipe"', 'client = "tflite-task-library"', "runtime.client must be one of"),
        ('io_dtype = "uint8"', 'io_dtype = "int8"', "io_dtype must be uint8"),
    ],
)
def test_client_field_is_validated(tmp_path: Path, old: str, new: str, expected: str) -> None:
    from edgeship.targets import load_target

    text = (Path(__file__).parents[1] / "targets" / "android-arm64-cpu.toml").read_text()
    path = tmp_path / "t.toml"
    path.write_text(text.replace(old, new))
    with pytest.raises(TargetError, match=expected):
        load_target(path)


# ---------------------------------------------------------------- tiny model through the client's path
@pytest.fixture(scope="module")
def tiny_android(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path, calib_images: Path) -> Path:
    """The tiny model (ImageNet per-channel normalisation) converted with it in the graph, uint8 I/O."""
    out = tmp_path_factory.mktemp("android") / "q"
    assert main(["convert", str(tiny_onnx), "-o", str(out), "--pixels-in-graph", "-q"]) == 0
    assert (
        main(
            [
                "quantize",
                str(out),
                "--calib",
                str(calib_images),
                "-o",
                str(out),
                "--num-calib",
                "20",
                "--target",
                "android-arm64-cpu",
                "-q",
            ]
        )
        == 0
    )
    return out


def test_input_contract_is_stated(
    tiny_android: Path, tiny_onnx: Path, calib_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeship.runtime.card import ModelCard
    from edgeship.targets.metadata import input_contract

    card = ModelCard.load(tiny_android / "model_int8.card.json")
    assert card.input.dtype == "uint8" and card.input.zero_point == 0 and abs(card.input.scale - 1.0) < 1e-6
    line = input_contract(card)
    assert "layout NCHW -> NHWC" in line and "dtype float32 -> uint8 (feed pixels as they are)" in line
    assert "(pixel/255 - [0.485,0.456,0.406]) / [0.229,0.224,0.225] -> (pixel - 0) / 1" in line
    out = tmp_path / "c"
    assert main(["convert", str(tiny_onnx), "-o", str(out)]) == 0
    assert "input differs from the source model (tiny.onnx): layout NCHW -> NHWC" in capsys.readouterr().out


def test_metadata_round_trip_and_mediapipe_loads_the_bundle(
    tiny_android: Path, tmp_path: Path, calib_images: Path
) -> None:
    _mediapipe()
    from edgeship.runtime.card import ModelCard
    from edgeship.runtime.classifier import Classifier
    from edgeship.runtime.images import list_images, resize_crop
    from edgeship.targets.mediapipe_check import MediaPipeClassifier
    from edgeship.targets.metadata import read_metadata

    out = tmp_path / "bundle"
    assert (
        main(["bundle", str(tiny_android / "model_int8.tflite"), "--target", "android-arm64-cpu", "-o", str(out), "-q"])
        == 0
    )
    meta = read_metadata(out / "model_int8.tflite")
    assert meta is not None and meta.norm_mean == (0.0,) and meta.norm_std == (1.0,) and meta.score == "logits"
    assert meta.to_dict() == json.loads((out / "model_metadata.json").read_text())
    card = ModelCard.load(out)
    assert any("TFLite Metadata embedded" in n for n in card.notes)
    readme = (out / "README.md").read_text()
    for text in (
        "ImageClassifier.createFromOptions",
        "setRegionOfInterest",
        "org.tensorflow.lite.Interpreter",
        "Not compiled here",
        "benchmark_model",
    ):
        assert text in readme, text
    files = list(list_images(calib_images).files)[:10]
    runtime = Classifier.load(out)
    with MediaPipeClassifier(out / "model_int8.tflite") as mp:
        for f in files:
            px = resize_crop(f, card.preprocessing)
            np.testing.assert_allclose(mp.scores(px, card.num_classes), runtime.logits(f), atol=1e-5)


def test_per_channel_model_is_refused_for_a_metadata_client(
    tiny_onnx: Path, calib_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _mediapipe()
    q = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(tiny_onnx),
                "--calib",
                str(calib_images),
                "-o",
                str(q),
                "--num-calib",
                "20",
                "--target",
                "android-arm64-cpu",
                "-q",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(["bundle", str(q / "model_int8.tflite"), "--target", "android-arm64-cpu", "-o", str(tmp_path / "b")])
    assert code != 0 and "--pixels-in-graph" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_verify_runs_the_mediapipe_path(
    tiny_android: Path, tiny_onnx: Path, calib_images: Path, tmp_path: Path
) -> None:
    _mediapipe()
    report = tmp_path / "d.json"
    code = main(
        [
            "verify",
            str(tiny_onnx),
            str(tiny_android / "model_int8.tflite"),
            "--images",
            str(calib_images),
            "--target",
            "android-arm64-cpu",
            "-r",
            str(report),
            "-q",
        ]
    )
    doc = json.loads(report.read_text())
    client = doc["client_check"]
    assert client["runtime_agreement"] == 1.0 and client["ok"] and client["metadata_source"].startswith("embedded")
    for key in ("client_preprocessing", "card_preprocessing", "roi_preprocessing"):
        assert 0.0 <= client[key]["top1_agreement"] <= 1.0
    assert "warpPerspective INTER_LINEAR" in client["preprocessing"]
    assert code in (0, 3) and (code == 0) == doc["passed"]


# ---------------------------------------------------------------- the real MobileNetV2
PHOTOS = {"parrot.jpg": "macaw", "bird.bmp": "chickadee", "hot_dog.jpg": "hotdog"}


@pytest.mark.slow
def test_real_android_model_in_mediapipe(real_bundle: Path, assets: Path, tmp_path: Path) -> None:
    """The android-arm64-cpu bundle as written loads in MediaPipe Tasks and answers like edgeship's runtime."""
    _mediapipe()
    from edgeship.runtime.card import ModelCard
    from edgeship.runtime.classifier import Classifier
    from edgeship.runtime.images import list_images, load_rgb, resize_crop
    from edgeship.targets.mediapipe_check import MediaPipeClassifier

    sample = assets / "data" / "imagenet-sample"
    q = tmp_path / "q"
    assert (
        main(
            [
                "quantize",
                str(real_bundle),
                "--calib",
                str(sample),
                "--num-calib",
                "100",
                "--max-eval",
                "50",
                "--target",
                "android-arm64-cpu",
                "-o",
                str(q),
                "-q",
            ]
        )
        == 0
    )
    out = tmp_path / "bundle"
    assert main(["bundle", str(q / "model_int8.tflite"), "--target", "android-arm64-cpu", "-o", str(out), "-q"]) == 0
    card = ModelCard.load(out)
    assert card.preprocessing.mean == (0.5, 0.5, 0.5) and card.input.dtype == "uint8"
    held_apart = list_images(sample).divide(100)[1].files[:100]  # the 100 quantize chose calibrated
    runtime = Classifier.load(out)
    with MediaPipeClassifier(out / "model_int8.tflite") as mp:
        names = {}
        for photo, _want in PHOTOS.items():
            s = mp.scores(np.asarray(load_rgb(assets / "data" / "images" / photo)), card.num_classes)
            names[photo] = runtime.label(int(np.argmax(s)))
        assert names == PHOTOS
        same = [
            np.argmax(mp.scores(resize_crop(f, card.preprocessing), card.num_classes)) == np.argmax(runtime.logits(f))
            for f in held_apart
        ]
    assert np.mean(same) >= 0.99, np.mean(same)


@pytest.mark.slow
def test_real_per_channel_model_through_mediapipe(assets: Path, tmp_path: Path) -> None:
    """MobileNetV2 with its input Mul+Add cut off (ImageNet mean/std outside the graph) in MediaPipe Tasks."""
    _mediapipe()
    import onnx

    from edgeship.runtime.card import ModelCard
    from edgeship.runtime.images import list_images
    from edgeship.targets.mediapipe_check import mediapipe_drift
    from edgeship.verify.drift import reference_outputs

    m = onnx.load(str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"))
    head = [n for n in m.graph.node[:2]]
    assert [n.op_type for n in head] == ["Mul", "Add"]
    for n in m.graph.node[2:]:
        n.input[:] = ["data" if i == head[1].output[0] else i for i in n.input]
    for n in head:
        m.graph.node.remove(n)
    for t in [t for t in m.graph.initializer if t.name in {head[0].input[1], head[1].input[1]}]:
        m.graph.initializer.remove(t)
    cut = tmp_path / "cut.onnx"
    onnx.save(m, str(cut))
    out = tmp_path / "conv"
    assert (
        main(
            [
                "convert",
                str(cut),
                "-o",
                str(out),
                "--pixels-in-graph",
                "-q",
                "--labels",
                str(assets / "data" / "imagenet_classes.txt"),
            ]
        )
        == 0
    )
    card = ModelCard.load(out)
    assert card.source_preprocessing.mean == (0.485, 0.456, 0.406) and card.preprocessing.std == (1.0,)
    files = list(list_images(assets / "data" / "imagenet-sample").files)[100:200]
    ref = reference_outputs(cut, files, card)
    drift = mediapipe_drift(out / "model_float32.tflite", files, ref, card=card)
    assert drift.card_preprocessing.top1_agreement >= 0.99, drift.to_dict()
    assert drift.runtime_agreement >= 0.99


@pytest.mark.slow
def test_real_nnapi_model_passes_its_mediapipe_check(real_bundle: Path, assets: Path, tmp_path: Path) -> None:
    """android-nnapi's model (full-integer, uint8 output) verified as a user runs it: on this host NNAPI's
    stand-in is LiteRT's reference kernels, MediaPipe runs XNNPACK. Compared kernel for kernel, MediaPipe
    answers like edgeship's runtime; before, the reference kernels' last-bit rounding swapped near-tied
    uint8 scores on 1.7–3.6 % of the images and a real android-nnapi verify failed its client check."""
    _mediapipe()
    images = tmp_path / "eval"
    images.mkdir()
    for f in sorted((assets / "data" / "imagenet-sample").iterdir())[1::2][:120]:
        (images / f.name).symlink_to(f)
    q, report = tmp_path / "q", tmp_path / "d.json"
    edgeship = [sys.executable, "-m", "edgeship"]
    cmd = [*edgeship, "quantize", str(real_bundle), "--calib", str(assets / "data" / "imagenet-sample")]
    run = subprocess.run([*cmd, "--num-calib", "100", "--target", "android-nnapi", "-o", str(q), "-q"], text=True)
    assert run.returncode == 0
    cmd = [*edgeship, "verify", str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"), str(q / "model_int8.tflite")]
    run = subprocess.run(
        [*cmd, "--images", str(images), "--target", "android-nnapi", "-r", str(report), "-q"],
        capture_output=True,
        text=True,
    )
    doc = json.loads(report.read_text())
    assert doc["client_check"]["runtime_agreement"] >= 0.99 and doc["client_check"]["ok"], doc["io_problems"]
    assert run.returncode == 0 and doc["passed"], run.stderr
