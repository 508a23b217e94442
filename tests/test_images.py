"""Reading images: bad files skipped and counted, any bit depth, EXIF orientation, the deployed fast path.

Every test image is made here with Pillow, most from a shared photo (skipped without the
shared assets) so the pixels look like a photo's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeship.errors import InputError
from edgeship.runtime import Classifier
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.images import (
    CORRUPT,
    TOO_LARGE,
    ImageReadError,
    cached_crops,
    frame_pixels,
    list_images,
    load_pixels,
    load_rgb,
    open_image,
    quantize_pixels,
    resize_crop,
    to_rgb8,
)

PREP = Preprocessing.imagenet()


@pytest.fixture(scope="module")
def photo(assets: Path) -> Image.Image:
    """A shared photo (RGB, 8-bit) to make test images from."""
    with Image.open(assets / "data" / "images" / "owl.jpg") as im:
        return im.convert("RGB")


@pytest.fixture()
def folder(tmp_path: Path, photo: Image.Image) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        photo.resize((320 + 8 * i, 256)).save(d / f"good_{i}.jpg", quality=90)
    return d


# ---------------------------------------------------------------- issue 15, case 4: truncated files
def test_truncated_jpeg_is_skipped_when_listed_and_counted(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    whole = (folder / "good_0.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # header intact: Image.verify() lets it through
    images = list_images(folder)
    assert [f.name for f in images.files] == ["good_0.jpg", "good_1.jpg", "good_2.jpg"]
    assert images.skipped == ("cut.jpg",) and images.skipped_by_reason() == {CORRUPT: 1}
    assert "skipped 1 file(s) (1 truncated or corrupt)" in caplog.text
    assert load_pixels(images.files, PREP).shape == (3, 224, 224, 3)  # nothing aborts later
    with pytest.raises(InputError, match="truncated or corrupt"):
        resize_crop(folder / "cut.jpg", PREP)  # one clear error when named directly


def test_truncated_png_and_garbage_are_skipped(folder: Path, photo: Image.Image) -> None:
    photo.save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    images = list_images(folder)
    assert "whole.png" in [f.name for f in images.files]
    assert dict(zip(images.skipped, images.skip_reasons)) == {"cut.png": CORRUPT, "noise.jpg": "not an image"}


# ---------------------------------------------------------------- case 5: 16-bit and other modes
def test_16bit_grey_png_comes_out_like_its_8bit_copy(tmp_path: Path, photo: Image.Image) -> None:
    grey8 = np.asarray(photo.convert("L"))
    Image.fromarray(grey8).save(tmp_path / "grey8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")  # Pillow reads it as 16-bit (I;16)
    np.testing.assert_array_equal(
        np.asarray(load_rgb(tmp_path / "grey16.png")), np.asarray(load_rgb(tmp_path / "grey8.png"))
    )
    np.testing.assert_array_equal(resize_crop(tmp_path / "grey16.png", PREP), resize_crop(tmp_path / "grey8.png", PREP))
    assert abs(np.asarray(load_rgb(tmp_path / "grey16.png")).mean() - grey8.mean()) < 0.5  # not "almost white"


@pytest.mark.parametrize(
    "make",
    [
        lambda g: Image.fromarray(g.astype(np.uint16) * 257),  # I;16
        lambda g: Image.fromarray((g.astype(np.uint16) * 257).astype(">u2")),  # I;16B
        lambda g: Image.fromarray(g.astype(np.int32) * 257),  # I (16-bit data)
        lambda g: Image.fromarray(g.astype(np.float32) / 255.0),  # F in [0, 1]
        lambda g: Image.fromarray(g).convert("LA"),
        lambda g: Image.fromarray(g).convert("P"),
        lambda g: Image.fromarray(g).convert("CMYK"),
        lambda g: Image.fromarray(g).convert("RGBA"),
    ],
    ids=["I;16", "I;16B", "I", "F", "LA", "P", "CMYK", "RGBA"],
)
def test_every_mode_scales_to_8bit_rgb(photo: Image.Image, make) -> None:  # noqa: ANN001
    grey = np.asarray(photo.convert("L").resize((64, 48)))
    out = np.asarray(to_rgb8(make(grey)))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)
    assert np.abs(out.astype(int) - grey[..., None]).max() <= 1


# ---------------------------------------------------------------- case 6: EXIF orientation
def _sideways(photo: Image.Image, path: Path, **save: object) -> Image.Image:
    """Save ``photo`` stored rotated, with EXIF orientation 6 saying how to turn it upright (a phone's portrait)."""
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 turns back by 270
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, **save)
    return stored


