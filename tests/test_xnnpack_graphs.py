"""Whole graphs inside XNNPACK: delegation figures, float clean-ups, int8 float islands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeship import tflite_graph
from edgeship.cli import main
from edgeship.runtime.delegation import delegation, of_interpreter
from edgeship.runtime.interpreter import TFLiteModel


def _tflite(fn, shape: tuple[int, ...]) -> bytes:
    import tensorflow as tf

    concrete = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)]).get_concrete_function()
    return bytes(tf.lite.TFLiteConverter.from_concrete_functions([concrete]).convert())


@pytest.fixture(scope="module")
def se_like() -> bytes:
    """A squeeze-excite-like float graph with what onnx2tf leaves: an identity GATHER and a RELU_0_TO_1."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((3, 3, 3, 8)).astype(np.float32) * 0.3)

    def fn(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        g = tf.gather(tf.nn.relu(tf.reduce_mean(y, axis=[1, 2])), tf.range(8), axis=1)  # identity permutation
        return tf.reduce_mean(y * g[:, None, None, :], axis=[1, 2])

    model = tflite_graph.read(_tflite(fn, (1, 16, 16, 3)))
    (relu,) = tflite_graph.ops_of(model, "RELU")
    relu.opcodeIndex = tflite_graph.opcode_index(model, "RELU_0_TO_1")  # what onnx2tf makes of a HardSigmoid
    return tflite_graph.write(model)


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    return TFLiteModel(model, use_xnnpack=False).run(x)


def test_cleanups_are_exact_and_leave_one_partition(se_like: bytes) -> None:
    before = of_interpreter(TFLiteModel(se_like).interpreter)
    assert before.partitions > 1 and {"GATHER", "RELU_0_TO_1"} <= set(before.outside)
    cleaned, counts = tflite_graph.clean(se_like)
    assert counts == {"identity_gather": 1, "relu_0_to_1_as_relu6": 1}
    after = of_interpreter(TFLiteModel(cleaned).interpreter)
    assert after.partitions == 1 and after.outside == {}
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(cleaned, x), _run(se_like, x), rtol=1e-5, atol=1e-6)
    assert tflite_graph.clean(cleaned) == (cleaned, {})  # nothing left to do


