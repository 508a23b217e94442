"""Any ONNX image classifier: outputs that are probabilities, names TensorFlow rejects,
padded max-pools, non-classifier outputs, and native crashes that become one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeship._child import one_line
from edgeship.cli import main


def _classifier(*, head: str = "", names: str = "", maxpool_after: str = "Relu", out_shape=None):
    """Conv -> (Relu) -> padded MaxPool -> Conv -> GlobalAveragePool -> Flatten -> Gemm [-> head]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def init(name: str, shape: tuple[int, ...], scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name + names)

    t = lambda n: n + names  # noqa: E731 - tensor names with the given suffix
    inits = [
        init("w1", (8, 3, 3, 3)),
        init("b1", (8,), 0.1),
        init("w2", (8, 8, 3, 3), 0.2),
        init("b2", (8,), 0.1),
        init("wf", (10, 8)),
        init("bf", (10,), 0.1),
    ]
    nodes = [helper.make_node("Conv", [t("x"), t("w1"), t("b1")], [t("c1")], pads=[1, 1, 1, 1], name=t("Conv"))]
    pool_in = t("c1")
    if maxpool_after == "Relu":
        nodes.append(helper.make_node("Relu", [t("c1")], [t("r1")], name=t("Relu")))
        pool_in = t("r1")
    nodes += [
        helper.make_node(
            "MaxPool", [pool_in], [t("p")], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name=t("MaxPool")
        ),
        helper.make_node("Conv", [t("p"), t("w2"), t("b2")], [t("c2")], pads=[1, 1, 1, 1], name=t("Conv2")),
    ]
    if out_shape is None:
        nodes += [
            helper.make_node("GlobalAveragePool", [t("c2")], [t("g")], name=t("Pool")),
            helper.make_node("Flatten", [t("g")], [t("f")], axis=1, name=t("Flatten")),
            helper.make_node("Gemm", [t("f"), t("wf"), t("bf")], [t("logits")], transB=1, name=t("Gemm")),
        ]
        last, shape = t("logits"), ["N", 10]
    else:
        last, shape = t("c2"), out_shape
    if head:
        nodes.append(helper.make_node(head, [last], [t("scores")], axis=1, name=t(head)))
        last = t("scores")
    graph = helper.make_graph(
        nodes,
        "any",
        [helper.make_tensor_value_info(t("x"), TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _save(model, folder: Path, name: str) -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / name))
    return folder / name


@pytest.fixture(scope="module")
def softmax_model(tmp_path_factory: pytest.TempPathFactory, tiny_images: Path) -> Path:
    """A classifier ending in Softmax, with names TensorFlow rejects, converted once."""
    onnx_path = _save(_classifier(head="Softmax", names="@0:1"), tmp_path_factory.mktemp("sm"), "softmax.onnx")
    out = onnx_path.parent / "conv"
    assert main(["convert", str(onnx_path), "-o", str(out), "--images", str(tiny_images), "-q"]) == 0
    return out


def test_softmax_output_gets_no_second_softmax(softmax_model: Path, tiny_images: Path) -> None:
    from edgeship.reference import OrtRunner
    from edgeship.runtime.classifier import Classifier
    from edgeship.runtime.images import normalize

    card = json.loads((softmax_model / "model_card.json").read_text())
    assert card["postprocessing"] == "none"
    clf = Classifier.load(softmax_model)
    image = sorted(tiny_images.iterdir())[0]
    top = clf.predict(image, top_k=1)[0]
    x = normalize(clf.pixels(image), clf.card.reference_preprocessing)[None].transpose(0, 3, 1, 2)
    import onnx

    own = OrtRunner(onnx.load(str(softmax_model.parent / "softmax.onnx"))).run(x)[0]
    assert top.class_index == int(np.argmax(own))
    assert top.probability == pytest.approx(float(own.max()), abs=1e-4)  # the model's own probability


def test_names_tensorflow_rejects_are_renamed(softmax_model: Path) -> None:
    report = json.loads((softmax_model / "convert_report.json").read_text())
    assert report["verification"]["float32"]["top1_agreement"] == 1.0
    assert any("TensorFlow rejects renamed" in fix for fix in report["fixes"])


def test_log_softmax_output_is_exponentiated(tmp_path: Path, tiny_images: Path) -> None:
    from edgeship.runtime.classifier import Classifier

    onnx_path = _save(_classifier(head="LogSoftmax"), tmp_path, "logsoftmax.onnx")
    assert main(["convert", str(onnx_path), "-o", str(tmp_path / "c"), "--images", str(tiny_images), "-q"]) == 0
    clf = Classifier.load(tmp_path / "c")
    assert clf.card.postprocessing.value == "exp"
    probs = clf.probabilities(clf.logits(sorted(tiny_images.iterdir())[0]))
    assert probs.sum() == pytest.approx(1.0, abs=1e-3)


def test_output_that_is_not_class_scores_is_refused_before_onnx2tf(tmp_path: Path, capsys) -> None:
    onnx_path = _save(_classifier(out_shape=["N", 8, 16, 16]), tmp_path, "feature_map.onnx")
    assert main(["convert", str(onnx_path), "-o", str(tmp_path / "c"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert "[N, classes]" in err and "[1, 8, 16, 16]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("before_pool", ["Relu", "none"])
def test_padded_max_pool_quantizes_and_runs(
    before_pool: str, tmp_path: Path, tiny_images: Path, calib_images: Path
) -> None:
    """torch's padded max-pool becomes PADV2(-FLT_MAX): int8 used to abort; now both kernels run it.

    After a ReLU, convert already makes it a zero PAD (exact: the input is >= 0); otherwise
    quantize pads with the bottom of the input's range."""
    onnx_path = _save(_classifier(maxpool_after=before_pool), tmp_path, "maxpool.onnx")
    out = tmp_path / "q"
    assert (
        main(["quantize", str(onnx_path), "--calib", str(calib_images), "-o", str(out), "-q", "--num-calib", "20"]) == 0
    )
    report = json.loads((out / "quant_report.json").read_text())
    cleanups = json.loads((out / "convert_report.json").read_text())["graph_cleanups"]
    if before_pool == "Relu":
        assert cleanups.get("max_pool_pad_after_relu") == 1 and report["rewrites"] == {}
    else:
        assert "max_pool_pad_after_relu" not in cleanups
        assert report["rewrites"] == {"max_pool_padding_to_range_min": 1}
    assert report["runs_on"]["xnnpack"] is None and report["runs_on"]["reference"] is None
    # After a ReLU the pad becomes a plain PAD and XNNPACK keeps the graph whole; a PADV2 with a
    # finite value runs on TFLite's kernels between two partitions.
    assert report["runs_on"]["delegation"]["partitions"] == (1 if before_pool == "Relu" else 2)
    assert report["figures"]["sqnr_db"] > 20


def test_one_line_drops_colour_codes_and_picks_the_error() -> None:
    text = "\x1b[32mINFO:\x1b[0m fine\n\x1b[31mERROR:\x1b[0m Softmax@0 is not a valid scope name\nTraceback tail\n"
    assert one_line(text) == "ERROR: Softmax@0 is not a valid scope name"