def test_exif_orientation_applied_everywhere(tmp_path: Path, photo: Image.Image) -> None:
    photo = photo.resize((340, 256))
    photo.save(tmp_path / "upright.png")
    _sideways(photo, tmp_path / "sideways.png")
    upright = resize_crop(tmp_path / "upright.png", PREP)
    np.testing.assert_array_equal(resize_crop(tmp_path / "sideways.png", PREP), upright)  # runtime + drift check
    np.testing.assert_array_equal(load_pixels([tmp_path / "sideways.png"], PREP)[0], upright)  # calibration
    assert load_rgb(tmp_path / "sideways.png").size == (340, 256)
    with Image.open(tmp_path / "sideways.png") as im:  # a PIL image the caller opened is turned too
        np.testing.assert_array_equal(resize_crop(im, PREP), upright)


def test_exif_orientation_with_jpeg_draft(tmp_path: Path, photo: Image.Image) -> None:
    big = photo.resize((1600, 1200))
    big.save(tmp_path / "upright.jpg", quality=95)
    _sideways(big, tmp_path / "sideways.jpg", quality=95)
    decoded = open_image(tmp_path / "sideways.jpg", PREP)
    assert decoded.scale == 4 and decoded.full_size == (1600, 1200) and decoded.image.size == (400, 300)
    a, b = resize_crop(tmp_path / "sideways.jpg", PREP), resize_crop(tmp_path / "upright.jpg", PREP)
    assert np.abs(a.astype(int) - b).mean() < 2


# ---------------------------------------------------------------- case 7: decompression bombs
def test_decompression_bombs_are_skipped_and_counted(
    folder: Path, photo: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 120_000)  # good_*.jpg are about 82,000 pixels
    photo.resize((400, 400)).save(folder / "warns.png")  # 160,000: over the limit, under 2x (Pillow warns)
    photo.resize((600, 600)).save(folder / "errors.png")  # 360,000: over 2x (Pillow raises)
    images = list_images(folder)
    assert len(images) == 3 and images.skipped_by_reason() == {TOO_LARGE: 2}
    for name in ("warns.png", "errors.png"):
        with pytest.raises(ImageReadError, match="decompression-bomb limit") as info:
            open_image(folder / name)
        assert info.value.reason == TOO_LARGE


def test_too_few_usable_images_names_the_reasons(folder: Path) -> None:
    for f in folder.iterdir():
        f.write_bytes(f.read_bytes()[:3000])
    with pytest.raises(InputError, match=r"0 usable image\(s\) \(3 other file\(s\) skipped: 3 truncated or corrupt\)"):
        list_images(folder)


# ---------------------------------------------------------------- the fast path
def test_jpeg_draft_decodes_small_and_matches_full_decode(tmp_path: Path, photo: Image.Image) -> None:
    photo.resize((4032, 3024)).save(tmp_path / "phone.jpg", quality=92)
    decoded = open_image(tmp_path / "phone.jpg", PREP)
    assert decoded.scale == 8 and decoded.image.size == (504, 378) and decoded.full_size == (4032, 3024)
    assert min(decoded.image.size) >= PREP.resize_shorter  # still covers the resize target
    fast = resize_crop(tmp_path / "phone.jpg", PREP)
    full = resize_crop(open_image(tmp_path / "phone.jpg", PREP, draft=False), PREP)
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast.astype(int) - full).mean() < 3


