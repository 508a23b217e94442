"""Issue 34, the specific one-line messages: each input below used to end in a traceback or in the generic
"internal error (exit 70)" line; each is now the user's mistake, named in one line, exit 1, nothing written.

The commands run as users run them: the CLI (``edgeship``, ``python -m edgeship.runtime``) in a subprocess.
Permission cases drop the two capabilities that let root read anything, so they hold when the tests run as root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import save, tiny_classifier
from tests.test_hostile_paths import edgeship, one_line

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: As root, run without the capabilities that bypass file permissions (a plain user has none of them).
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def as_user(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``args`` as a process that file permissions apply to."""
    prefix = NO_DAC if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=600, check=False)


def runtime(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return as_user(sys.executable, "-m", "edgeship.runtime", *args)


def _loop_model(path: Path) -> Path:
    """A classifier whose first step is a Loop (adds 1 to the image 3 times): onnxsim leaves it in place."""
    import numpy as np
    from onnx import TensorProto
    from onnx import helper as h

    body = h.make_graph(
        [h.make_node("Identity", ["c_in"], ["c_out"]), h.make_node("Add", ["s_in", "one"], ["s_out"])],
        "body",
        [h.make_tensor_value_info("i", TensorProto.INT64, []), h.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         h.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
        [h.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         h.make_tensor_value_info("s_out", TensorProto.FLOAT, None)],
        [h.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )  # fmt: skip
    weights = np.random.default_rng(0).standard_normal(3 * 8 * 8 * 10).astype(np.float32)
    nodes = [
        h.make_node("Constant", [], ["M"], value=h.make_tensor("m", TensorProto.INT64, [], [3])),
        h.make_node("Constant", [], ["C"], value=h.make_tensor("c", TensorProto.BOOL, [], [True])),
        h.make_node("Loop", ["M", "C", "x"], ["y"], body=body, name="steps"),
        h.make_node("Flatten", ["y"], ["f"]),
        h.make_node("MatMul", ["f", "w"], ["logits"]),
        h.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = h.make_graph(
        nodes,
        "loop",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [h.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
        [h.make_tensor("w", TensorProto.FLOAT, [3 * 8 * 8, 10], weights)],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    return save(model, path)


# ------------------------------------------------------------------ models
def test_an_onnx_opset_newer_than_onnx_knows_is_named(tmp_path: Path) -> None:
    model = tiny_classifier()
    model.opset_import[0].version = 99
    save(model, tmp_path / "op99.onnx")
    err = one_line(edgeship("convert", tmp_path / "op99.onnx", "-o", tmp_path / "out", "-q"), 1, "opset 99")
    assert "internal error" not in err and "opset_version" in err, err
    assert not (tmp_path / "out").exists()


def test_a_loop_node_is_named_without_an_onnx2tf_flag(tmp_path: Path) -> None:
    err = one_line(edgeship("convert", _loop_model(tmp_path / "loop.onnx"), "-o", tmp_path / "out", "-q"), 1, "Loop")
    assert not re.search(r"(^|\s)-[a-z]{3,}\b", err), f"names a flag edgeship has not: {err}"
    assert "unrolled" in err and not (tmp_path / "out").exists(), err


# ------------------------------------------------------------------ model cards
@pytest.mark.parametrize(
    ("text", "says"),
    [("[" * 100000 + "]" * 100000, "nests too deep"), ('{"input_size": ' + "9" * 5000 + "}", "number too long")],
    ids=["100000-deep", "5000-digit"],
)
def test_a_card_that_cannot_be_read_is_named(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "m.card.json").write_text(text)
    (tmp_path / "m.tflite").write_bytes(b"\0" * 64)
    err = one_line(edgeship("bundle", tmp_path / "m.tflite", "--target", "x86-host", "-o", tmp_path / "b", "-q"))
    assert says in err and "internal error" not in err, err
    assert not (tmp_path / "b").exists()


def test_a_card_model_file_naming_a_folder_is_named(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    card = json.loads((bundle / "model_card.json").read_text())
    (bundle / "weights").mkdir()
    (bundle / "model_card.json").write_text(json.dumps({**card, "model_file": "weights"}))
    _image(tmp_path / "x.png")
    err = one_line(runtime(bundle, tmp_path / "x.png"), 1, "a folder")
    assert "does not exist" not in err and "model_file" in err, err


# ------------------------------------------------------------------ permissions
def _image(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 40), (90, 20, 200)).save(path)
    return path


def test_an_unreadable_image_is_named_as_unreadable_not_corrupt(tiny_bundle: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "x.png")
    image.chmod(0)
    err = one_line(runtime(tiny_bundle, image), 1, "permission denied")
    assert "corrupt" not in err, err


def test_an_unreadable_image_folder_is_named_as_unreadable(tiny_bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(14):
        _image(images / f"img_{i:02d}.png")
    images.chmod(0)
    try:
        proc = as_user(sys.executable, "-m", "edgeship", "quantize", tiny_bundle, "--calib", images, "-o",
                       tmp_path / "q", "-q")  # fmt: skip
    finally:
        images.chmod(0o755)
    err = one_line(proc, 1, "cannot be read: permission denied")
    assert "labels" not in err and not (tmp_path / "q").exists(), err


# ------------------------------------------------------------------ 12. an output folder reached through a bind mount
def test_an_output_folder_through_a_bind_mount_of_the_calibration_folder_is_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """``-o`` names a path under a bind mount of ``--calib`` (its name does not show it): refused like a path
    inside the folder. The mount lives in a private mount namespace (``unshare``), gone when the command ends."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    calib, alias = tmp_path / "calib", tmp_path / "alias"
    calib.mkdir()
    alias.mkdir()
    for i in range(14):
        _image(calib / f"img_{i:02d}.png")
    script = 'mount --bind "$1" "$2" && exec "$3" -m edgeship quantize "$4" --calib "$1" -o "$2/q" -q'
    root = [] if os.geteuid() == 0 else ["--map-root-user"]
    proc = subprocess.run(
        ["unshare", *root, "--mount", "sh", "-c", script, "sh", str(calib), str(alias), sys.executable,
         str(tiny_bundle)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if "mount" in proc.stderr and "edgeship" not in proc.stderr:
        pytest.skip(f"no bind mount here: {proc.stderr.strip()}")
    one_line(proc, 1, "would read its own outputs")
    assert sorted(p.name for p in calib.iterdir()) == [f"img_{i:02d}.png" for i in range(14)]


def test_evaluation_images_that_are_byte_copies_of_calibration_images_are_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """``--eval`` a copy of ``--calib`` (other paths, the same bytes): refused by content, nothing written."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(14):
        (calib / f"img_{i:02d}.png").write_bytes(_png(i))
    copy = Path(shutil.copytree(calib, tmp_path / "eval"))
    proc = edgeship("quantize", tiny_bundle, "--calib", calib, "--eval", copy, "-o", tmp_path / "q", "-q")
    one_line(proc, 1, "same bytes as calibration images")
    assert not (tmp_path / "q").exists()


def _png(seed: int) -> bytes:
    """A PNG of random pixels (each seed its own image)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((40, 44, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ 12. paths not named in UTF-8
def test_an_output_folder_not_named_in_utf8_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """``deploy -o`` named by bytes that are not UTF-8 used to fail in bench, at the first model LiteRT opened from
    it, leaving a partial folder: now one line, before anything is written."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(14):
        _image(images / f"img_{i:02d}.png")
    out = os.fsdecode(os.fsencode(tmp_path) + b"/out-\xff")
    model = save(tiny_classifier(), tmp_path / "tiny.onnx")
    proc = edgeship("deploy", model, "--calib", images, "-o", out, "--target", "x86-host", "-q")
    one_line(proc, 2, "not named in UTF-8")
    assert not os.path.lexists(out)


def test_a_model_whose_path_is_not_utf8_still_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    """LiteRT takes paths only as UTF-8 text; the runtime gives it such a model's bytes instead."""
    model = os.fsdecode(os.fsencode(tmp_path) + b"/model-\xff.tflite")
    shutil.copy(next(tiny_bundle.glob("*.tflite")), model)
    argv = [sys.executable, "-m", "edgeship", "bench", model, "-o", str(tmp_path / "bench.json"), "-q"]
    proc = subprocess.run(argv, capture_output=True, timeout=600, check=False)  # bytes: the table names the file
    assert proc.returncode == 0, proc.stderr
    assert b"model-\xff.tflite" in proc.stdout and (tmp_path / "bench.json").is_file()
