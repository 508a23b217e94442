"""The on-device runtime: import isolation, I/O handling, predictions on real photos."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeship.errors import InputError
from edgeship.runtime import Classifier
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import Labels, list_images, load_rgb, preprocess

BLOCK_HEAVY = textwrap.dedent("""
    import sys
    for name in ("tensorflow", "onnx", "onnxruntime", "onnx2tf", "onnxsim", "tf_keras", "keras"):
        sys.modules[name] = None  # any import of these now raises ImportError
""")


def test_runtime_imports_and_predicts_without_host_tools(tiny_bundle: Path, tiny_images: Path) -> None:
    code = BLOCK_HEAVY + textwrap.dedent(f"""
        import edgeship.runtime
        from edgeship.runtime import Classifier
        clf = Classifier.load({str(tiny_bundle)!r})
        preds = clf.predict({str(next(tiny_images.iterdir()))!r}, top_k=3)
        top10 = clf.predict({str(next(tiny_images.iterdir()))!r}, 10)
        assert len(preds) == 3 and abs(sum(p.probability for p in top10) - 1) < 1e-4
        loaded = [m for m in ("tensorflow", "onnx", "onnxruntime", "onnx2tf") if sys.modules.get(m) is not None]
        assert not loaded, loaded
        print(clf.describe()["interpreter"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ai_edge_litert"


def test_runner_module_blocked_heavy_imports(tiny_bundle: Path, tiny_images: Path) -> None:
    img = str(next(tiny_images.iterdir()))
    code = (
        BLOCK_HEAVY + f"import runpy, sys; sys.argv = ['x', {str(tiny_bundle)!r}, {img!r}, '--json']\n"
        "runpy.run_module('edgeship.runtime', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert len(doc["predictions"][img]) == 5 and doc["runtime"]["delegate"] == "xnnpack"


def test_tflite_runtime_fallback_when_litert_is_missing(tiny_bundle: Path, tiny_images: Path) -> None:
    """With ai-edge-litert unimportable the runtime picks tflite-runtime, and says so."""
    pytest.importorskip("tflite_runtime", reason="tflite-runtime not installed (it is in the dev extra)")
    img = str(sorted(tiny_images.iterdir())[0])
    code = (
        BLOCK_HEAVY
        + "sys.modules['ai_edge_litert'] = None\n"
        + textwrap.dedent(f"""
        from edgeship.runtime import Classifier
        clf = Classifier.load({str(tiny_bundle)!r})
        print(clf.describe()["interpreter"], clf.predict({img!r})[0].class_index)
    """)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, top = out.stdout.split()
    assert backend == "tflite_runtime"
    assert int(top) == Classifier.load(tiny_bundle).predict(img)[0].class_index


def test_input_kinds_agree(tiny_bundle: Path, tiny_images: Path) -> None:
    clf = Classifier.load(tiny_bundle)
    path = sorted(tiny_images.iterdir())[0]
    by_path = clf.logits(path)
    by_pil = clf.logits(Image.open(path))
    by_pixels = clf.logits(np.asarray(Image.open(path).convert("RGB")))
    by_float = clf.logits(preprocess(path, clf.card.preprocessing))
    for other in (by_pil, by_pixels, by_float):
        np.testing.assert_allclose(other, by_path, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="float input must have the model's shape"):
        clf.logits(np.zeros((1, 8, 8, 3), np.float32))


def test_load_tflite_path_uses_card_and_bare_model_needs_preprocessing(tiny_bundle: Path, tmp_path: Path) -> None:
    from edgeship.runtime import Preprocessing

    assert Classifier.load(tiny_bundle / "model_float16.tflite").card.model_file == "model_float16.tflite"
    bare = tmp_path / "bare.tflite"
    bare.write_bytes((tiny_bundle / "model_float32.tflite").read_bytes())
    with pytest.raises(InputError, match="no model card beside"):
        Classifier.load(bare)
    clf = Classifier.load(bare, preprocessing=Preprocessing.imagenet(32, 32))
    assert clf.card.preprocessing.crop == (32, 32) and clf.labels is None


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Classifier.load(tmp_path / "missing.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match="cannot load TFLite model"):
        Classifier.load(junk)


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    for mode in ("L", "CMYK", "P", "1", "I;16"):
        assert load_rgb(Image.new(mode, (5, 5))).mode == "RGB"


def test_image_folder_listing(tmp_path: Path) -> None:
    (tmp_path / "n01440764_tench.jpg").write_bytes(b"not really a jpeg")
    Image.new("RGB", (8, 8)).save(tmp_path / "n01443537_goldfish.png")
    Image.new("L", (8, 8)).save(tmp_path / "b.webp")
    (tmp_path / "notes.txt").write_text("hi")
    images = list_images(tmp_path)
    assert [f.name for f in images.files] == ["b.webp", "n01443537_goldfish.png"]
    assert sorted(images.skipped) == ["n01440764_tench.jpg", "notes.txt"]
    assert images.label_keys == (None, "n01443537")
    with pytest.raises(InputError, match="at least 5 needed"):
        list_images(tmp_path, minimum=5)


def test_preprocessing_center_crop_math() -> None:
    prep = Preprocessing(resize_shorter=4, crop=(2, 2), mean=(0, 0, 0), std=(1, 1, 1), pixel_scale=1.0)
    im = Image.fromarray(np.arange(8 * 4 * 3, dtype=np.uint8).reshape(4, 8, 3))  # 8 wide, 4 high
    x = preprocess(im, prep)
    assert x.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(x[0], np.asarray(im)[1:3, 3:5].astype(np.float32))


@pytest.mark.slow
def test_real_photos(real_bundle: Path, assets: Path) -> None:
    """Expected from the issue (resize-256 / crop-224 on the float model)."""
    clf = Classifier.load(real_bundle)
    expected = {
        "parrot.jpg": ("macaw", 0.97),
        "bird.bmp": ("chickadee", 0.92),
        "dragonfly.bmp": ("dragonfly", 0.94),
        "cat.bmp": ("Egyptian cat", 0.85),
        "hot_dog.jpg": ("hotdog", 0.65),
    }
    for name, (label, prob) in expected.items():
        top = clf.predict(assets / "data" / "images" / name)[0]
        assert top.label == label and top.probability == pytest.approx(prob, abs=0.01), (name, top)


@pytest.mark.slow
def test_real_batch_evaluation(real_bundle: Path, assets: Path) -> None:
    clf = Classifier.load(real_bundle, num_threads=2)
    images = list_images(assets / "data" / "imagenet-sample").split(100)[1]
    result = clf.evaluate(images)
    assert len(result.files) == 400 and 0.8 < result.top1 < 0.95 and result.top5 > result.top1
    labels = Labels.load(assets / "data" / "imagenet_classes.txt")
    assert labels.index_of("n01440764") == 0 and labels.name(0) == "tench"
