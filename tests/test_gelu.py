"""Issue 10: GELU spelled out with Erf (TorchScript exports) converts to builtin ops, and a model that
still needs TensorFlow Select (Flex) ops is refused instead of passing a verification the device cannot repeat."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgeship.cli import main
from tests.conftest import save, tiny_classifier

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------- ONNX rewrite, no conversion
def _gelu_graph(variant: str, *, opset: int = 17, sqrt2: float = SQRT2):
    """x [1,4,6,6] -> the GELU of ``variant`` -> y, plus an Identity reading x so x has another reader."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: float):
        return numpy_helper.from_array(np.array(value, dtype=np.float32), name)

    inits = [
        const("c_sqrt2", sqrt2),
        const("c_rsqrt2", 1 / sqrt2),
        const("c_one", 1.0),
        const("c_half", 0.5),
        const("c_two", 2.0),
    ]
    scale = {
        "div": helper.make_node("Div", ["x", "c_sqrt2"], ["z"]),
        "mul": helper.make_node("Mul", ["c_rsqrt2", "x"], ["z"]),
    }["mul" if variant == "rsqrt_first" else "div"]
    nodes = [scale, helper.make_node("Erf", ["z"], ["e"]), helper.make_node("Add", ["c_one", "e"], ["a"])]
    nodes += {
        "x_a_half": [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Mul", ["xa", "c_half"], ["y"])],
        "rsqrt_first": [helper.make_node("Mul", ["a", "x"], ["xa"]), helper.make_node("Div", ["xa", "c_two"], ["y"])],
        "half_x_a": [helper.make_node("Mul", ["c_half", "x"], ["hx"]), helper.make_node("Mul", ["hx", "a"], ["y"])],
        "x_half_a": [helper.make_node("Mul", ["a", "c_half"], ["ha"]), helper.make_node("Mul", ["x", "ha"], ["y"])],
    }[variant]
    nodes.append(helper.make_node("Identity", ["x"], ["x_copy"]))
    shape = [1, 4, 6, 6]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, shape),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    return model


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no GELU fusion of its own
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x}
    )[0]


@pytest.mark.parametrize("variant", ["x_a_half", "rsqrt_first", "half_x_a", "x_half_a"])
def test_every_spelling_of_gelu_fuses_into_one_node(variant: str) -> None:
    import onnx

    from edgeship.convert.gelu import fuse_gelu

    model = _gelu_graph(variant)
    fused, notes = fuse_gelu(model)
    onnx.checker.check_model(fused)
    assert [(n.op_type, n.domain) for n in fused.graph.node] == [("Gelu", ""), ("Identity", "")]
    assert [(o.domain, o.version) for o in fused.opset_import] == [("", 20)]
    assert fused.graph.node[0].input[:] == ["x"] and fused.graph.node[0].output[:] == ["y"]
    read = {name for n in model.graph.node for name in n.input}
    assert not {t.name for t in fused.graph.initializer} & read, "the fused GELU's constants must be dropped"
    assert "opset 17 moved to 20" in notes[0] and "1 exact-erf GELU" in notes[1], notes
    x = np.random.default_rng(0).normal(0, 3, (1, 4, 6, 6)).astype(np.float32)
    exact = np.vectorize(math.erf)(x.astype(np.float64) / SQRT2)
    np.testing.assert_allclose(_run(fused, x), 0.5 * x * (1 + exact), atol=2e-6, rtol=0)
    np.testing.assert_allclose(_run(fused, x), _run(model, x), atol=2e-6, rtol=0)
    assert len(model.graph.node) == 6, "the input model is not modified"


def test_opset_20_model_keeps_its_opset() -> None:
    from edgeship.convert.gelu import fuse_gelu

    model = _gelu_graph("x_a_half", opset=20)
    fused, notes = fuse_gelu(model)
    assert [n.op_type for n in fused.graph.node] == ["Gelu", "Identity"] and len(notes) == 1, notes
    assert fused.opset_import == model.opset_import


def test_not_a_gelu_is_left_alone() -> None:
    from edgeship.convert.gelu import fuse_gelu

    other_constant = _gelu_graph("x_a_half", sqrt2=1.5)
    assert fuse_gelu(other_constant) == (other_constant, [])
    shared = _gelu_graph("x_a_half")
    shared.graph.node.append(__import__("onnx").helper.make_node("Neg", ["e"], ["neg_e"]))  # erf read elsewhere
    assert fuse_gelu(shared)[1] == []


