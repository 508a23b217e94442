"""The default calibration choice is spread over the data, and the evaluation set is held apart the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship.runtime import images as imgs

CLASSES, PER_CLASS = 10, 20


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 class subfolders x 20 small images, as torchvision's ImageFolder reads them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(3)
    for c in range(CLASSES):
        (root / f"class_{c:02d}").mkdir()
        for i in range(PER_CLASS):
            arr = (rng.random((36, 40, 3)) * 255 * (c + 1) / CLASSES).astype(np.uint8)
            Image.fromarray(arr).save(root / f"class_{c:02d}" / f"img_{i:03d}.png")
    return root


def _classes(paths: tuple[Path, ...]) -> set[str]:
    return {p.parent.name for p in paths}


def test_quantize_cli_calibrates_on_every_class(class_folders: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """``--num-calib 20`` on 10 classes x 20 images: two images of each class, not the first class."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeship",
            "quantize",
            str(tiny_bundle),
            "--calib",
            str(class_folders),
            "--num-calib",
            "20",
            "-o",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "quant_report.json").read_text())
    calib, evals = report["calibration"], report["evaluation"]
    assert calib["count"] == 20 and calib["classes"] == CLASSES, calib
    assert calib["selection"] == f"round-robin over {CLASSES} classes", calib
    assert evals["count"] == 180 and evals["classes"] == CLASSES and evals["held_apart_from_calibration"], evals


def test_round_robin_takes_each_class_evenly(class_folders: Path) -> None:
    images = imgs.list_images(class_folders, check=False)
    calib, rest = images.divide(25)
    per_class = [sum(p.parent.name == f"class_{c:02d}" for p in calib.files) for c in range(CLASSES)]
    assert sorted(per_class) == [2] * 5 + [3] * 5, per_class  # two rounds, then 5 classes evenly spaced
    assert not set(calib.files) & set(rest.files) and len(rest) == 175
    assert _classes(rest.files) == _classes(images.files)
    assert list(calib.files) == sorted(calib.files), "kept in sorted order"


def test_more_classes_than_images_spreads_over_the_classes() -> None:
    """500 classes of one image (the shared ImageNet sample), 100 chosen: every 5th class, not the first 100."""
    keys = [f"n{c:08d}" for c in range(500)]
    picks = imgs.spread_indices(keys, 100)
    assert picks == list(range(2, 500, 5))


def test_without_labels_evenly_spaced_and_seed_is_random(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), i * 8, np.uint8)).save(tmp_path / f"frame_{i:03d}.png")
    images = imgs.list_images(tmp_path, check=False)
    chosen = images.sample(6)
    assert [images.files.index(f) for f in chosen.files] == imgs.evenly_spaced(30, 6) == [2, 7, 12, 17, 22, 27]
    assert chosen.selection == "evenly spaced over the sorted list"
    seeded = images.sample(6, seed=1)
    assert seeded.files == images.sample(6, seed=1).files and seeded.files != chosen.files
    assert seeded.selection == "seeded random choice (seed 1)"
    assert images.sample(30).files == images.files