def test_gather_of_a_vector_with_shaped_indices_becomes_a_reshape() -> None:
    """ConvNeXt's head after onnx2tf: GATHER(x[640], indices [1, 640, 1, 1] = arange)."""
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(2).standard_normal((3, 3, 3, 8)).astype(np.float32))

    def fn(x):
        v = tf.reshape(tf.reduce_mean(tf.nn.conv2d(x, w, 1, "SAME"), axis=[1, 2]), [8])
        return tf.reshape(tf.gather(v, tf.reshape(tf.range(8), [1, 8, 1, 1])), [1, 8]) * 2.0

    model = _tflite(fn, (1, 8, 8, 3))
    cleaned, counts = tflite_graph.clean(model)
    assert counts == {"identity_gather": 1}
    assert of_interpreter(TFLiteModel(model).interpreter).outside == {"GATHER": 1}
    x = np.random.default_rng(3).standard_normal((1, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(cleaned, x), _run(model, x))
    assert of_interpreter(TFLiteModel(cleaned).interpreter).partitions == 1


def test_delegation_walks_partitions() -> None:
    ops = [
        {"op_name": "CONV_2D", "inputs": [0, 1], "outputs": [2]},
        {"op_name": "GATHER", "inputs": [2, 3], "outputs": [4]},
        {"op_name": "ADD", "inputs": [4, 5], "outputs": [6]},
        {"op_name": "DELEGATE", "inputs": [0, 1], "outputs": [2]},
        {"op_name": "DELEGATE", "inputs": [4, 5], "outputs": [6]},
    ]
    d = delegation(ops, {4: "gathered"})
    assert (d.partitions, d.ops, d.delegated_ops, d.outside, d.outside_outputs) == (
        2,
        3,
        2,
        {"GATHER": 1},
        ("gathered",),
    )


def _hardswish_model():
    """Conv -> HardSwish -> Conv -> HardSwish -> GlobalAveragePool -> Flatten -> Gemm (a MobileNetV3 trunk)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    init = lambda n, s, k=0.3: numpy_helper.from_array((rng.standard_normal(s) * k).astype(np.float32), n)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h1"]),
        helper.make_node("Conv", ["h1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c2"], ["h2"]),
        helper.make_node("GlobalAveragePool", ["h2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "hs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [
            init("w1", (16, 3, 3, 3)),
            init("b1", (16,), 0.1),
            init("w2", (16, 16, 3, 3), 0.15),
            init("b2", (16,), 0.1),
            init("wf", (10, 16)),
            init("bf", (10,), 0.1),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def test_int8_keeps_ops_without_int8_kernels_as_float_islands(tmp_path: Path, calib_images: Path) -> None:
    import onnx

    onnx.save(_hardswish_model(), str(tmp_path / "hs.onnx"))
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "hs.onnx"), "--calib", str(calib_images), "-o", str(out), "-q"]) == 0
    runs = json.loads((out / "quant_report.json").read_text())["runs_on"]
    assert runs["delegation"]["partitions"] == 1, runs
    assert len(runs["float_islands"]) == 2 and runs["all_int8_delegation"]["outside"] == {"HARD_SWISH": 2}
    full = tmp_path / "full"
    assert main(["quantize", str(out), "--calib", str(calib_images), "-o", str(full), "-q", "--full-integer"]) == 0
    runs = json.loads((full / "quant_report.json").read_text())["runs_on"]
    assert "float_islands" not in runs and runs["delegation"]["outside"] == {"HARD_SWISH": 2}


def _token_model(indices: object) -> bytes:
    """A ViT-like tail: patch conv -> tokens [1, 16, 8] -> GATHER(tokens, indices, axis=1) -> dense."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    w = tf.constant(rng.standard_normal((4, 4, 3, 8)).astype(np.float32) * 0.3)
    fc = tf.constant(rng.standard_normal((8, 10)).astype(np.float32))

    def fn(x):
        tokens = tf.reshape(tf.nn.conv2d(x, w, 4, "VALID"), [1, 16, 8])
        picked = tf.gather(tokens, tf.constant(indices, tf.int32), axis=1)
        return tf.matmul(tf.reshape(picked, [1, -1])[:, :8], fc)

    return _tflite(fn, (1, 16, 16, 3))


@pytest.mark.parametrize("indices", [0, 15, [2, 3, 4]], ids=["class-token", "last-token", "run"])
def test_constant_gather_becomes_a_slice_inside_xnnpack(indices: object) -> None:
    """ViT's class token ``x[:, 0]``: onnx2tf writes GATHER(x, 0, axis=1) before the classifier."""
    model = _token_model(indices)
    assert of_interpreter(TFLiteModel(model).interpreter).outside == {"GATHER": 1}
    cleaned, counts = tflite_graph.clean(model)
    assert counts == {"constant_gather_as_slice": 1}
    after = of_interpreter(TFLiteModel(cleaned).interpreter)
    assert (after.partitions, after.outside) == (1, {})
    x = np.random.default_rng(6).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(cleaned, x), _run(model, x))


def test_scattered_gather_is_left_alone() -> None:
    model = _token_model([0, 2])
    assert tflite_graph.clean(model) == (model, {})


