"""End to end on the real MobileNetV2 (both opsets) with the 500 shared ImageNet images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship._io import sha256_file
from edgeship.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.mark.parametrize("name", ["mobilenetv2-1.0-tf-op13.onnx", "mobilenetv2-1.0-tf-op7.onnx"])
def test_real_mobilenetv2(name: str, assets: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model = assets / "models" / name
    before = sha256_file(model)
    if "op13" in name:
        out = request.getfixturevalue("real_bundle")  # converted once for the whole session
    else:
        out = tmp_path / "out"
        code = main(
            [
                "convert",
                str(model),
                "-o",
                str(out),
                "-q",
                "--images",
                str(assets / "data" / "imagenet-sample"),
                "--labels",
                str(assets / "data" / "imagenet_classes.txt"),
            ]
        )
        assert code == 0
    assert sha256_file(model) == before
    report = json.loads((out / "convert_report.json").read_text())
    v = report["verification"]["float32"]
    assert v["count"] == 500 and v["top1_agreement"] == 1.0
    assert v["max_abs_error"] < 1e-3 and v["mean_cosine"] > 0.9999
    # published by the shared README for these 500 images: top-1 0.860, top-5 0.966
    assert v["ref_top1"] == pytest.approx(0.860, abs=0.002) and v["cand_top1"] == pytest.approx(0.860, abs=0.002)
    card = json.loads((out / "model_card.json").read_text())
    assert card["labels_file"] == "labels.txt" and card["num_classes"] == 1000
    assert (out / "labels.txt").read_text().splitlines()[0].startswith("n01440764")