def test_small_images_are_not_scaled_and_keep_their_pixels(folder: Path, photo: Image.Image) -> None:
    path = folder / "good_0.jpg"
    assert open_image(path, PREP).scale == 1  # 256-px shorter side: nothing to skip
    with Image.open(path) as im:
        reference = np.asarray(im.convert("RGB").resize((320, 256), Image.BILINEAR).crop((48, 16, 272, 240)))
    assert np.abs(resize_crop(path, PREP).astype(int) - reference).max() <= 1  # crop-box resize = resize, crop


def test_png_and_pil_paths_agree(tmp_path: Path, photo: Image.Image) -> None:
    photo.save(tmp_path / "photo.png")
    np.testing.assert_array_equal(resize_crop(tmp_path / "photo.png", PREP), resize_crop(photo, PREP))


def test_frames_rgb_and_bgr(photo: Image.Image) -> None:
    rgb = np.asarray(photo)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    want = resize_crop(photo, PREP)
    np.testing.assert_array_equal(frame_pixels(rgb, PREP), want)
    np.testing.assert_array_equal(frame_pixels(bgr, PREP, "BGR"), want)
    mirrored = rgb[:, ::-1]  # a strided view is fine
    np.testing.assert_array_equal(frame_pixels(mirrored, PREP), frame_pixels(np.ascontiguousarray(mirrored), PREP))
    with pytest.raises(InputError, match="color must be one of"):
        frame_pixels(rgb, PREP, "YUV")
    with pytest.raises(InputError, match="uint8 HxWx3"):
        frame_pixels(rgb[..., :2], PREP)


def test_frame_at_model_size_is_not_copied() -> None:
    prep = Preprocessing(resize_shorter=224, crop=(224, 224))
    frame = np.random.default_rng(0).integers(0, 256, (224, 300, 3), dtype=np.uint8)
    assert Preprocessing.imagenet().resize_shorter != 224
    pixels = frame_pixels(frame, prep)
    assert np.shares_memory(pixels, frame) and pixels.shape == (224, 224, 3)
    np.testing.assert_array_equal(pixels, frame[:, 38:262])
    assert np.shares_memory(frame_pixels(frame, prep, "BGR"), frame)  # BGR -> RGB is a reversed view


def test_integer_input_path_stays_in_8_bits() -> None:
    px = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    np.testing.assert_array_equal(quantize_pixels(px, -128, np.int8), (px.astype(np.int16) - 128).astype(np.int8))
    assert quantize_pixels(px, 0, np.uint8) is px
    np.testing.assert_array_equal(
        quantize_pixels(px, -100, np.int8), np.clip(px.astype(np.int16) - 100, -128, 127).astype(np.int8)
    )


def test_parallel_loading_matches_one_at_a_time(folder: Path, photo: Image.Image) -> None:
    photo.save(folder / "photo.png")
    files = list_images(folder).files
    one = np.stack([resize_crop(f, PREP) for f in files])
    np.testing.assert_array_equal(load_pixels(files, PREP, workers=4), one)
    np.testing.assert_array_equal(load_pixels(files, PREP, workers=1), one)