def test_grouped_conv_with_one_channel_per_group_becomes_depthwise() -> None:
    """ConvNeXt's 7x7 depthwise convs: onnx2tf writes most as CONV_2D with a [C*m, 7, 7, 1] filter."""
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(7).standard_normal((7, 7, 1, 32)).astype(np.float32) * 0.3)  # m = 2

    def fn(x):
        return tf.nn.relu(tf.nn.conv2d(x, w, 2, "SAME") + 0.5)

    model = _tflite(fn, (1, 15, 15, 16))
    graph = tflite_graph.read(model)
    assert [tflite_graph.op_name(graph, op) for op in graph.subgraphs[0].operators] == ["CONV_2D"]
    cleaned, counts = tflite_graph.clean(model)
    assert counts == {"grouped_conv_as_depthwise": 1}
    (op,) = tflite_graph.read(cleaned).subgraphs[0].operators
    assert tflite_graph.op_name(tflite_graph.read(cleaned), op) == "DEPTHWISE_CONV_2D"
    assert (
        op.builtinOptions.depthMultiplier,
        op.builtinOptions.strideH,
        op.builtinOptions.fusedActivationFunction,
    ) == (2, 2, 1)
    x = np.random.default_rng(8).standard_normal((1, 15, 15, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(cleaned, x), _run(model, x), rtol=1e-5, atol=1e-5)


def _padded_max_pool(relu: bool) -> bytes:
    """ResNet's stem after onnx2tf: conv (+ReLU) -> PADV2(-FLT_MAX) -> MAX_POOL_2D 3x3/2 VALID."""
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(9).standard_normal((3, 3, 3, 8)).astype(np.float32))

    def fn(x):
        y = tf.nn.conv2d(x, w, 1, "SAME")
        y = tf.nn.relu(y) if relu else y
        y = tf.pad(y, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=float(np.finfo(np.float32).min))
        return tf.nn.max_pool2d(y, 3, 2, "VALID")

    return _tflite(fn, (1, 16, 16, 3))


def test_padded_max_pool_after_relu_pads_with_zero() -> None:
    model = _padded_max_pool(relu=True)
    assert of_interpreter(TFLiteModel(model).interpreter).outside == {"PADV2": 1}
    cleaned, counts = tflite_graph.clean(model)
    assert counts == {"max_pool_pad_after_relu": 1}
    after = of_interpreter(TFLiteModel(cleaned).interpreter)
    assert (after.partitions, after.outside) == (1, {})
    x = np.random.default_rng(10).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(cleaned, x), _run(model, x))


def test_padded_max_pool_of_signed_values_keeps_its_pad() -> None:
    model = _padded_max_pool(relu=False)
    assert tflite_graph.clean(model) == (model, {})


def test_large_depthwise_convolutions_are_the_timed_placement_candidates() -> None:
    """Issue 13: 7x7 and 5x5 depthwise convs may run slower in int8 on XNNPACK; 3x3 ones and dense convs are not
    candidates."""
    import tensorflow as tf

    from edgeship.quantize.mixed import slow_int8_candidates

    rng = np.random.default_rng(0)
    dw = {k: tf.constant(rng.standard_normal((k, k, 8, 1)).astype(np.float32)) for k in (3, 5, 7)}
    dense = tf.constant(rng.standard_normal((7, 7, 8, 8)).astype(np.float32))

    def fn(x):
        for k in (3, 7, 5):
            x = tf.nn.relu(tf.nn.depthwise_conv2d(x, dw[k], [1, 1, 1, 1], "SAME"))
        return tf.reduce_mean(tf.nn.conv2d(x, dense, 1, "SAME"), axis=[1, 2])

    model = _tflite(fn, (1, 16, 16, 8))
    m = tflite_graph.read(model)
    sg = m.subgraphs[0]
    kernels = {
        tflite_graph.tensor_name(sg.tensors[op.outputs[0]]): int(sg.tensors[op.inputs[1]].shape[1])
        for op in tflite_graph.ops_of(m, "DEPTHWISE_CONV_2D")
    }
    assert sorted(kernels.values()) == [3, 5, 7]
    found = slow_int8_candidates(model)
    assert sorted(kernels[n] for n in found) == [5, 7]