# ----------------------------------------------------------------------------- real conversions
def _torchscript_gelu_model(path: Path) -> Path:
    """Conv -> GELU -> Conv -> GELU -> mean -> Linear -> GELU -> Linear, exported by the TorchScript exporter."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GELU(), nn.Conv2d(16, 16, 1), nn.GELU())
            self.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    torch.onnx.export(
        net,
        torch.randn(1, 3, 32, 32),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["logits"],
    )
    return path


@pytest.fixture(scope="module")
def gelu_torchscript(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    path = _torchscript_gelu_model(tmp_path_factory.mktemp("gelu") / "gelu_ts.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Erf") == 3 and "Gelu" not in ops, "the TorchScript exporter spells GELU out with Erf"
    return path


@pytest.fixture(scope="module")
def gelu_converted(gelu_torchscript: Path, tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    out = tmp_path_factory.mktemp("gelu_conv") / "out"
    code = main(
        [
            "convert",
            str(gelu_torchscript),
            "-o",
            str(out),
            "-q",
            "--max-images",
            "40",
            "--images",
            str(assets / "data" / "imagenet-sample"),
        ]
    )
    assert code == 0
    return out


def test_torchscript_gelu_converts_to_builtin_gelu_without_flex(gelu_converted: Path) -> None:
    from edgeship import tflite_graph
    from edgeship.runtime.interpreter import TFLiteModel

    model = gelu_converted / "model_float32.tflite"
    assert tflite_graph.custom_ops(model.read_bytes()) == {}
    ops = TFLiteModel(model, backend="ai_edge_litert").op_names()
    assert ops.count("GELU") == 3 and not [o for o in ops if o.startswith("Flex")], ops
    report = json.loads((gelu_converted / "convert_report.json").read_text())
    assert any("3 exact-erf GELU(s)" in fix for fix in report["fixes"]), report["fixes"]
    assert report["xnnpack"]["partitions"] == 1 and report["xnnpack"]["outside"] == {}, report["xnnpack"]
    check = report["verification"]["float32"]
    assert check["top1_agreement"] == 1.0 and check["mean_cosine"] >= 0.9999, check
    assert check["max_abs_error"] < 1e-5, check


def test_torchscript_gelu_runs_on_the_device_interpreter(gelu_converted: Path, gelu_torchscript: Path) -> None:
    """Loaded, allocated and run by ai-edge-litert in a process without TensorFlow, and it matches onnxruntime."""
    import onnxruntime as ort

    from edgeship.runtime.interpreter import TFLiteModel
    from edgeship.runtime.model_check import check_model_files

    model = gelu_converted / "model_float32.tflite"
    assert check_model_files([model], backend="ai_edge_litert") == {model: None}
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(gelu_torchscript), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = TFLiteModel(model, backend="ai_edge_litert").run(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def _tan_model(path: Path) -> Path:
    """The tiny classifier with a ``Tan`` after its ReLU: onnx2tf can only write it as a Select op (FlexTan)."""
    from onnx import helper, numpy_helper

    model = tiny_classifier()
    nodes = list(model.graph.node)
    relu = [n.op_type for n in nodes].index("Relu")
    nodes[relu].output[0] = "r0"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "k_tan"))
    extra = [helper.make_node("Mul", ["r0", "k_tan"], ["r_half"]), helper.make_node("Tan", ["r_half"], ["r1"])]
    del model.graph.node[:]
    model.graph.node.extend(nodes[: relu + 1] + extra + nodes[relu + 1 :])
    return save(model, path)


def test_model_needing_select_tf_ops_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["convert", str(_tan_model(tmp_path / "tan.onnx")), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (
        "edgeship convert: error: the converted model needs TensorFlow Select ops the on-device runtime "
        "does not have: FlexTan x1 (replace those ops in the ONNX model)"
    ), err
    assert not out.exists()


@pytest.fixture(scope="module")
def flex_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """onnx2tf's TFLite of the Tan model (one FlexTan), made without edgeship's checks."""
    from edgeship.convert.converter import run_onnx2tf

    work = tmp_path_factory.mktemp("flex")
    run_onnx2tf(_tan_model(work / "tan.onnx"), work)
    return work / "tf" / "model_float32.tflite"


def test_host_interpreter_refuses_flex_even_with_tensorflow_loaded(flex_tflite: Path) -> None:
    """With TensorFlow imported, the interpreter would run FlexTan through TensorFlow's Flex delegate."""
    pytest.importorskip("tensorflow")
    from edgeship import tflite_graph
    from edgeship.errors import InputError
    from edgeship.runtime.interpreter import TFLiteModel
    from edgeship.runtime.model_check import check_model_files

    assert tflite_graph.custom_ops(flex_tflite.read_bytes()) == {"FlexTan": 1}
    with pytest.raises(InputError, match="TensorFlow Select ops the on-device runtime does not have: FlexTan x1"):
        TFLiteModel(flex_tflite, backend="ai_edge_litert")
    assert "Select TensorFlow op" in (check_model_files([flex_tflite], backend="ai_edge_litert")[flex_tflite] or "")


def test_flex_delegate_nodes_are_not_xnnpack_partitions(flex_tflite: Path) -> None:
    """An interpreter with TensorFlow's Flex delegate lists FlexTan under a DELEGATE node of its own."""
    pytest.importorskip("tensorflow")
    from ai_edge_litert.interpreter import Interpreter

    from edgeship.runtime.delegation import of_interpreter

    interpreter = Interpreter(model_path=str(flex_tflite))
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()
    assert sum(op["op_name"] == "DELEGATE" for op in ops) >= 2, "expected a Flex and an XNNPACK node"
    figures = of_interpreter(interpreter)
    assert figures.outside == {"FlexTan": 1}, figures
    assert figures.partitions == sum(op["op_name"] == "DELEGATE" for op in ops) - 1
    assert figures.delegated_ops == figures.ops - 1


def test_delegation_figures_leave_flex_nodes_out() -> None:
    """Two XNNPACK partitions around one FlexErf: 2 partitions, the FlexErf outside (no interpreter needed)."""
    from edgeship.runtime.delegation import delegation

    ops = [
        {"op_name": "CONV_2D", "inputs": [0, 1], "outputs": [2]},
        {"op_name": "FlexErf", "inputs": [2], "outputs": [3]},
        {"op_name": "ADD", "inputs": [3, 2], "outputs": [4]},
        {"op_name": "DELEGATE", "inputs": [2], "outputs": [3]},  # TensorFlow's Flex delegate
        {"op_name": "DELEGATE", "inputs": [0, 1], "outputs": [2]},  # XNNPACK
        {"op_name": "DELEGATE", "inputs": [3, 2], "outputs": [4]},  # XNNPACK
    ]
    figures = delegation(ops, {3: "erf_out"})
    assert (figures.partitions, figures.ops, figures.delegated_ops) == (2, 3, 2)
    assert figures.outside == {"FlexErf": 1} and figures.outside_outputs == ("erf_out",)