# ---------------------------------------------------------------- the classifier on these paths
def test_classifier_frames_timed_and_evaluate(tiny_bundle: Path, tiny_images: Path) -> None:
    clf = Classifier.load(tiny_bundle)
    path = sorted(tiny_images.iterdir())[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    by_path = clf.logits(path)
    np.testing.assert_allclose(clf.logits(rgb), by_path, atol=1e-6)
    np.testing.assert_allclose(clf.logits(np.ascontiguousarray(rgb[..., ::-1]), color="BGR"), by_path, atol=1e-6)
    preds, steps = clf.predict_timed(path, 3)
    assert preds == clf.predict(path, 3) and set(steps) == {"decode", "preprocess", "invoke", "postprocess"}
    assert all(v > 0 for v in steps.values())
    ev = clf.evaluate(tiny_images, workers=3)
    np.testing.assert_allclose(ev.logits, np.stack([clf.logits(f) for f in sorted(tiny_images.iterdir())]), atol=1e-6)
    assert "crop-box resize" in clf.describe()["image_path"]


def test_bench_end_to_end(tiny_bundle: Path, tiny_images: Path, tmp_path: Path) -> None:
    from edgeship.cli import main

    model = tiny_bundle / "model_float32.tflite"
    out = tmp_path / "bench.json"
    assert (
        main(["bench", str(model), "--runs", "10", "--warmup", "2", "--image", str(tiny_images), "-o", str(out), "-q"])
        == 0
    )
    doc = json.loads(out.read_text())
    e2e = doc["results"][0]["e2e"]
    assert e2e["images"] == 12 and e2e["runs"] == 10 and e2e["p50_ms"] >= e2e["steps_p50_ms"]["invoke"] > 0
    assert set(e2e["steps_p50_ms"]) == {"decode", "preprocess", "invoke", "postprocess"}
    assert e2e["ratio_p50_to_invoke"] > 1 and "image_path" in e2e
    single = tmp_path / "one.json"
    assert (
        main(
            [
                "bench",
                str(model),
                "--runs",
                "5",
                "--image",
                str(sorted(tiny_images.iterdir())[0]),
                "-o",
                str(single),
                "-q",
            ]
        )
        == 0
    )
    assert json.loads(single.read_text())["results"][0]["e2e"]["images"] == 1


def test_bench_image_errors_are_one_line(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeship.cli import main

    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    code = main(
        [
            "bench",
            str(tiny_bundle / "model_float32.tflite"),
            "--image",
            str(tmp_path / "bad.jpg"),
            "-o",
            str(tmp_path / "b.json"),
            "-q",
        ]
    )
    assert code == 1 and "not an image" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_report_shows_shared_disagreements_once_and_isa(tmp_path: Path, tiny_images: Path) -> None:
    from edgeship.report import ReportInputs, write_report
    from edgeship.runtime.bench_report import BenchReport, RuntimeInfo
    from edgeship.runtime.metrics import compare
    from edgeship.targets import load_target
    from edgeship.targets.profile import BudgetCheck
    from edgeship.verify import DriftResult
    from edgeship.verify.report import DriftCandidate, DriftImages, DriftReference, DriftReport, DriftTarget

    out = tmp_path / "out"
    files = [str(f) for f in sorted(tiny_images.iterdir())]
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(len(files), 10)).astype(np.float32)
    cand = ref + rng.normal(scale=0.8, size=ref.shape).astype(np.float32)
    names = ["x86-host", "rpi4-aarch64", "android-arm64-cpu"]
    emulated = ref + rng.normal(scale=0.8, size=ref.shape).astype(np.float32)  # other kernels, other outputs
    drifts = {}
    for name in names:
        got = emulated if name == "rpi4-aarch64" else cand
        ran_on = "qemu-user aarch64 (cortex-a72)" if name == "rpi4-aarch64" else "this machine (x86_64)"
        limits = {"top1_agreement_pct": 97.5, "top1_drop_points": 1.0, "sqnr_db": 18.0}
        report = DriftReport(
            DriftTarget.of(load_target(name)),
            DriftReference("m.onnx"),
            DriftCandidate("/x/model_int8.tflite", "int8", RuntimeInfo("tflite_runtime", "2.14.0", "xnnpack"), ran_on),
            DriftImages(str(tiny_images), len(files), 0, 0),
            compare(ref, got),
            tuple(BudgetCheck(m, None, v, True) for m, v in limits.items()),
            (),
            (),
            True,
        )
        drifts[name] = DriftResult(report, ref, got, tuple(Path(f) for f in files))
    labels = [f"long class name number {i}" for i in range(10)]
    figures = {"top1_agreement": 0.9, "ref_top1": None, "cand_top1": None, "mean_cosine": 0.99, "sqnr_db": 20.0}
    budget = [
        {"metric": "top1_agreement_pct", "limit": 97.5},
        {"metric": "top1_drop_points", "limit": 1.0},
        {"metric": "sqnr_db", "limit": 18.0},
    ]
    summary = {
        "model": "m.onnx",
        "calibration": {"count": 20},
        "evaluation": {"count": len(files)},
        "stages": [],
        "wall_s": 1.0,
        "targets": {
            n: {
                "model": "/x/model_int8.tflite",
                "passed": True,
                "figures": figures,
                "budget": budget,
                "ran_on": "this machine (x86_64)",
            }
            for n in names
        },
    }
    summary["targets"]["rpi4-aarch64"]["ran_on"] = "qemu-user aarch64 (cortex-a72)"
    bench = {
        "host": {"machine": "x86_64"},
        "results": [
            {
                "model": "model_int8.tflite",
                "path": "/x/model_int8.tflite",
                "threads": 1,
                "init_ms": 1.0,
                "first_ms": 1.0,
                "mean_ms": 4.1,
                "p50_ms": 4.0,
                "p90_ms": 4.5,
                "p99_ms": 5.0,
                "runs": 3,
                "samples_ms": [4.0, 4.1, 3.9],
                "peak_rss_mb": 70,
                "size_bytes": 4_000_000,
                "ratio_p50_to_first": 1.0,
                "runtime": {"interpreter": "ai_edge_litert", "delegate": "xnnpack"},
                "e2e": {
                    "images": 12,
                    "image": str(tiny_images),
                    "runs": 3,
                    "min_ms": 5.0,
                    "mean_ms": 5.6,
                    "p50_ms": 5.5,
                    "p90_ms": 6.0,
                    "p99_ms": 6.5,
                    "steps_p50_ms": {"decode": 0.8, "preprocess": 0.3, "invoke": 4.2, "postprocess": 0.2},
                    "ratio_p50_to_invoke": 1.38,
                    "invoke_only_p50_ms": 4.0,
                    "image_path": "JPEG draft decode",
                },
            }
        ],
    }
    report = BenchReport.from_dict(bench)
    _, html_path = write_report(out, ReportInputs(summary, report, drifts, labels))
    page = html_path.read_text()
    # x86-host and android-arm64-cpu ran the same model on the same machine: one set of images for both.
    assert page.count("shared by x86-host, android-arm64-cpu: the same model ran on the same machine") == 1
    assert page.count("Worst disagreements on rpi4-aarch64") == 1
    assert page.count("<figure class='card'>") == 12  # 6 + 6, not 18
    assert "long class name number" in page  # labels as text, not pixels in a plot
    assert "not on their own ISA: android-arm64-cpu (aarch64)." in page
    assert (
        "Checked on their own ISA: x86-host (natively, x86_64), rpi4-aarch64 (aarch64 emulated under qemu-user" in page
    )
    assert "end-to-end p50 / p90 ms" in page and "5.50 / 6.00" in page and "1.38 (of 4.00)" in page
    shutil.rmtree(out)


def test_cached_crops_decode_each_file_once_and_follow_changes(tmp_path: Path) -> None:
    """Inside ``cached_crops`` a file's crop comes from memory (read-only, equal to a fresh decode); a
    rewritten file, another crop or the end of the block decodes again."""
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    prep, other = Preprocessing.imagenet(224, 224), Preprocessing.imagenet(160, 160)
    fresh = resize_crop(path, prep)
    with cached_crops() as cache:
        first, again = resize_crop(path, prep), resize_crop(str(path), prep)
        assert again is first and np.array_equal(first, fresh) and not first.flags.writeable
        assert resize_crop(path, other).shape == (160, 160, 3) and cache.used == first.nbytes + 160 * 160 * 3
        Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(path)
        os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
        assert not resize_crop(path, prep).any()
    assert resize_crop(path, prep) is not resize_crop(path, prep)  # no cache outside the block
