"""Equalization of the real MobileNetV2 (issue 33, point 2): exact with ReLU6 kept, bounded ranges, either method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_assets

onnx = pytest.importorskip("onnx")


def _outputs(model, pixels: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    from edgeship.reference import OrtRunner

    runner = OrtRunner(model.SerializeToString())
    return np.concatenate([runner.run(pixels[i : i + 1]).reshape(1, -1) for i in range(len(pixels))])


@pytest.fixture(scope="module")
def mobilenet(assets: Path):  # type: ignore[no-untyped-def]
    from edgeship.runtime.card import Preprocessing
    from edgeship.runtime.images import iter_pixels, list_images, normalize

    prep = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    files = list(list_images(assets / "data" / "imagenet-sample").files)[::50]
    x = np.stack([normalize(p, prep).transpose(2, 0, 1) for p in iter_pixels(files, prep)])
    return onnx.load(str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx")), x


@needs_assets
def test_exact_equalization_keeps_the_float_model_and_its_relu6(mobilenet) -> None:  # type: ignore[no-untyped-def]
    from edgeship.quantize.equalize import equalize
    from edgeship.runtime.metrics import compare

    model, x = mobilenet
    eq, info = equalize(model)
    assert info["method"] == "headroom" and info["pairs"] == 34 and info["relu6"] == "exact"
    assert info["relu6_changed"] == 34 and info["largest_shrink"] > 1
    assert info["channel_range_spread_after"] < 0.7 * info["channel_range_spread_before"]
    ops = [n.op_type for n in eq.graph.node]
    assert ops.count("Clip") == [n.op_type for n in model.graph.node].count("Clip")  # ReLU6 stays (fused in TFLite)
    limits = [onnx.numpy_helper.to_array(t) for t in eq.graph.initializer if t.name.endswith("__edgeship_limit")]
    assert len(limits) == 34 and all(0 < lim.min() and lim.max() <= 6.0 + 1e-5 for lim in limits)
    assert any(np.isclose(lim.max(), 6.0) for lim in limits)
    fig = compare(_outputs(model, x), _outputs(eq, x))
    assert fig.top1_agreement == 1.0 and fig.sqnr_db > 80
    dfq, dfq_info = equalize(model, method="dfq")  # DFQ's square-root scales, ReLU6 kept the same exact way
    assert dfq_info["method"] == "dfq" and dfq_info["relu6_changed"] == 34
    fig = compare(_outputs(model, x), _outputs(dfq, x))
    assert fig.top1_agreement == 1.0 and fig.sqnr_db > 80


@needs_assets
def test_dfq_relu_replacement_changes_this_model_and_says_so(mobilenet) -> None:  # type: ignore[no-untyped-def]
    """DFQ's ReLU6 -> ReLU is not exact on a model trained with ReLU6 that clips: measured, not assumed."""
    from edgeship.quantize.equalize import equalize
    from edgeship.runtime.metrics import compare

    model, x = mobilenet
    eq, info = equalize(model, method="dfq", relu6="relu")
    assert info["relu6"] == "relu" and "Clip" not in {n.op_type for n in eq.graph.node if "edgeship" in n.name}
    fig = compare(_outputs(model, x), _outputs(eq, x))
    assert fig.sqnr_db < 20  # far from exact
    for bad in ({"relu6": "gelu"}, {"relu6": "relu"}, {"method": "sqrt"}):  # ReLU only with DFQ's scales
        with pytest.raises(ValueError, match="must be one of"):
            equalize(model, **bad)


@needs_assets
def test_channels_that_never_fire_are_zeroed_exactly_where_they_stay_dead(mobilenet) -> None:  # type: ignore[no-untyped-def]
    from edgeship.quantize.equalize import channel_stats, equalize
    from edgeship.runtime.metrics import compare

    model, x = mobilenet
    plain, before = equalize(model)
    pruned, info = equalize(model, stats=channel_stats(x))
    assert info["dead_channels_zeroed"] > 0 and before["dead_channels_zeroed"] == 0
    assert info["channel_range_spread_after"] < 0.7 * before["channel_range_spread_after"]  # 0.62 measured
    fig = compare(_outputs(model, x), _outputs(pruned, x))  # the images it measured on: exact
    assert fig.top1_agreement == 1.0 and fig.sqnr_db > 80
