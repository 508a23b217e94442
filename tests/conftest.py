"""Shared fixtures: tiny ONNX models built in code, and the real shared assets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeship._assets import shared_assets

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ASSETS = shared_assets()
needs_assets = pytest.mark.skipif(
    ASSETS is None, reason="shared assets not found: set EDGE_ASSETS or check out ../shared"
)


@pytest.fixture(scope="session")
def assets() -> Path:
    if ASSETS is None:
        pytest.skip("shared assets not found: set EDGE_ASSETS or check out ../shared")
    return ASSETS


def tiny_classifier(
    *,
    opset: int = 13,
    ir_version: int | None = 8,
    batch: int | str = "N",
    size: int = 32,
    classes: int = 10,
    init_as_inputs: bool = False,
    seed: int = 0,
):
    """Conv -> Relu -> Conv -> Add (residual) -> GlobalAveragePool -> Flatten -> Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", (8, 3, 3, 3)),
        init("b1", (8,), 0.1),
        init("w2", (8, 8, 1, 1)),
        init("b2", (8,), 0.1),
        init("wf", (classes, 8)),
        init("bf", (classes,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Add", ["c2", "r1"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])]
    if init_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes, "tiny", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeship-tests")
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def two_input_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def vector_input_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["y"])],
        "vec",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tiny_classifier(), tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_op7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_classifier(opset=7, ir_version=3, init_as_inputs=True)
    return save(model, tmp_path_factory.mktemp("models") / "tiny_op7.onnx")


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few small real-looking images in assorted formats and modes."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(12):
        arr = (rng.random((40 + i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path, tiny_images: Path) -> Path:
    """The tiny model converted once (float32 + float16), verified on the tiny images."""
    from edgeship.cli import main

    out = tmp_path_factory.mktemp("conv") / "tiny"
    assert main(["convert", str(tiny_onnx), "-o", str(out), "--images", str(tiny_images), "--fp16", "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    """The real MobileNetV2 (opset 13) converted once, verified on the 500 shared images, with labels."""
    from edgeship.cli import main

    out = tmp_path_factory.mktemp("real") / "mobilenetv2"
    code = main(
        [
            "convert",
            str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"),
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
    return out


@pytest.fixture(scope="session")
def calib_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 small images in every supported format and several modes, plus files to skip."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(2)
    formats = [
        ("png", "RGB"),
        ("jpg", "RGB"),
        ("bmp", "RGB"),
        ("webp", "RGB"),
        ("png", "L"),
        ("jpg", "CMYK"),
        ("png", "P"),
        ("png", "RGBA"),
    ]
    for i in range(30):
        ext, mode = formats[i % len(formats)]
        base = np.clip(rng.normal(128, 60, (36 + i % 5, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(base).convert(mode).save(folder / f"img_{i:02d}.{ext}")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


# --------------------------------------------------------------------------- two workers (pytest -n 2)

#: Files whose tests start emulated Pis or a Ray cluster. With pytest-xdist they run on one worker, one after
#: another and before anything else (two workers would start the same emulated Pi twice); every other file is
#: one unit of work for whichever worker is free, the slowest (:data:`SLOW_FILES`) first.
DEVICE_FILES = ("test_pi_emulated.py", "test_matrix_pi.py", "test_device_speed.py", "test_emulate.py", "test_matrix.py")
#: Files that take minutes, started early so that neither worker ends with a long one alone.
SLOW_FILES = ("test_docs.py", "test_demo.py", "test_archs.py", "test_any_classifier.py")


def _rank(path: str) -> tuple[int, int]:
    name = path.rsplit("/", 1)[-1]
    for rank, files in enumerate((DEVICE_FILES, SLOW_FILES)):
        if name in files:
            return rank, files.index(name)
    return 2, 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Device files first, then the slow ones, then the rest in their usual order (a stable sort)."""
    items.sort(key=lambda item: _rank(item.nodeid.split("::", 1)[0]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class DevicesOnOneWorker(LoadScopeScheduling):
        """A file per unit of work, every device file in one unit; units in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "devices" if _rank(path)[0] == 0 else path

        def schedule(self) -> None:
            self.config.option.loadscopereorder = False  # keep the order above, not the largest file first
            super().schedule()

    return DevicesOnOneWorker(config, log)
