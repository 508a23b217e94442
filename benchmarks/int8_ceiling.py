"""How high an int8 model's SQNR can go on each architecture, and at what speed (issue 12's budget point).

On the architecture matrix's protocol (tests/archs.py models, calibration on 100 shared
images chosen as ``edgeship quantize`` chooses by default, SQNR of the logits on the other
400 against the float ONNX model run by onnxruntime), for each model:

    weights   int8 weights (per-channel, round to nearest) with float activations, simulated
              in the float model: the error of the weights alone
    io        the float model with only its input, then only its output, on the default int8
              model's I/O grid: no model with int8 I/O does better than the output's figure
    default   ``edgeship quantize`` with its defaults
    ceiling   every op but the convolutions and matrix multiplies float (int8 only where the
              time goes; the range method the default chose): near the most any model with
              int8 convolutions reaches
    budget    ``quantize --min-sqnr 20 --min-speedup 0``: what the budget search keeps float
              for 20 dB with no speed floor
    floor     ``quantize --min-sqnr 20 --min-speedup 1.25``: the same under issue 12's floor
    int16     TFLite's 16x8 scheme (int16 activations, int8 weights, TensorFlow's min-max
              ranges); XNNPACK has no kernels for it, so it runs on the reference kernels

and float32 against each model at 1 thread on XNNPACK, interleaved in one run (median).

    python benchmarks/int8_ceiling.py                      # EfficientNet-B0, MobileNetV3-S/-L, ViT-tiny
    python benchmarks/int8_ceiling.py --models vit_tiny --columns weights,default,ceiling
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/archs.py and arch_matrix.py

from benchmarks.arch_matrix import (  # noqa: E402
    NUM_CALIB,
    NUM_EVAL,
    Protocol,
    cases,
    cell,
    convert_model,
    figures,
    one_line,
    tflite_outputs,
)
from edgeship._assets import shared_assets  # noqa: E402
from edgeship.reference import load_pixels, run_onnx  # noqa: E402
from edgeship.runtime.card import ModelCard  # noqa: E402
from tests import archs  # noqa: E402

MODELS = ("efficientnet_b0", "mobilenetv3_small", "mobilenetv3_large", "vit_tiny")
COLUMNS = ("weights", "io", "default", "ceiling", "budget", "floor", "int16")
BUDGET_DB = 20.0
FLOOR = 1.25
#: Weight tensors by op: the axis that holds output channels.
CHANNEL_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}


def weights_only(float_model: bytes) -> bytes:
    """The float model with every conv/FC weight rounded to a per-channel symmetric int8 grid."""
    from tensorflow.lite.tools import flatbuffer_utils as fbu

    from edgeship import tflite_graph as g

    m = g.read(float_model)
    sg = m.subgraphs[0]
    for op in sg.operators:
        axis = CHANNEL_AXIS.get(g.op_name(m, op))
        if axis is None or len(op.inputs) < 2:
            continue
        t = sg.tensors[op.inputs[1]]
        buf = m.buffers[t.buffer]
        if buf.data is None or not len(buf.data) or g.dtype_name(t) != "float32":
            continue
        w = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), np.float32).reshape(t.shape)
        scale = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True) / 127
        scale[scale == 0] = 1.0
        buf.data = np.frombuffer((np.round(w / scale) * scale).astype(np.float32).tobytes(), np.uint8)
    return bytes(fbu.convert_object_to_bytearray(m))


def io_grids(float_path: Path, int8_path: Path, pixels: np.ndarray, prep: Any, ref: np.ndarray) -> dict[str, Any]:
    """SQNR of the float model with its input on the int8 model's input grid, and of its outputs on the output grid."""
    from edgeship.quantize.pipeline import output_grid_db
    from edgeship.runtime.images import normalize
    from edgeship.runtime.interpreter import TFLiteModel

    q = TFLiteModel(int8_path, use_xnnpack=False)
    f = TFLiteModel(float_path, num_threads=2)
    found: dict[str, Any] = {}
    if q.input.quantized:
        x = q.input_from_pixels(pixels, prep).astype(np.float32)
        x = (x - q.input.zero_point) * np.float32(q.input.scale)
        grid_in = np.concatenate([f.run(x[i : i + 1]).reshape(1, -1) for i in range(len(x))])
        exact = np.concatenate([f.run(normalize(pixels[i : i + 1], prep)).reshape(1, -1) for i in range(len(x))])
        found["input_grid_db"] = figures(exact, grid_in)["sqnr_db"]
    limit = output_grid_db(int8_path.read_bytes(), ref)  # what quantize reports as int8_output_limit_db
    if limit is not None:
        found["output_grid_db"] = round(limit, 2)
    return found


def quantize_16x8(float_model: bytes, inputs: np.ndarray) -> bytes:
    """TFLite's 16x8 model (int16 activations, int8 weights, min-max ranges), float I/O (in a child).

    TensorFlow makes it with its older quantizer (symmetric int16, which the kernels require), so
    it calibrates again here instead of reusing the int8 calibration.
    """
    from edgeship._deps import require

    tf = require("tensorflow", purpose="quantize models")
    from tensorflow.lite.python.optimize import calibrator

    def dataset() -> Any:
        for k in range(len(inputs)):
            yield [inputs[k : k + 1]]

    c = calibrator.Calibrator(float_model)
    return bytes(c.calibrate_and_quantize(dataset, tf.float32, tf.float32, False, activations_type=tf.int16))


def calibrated_model(native: Any, float_model: bytes, calib_px: np.ndarray, prep: Any) -> bytes:
    """TensorFlow's calibration of the float model on the calibration images (edgeship's rewrites applied)."""
    from edgeship.quantize import rewrites, tflite_quant
    from edgeship.runtime.images import normalize

    calibrated = native.call("calibrate (TensorFlow)", tflite_quant.calibrate, float_model, normalize(calib_px, prep))
    return rewrites.apply(calibrated)[0]


def ceiling_model(native: Any, calibrated: bytes, calib_px: np.ndarray, prep: Any, chosen: str) -> tuple[bytes, int]:
    """The int8 model with every op but the large matrix ops float, ranges by the default's chosen method."""
    from edgeship.quantize import histograms, mixed, ranges, tflite_quant
    from edgeship.runtime.images import normalize
    from edgeship.runtime.interpreter import TFLiteModel

    choice = next(c for c in ranges.CROSS_FIT_CANDIDATES if c.label == chosen)
    hists = histograms.collect_histograms(
        calibrated,
        tflite_quant.read_ranges(calibrated),
        (normalize(calib_px[i : i + 1], prep) for i in range(len(calib_px))),
    )
    m = TFLiteModel(calibrated, use_xnnpack=False)
    fitted = choice.fit(hists, 99.999, keep={m.input.index, m.output.index})
    nodes = mixed.float_except_matrix(mixed.read_ops(calibrated))
    model = native.call(
        "quantize (TensorFlow)",
        tflite_quant.quantize_calibrated,
        tflite_quant.set_ranges(calibrated, fitted),
        denylisted_nodes=nodes,
    )
    return model, len(nodes)


def quantize_api(conv_dir: Path, proto: Protocol, out: Path, **options: Any) -> tuple[Path, dict[str, Any]]:
    """``edgeship.quantize`` on the protocol's calibration images; the model it writes and its report.

    A kept ``--work`` folder's model is reused when its report was made with the same options
    (``edgeship quantize ... -o <work>/<model>/<column>`` on the command line makes one too).
    """
    from edgeship.quantize import QuantizeOptions, quantize

    wanted = QuantizeOptions(num_calib=NUM_CALIB, **options)
    kept = out / "quant_report.json"
    if kept.is_file():
        report = json.loads(kept.read_text())
        same = all(
            report["options"].get(k) == v
            for k, v in wanted.to_dict().items()
            if k in ("num_calib", "seed", "method", "min_sqnr_db", "min_speedup", "float_islands")
        )
        if same and (out / report["output"]).is_file():
            return out / report["output"], report
    result = quantize(conv_dir, proto.folder, options=replace(wanted, max_eval=50))
    result.save(out, force=True)
    return out / result.model_file, result.report.to_dict()


def speeds(paths: dict[str, Path], runs: int) -> dict[str, dict[str, float]]:
    """Median and fastest ms of each model at 1 thread, XNNPACK, interleaved in one run (float32 first)."""
    from edgeship.runtime.bench import BenchOptions, benchmark

    doc = benchmark(list(paths.values()), BenchOptions(threads=(1,), runs=runs, warmup=10))
    return {
        label: {"p50_ms": round(r.stats.p50_ms, 3), "min_ms": round(r.stats.min_ms or 0.0, 3)}
        for label, r in zip(paths, doc.results)
    }


def measure(name: str, exporter: str, proto: Protocol, columns: set[str]) -> dict[str, Any]:
    """Every column for one model."""
    from edgeship._child import ChildWorker

    arch, work = archs.ARCHS[name], proto.work / f"{name}-{exporter}"
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"model": name, "exporter": exporter}
    onnx_path = archs.build(name, exporter)
    conv_dir = work / "convert"
    row["convert"] = cell(lambda: convert_model(onnx_path, arch, conv_dir, proto))
    if "error" in row["convert"]:
        return row
    prep = ModelCard.load(conv_dir / "model_card.json").preprocessing
    calib_set, eval_set = proto.split()
    ref = run_onnx(str(onnx_path), load_pixels(eval_set, arch.prep), arch.prep)
    eval_px, calib_px = load_pixels(eval_set, prep), load_pixels(calib_set, prep)
    float_path = conv_dir / "model_float32.tflite"
    float_model = float_path.read_bytes()
    paths: dict[str, Path] = {"float32": float_path}

    def score(label: str, path: Path, timed: bool = True, **extra: Any) -> dict[str, Any]:
        if timed:
            paths[label] = path
        return {**figures(ref, tflite_outputs(path, eval_px, prep, xnnpack=True)), **extra}

    if "weights" in columns:
        row["weights"] = cell(
            lambda: score("weights", _write(work / "weights_only.tflite", weights_only(float_model)), timed=False)
        )
    chosen = "percentile 99.9999"
    if "default" in columns or "ceiling" in columns:

        def default() -> dict[str, Any]:
            nonlocal chosen
            path, report = quantize_api(conv_dir, proto, work / "default")
            chosen = report["ranges"].get("auto", {}).get("chosen", chosen)
            return score("default", path, range_method=chosen)

        row["default"] = cell(default)
    if "io" in columns and "default" in paths:
        row["io"] = cell(lambda: io_grids(float_path, paths["default"], eval_px, prep, ref))
    with ChildWorker() as native:
        calibrated: list[bytes] = []

        def cal() -> bytes:
            if not calibrated:
                calibrated.append(calibrated_model(native, float_model, calib_px, prep))
            return calibrated[0]

        if "ceiling" in columns:

            def ceiling() -> dict[str, Any]:
                model, nodes = ceiling_model(native, cal(), calib_px, prep, chosen)
                return score("ceiling", _write(work / "ceiling.tflite", model), float_ops=nodes)

            row["ceiling"] = cell(ceiling)
        if "int16" in columns:
            row["int16"] = cell(
                lambda: _int16(native, float_model, calib_px, work, float_path, eval_px, prep, ref, proto.latency_runs)
            )
    for label, floor in (("budget", 0.0), ("floor", FLOOR)):
        if label in columns:

            def budgeted(label: str = label, floor: float = floor) -> dict[str, Any]:
                path, report = quantize_api(conv_dir, proto, work / label, min_sqnr_db=BUDGET_DB, min_speedup=floor)
                found = report.get("mixed_precision") or {}
                return score(
                    label,
                    path,
                    float_ops=found.get("float_ops", 0),
                    ceiling_calib_db=found.get("int8_matrix_ceiling_db"),
                )

            row[label] = cell(budgeted)
    if proto.latency_runs > 0 and len(paths) > 1:
        row["speed"] = cell(lambda: speeds(paths, proto.latency_runs))
    return row


def _int16(
    native: Any,
    float_model: bytes,
    calib_px: np.ndarray,
    work: Path,
    float_path: Path,
    eval_px: np.ndarray,
    prep: Any,
    ref: np.ndarray,
    runs: int,
) -> dict[str, Any]:
    """16x8 on the reference kernels: SQNR on the first 100 evaluation images (slow kernels) and speed."""
    from edgeship.runtime.bench import BenchOptions, benchmark
    from edgeship.runtime.images import normalize

    try:
        model = native.call("quantize 16x8 (TensorFlow)", quantize_16x8, float_model, normalize(calib_px, prep))
    except RuntimeError as exc:  # e.g. "Quantization to 16x8-bit not yet supported for op: 'HARD_SWISH'", per op
        ops = sorted(set(re.findall(r"not yet supported for op: '(\w+)'", str(exc))))
        return {"error": f"TensorFlow's 16x8 quantizer does not support {', '.join(ops)}" if ops else one_line(exc)}
    path = _write(work / "int16x8.tflite", model)
    try:  # in the child: TensorFlow's 16x8 ViT-tiny model aborts the process that runs it
        found = figures(
            ref[:100],
            native.call("run the 16x8 model (reference kernels)", tflite_outputs, path, eval_px[:100], prep, False),
        )
    except Exception as exc:  # noqa: BLE001 - a model TensorFlow wrote that no kernel prepares or runs
        node = re.search(r"\((\w+)\) failed to prepare", str(exc))
        why = f"{node.group(1)} fails to prepare" if node else "it crashes"
        return {"error": f"the 16x8 model does not run: {why} ({one_line(exc)[-80:]})"}
    if runs > 0:
        doc = benchmark([float_path, path], BenchOptions(threads=(1,), runs=max(runs // 10, 5), warmup=2))
        f, q = (r.stats.p50_ms for r in doc.results)
        found.update(ms=round(q, 2), float32_ms=round(f, 2), speedup=round(f / q, 3), images=100)
    return found


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = [
        "model",
        "weights-only dB",
        "int8 input / output grid alone dB",
        "default dB / x",
        "ceiling dB / x (float ops)",
        "budget 20, no floor: dB / x",
        f"budget 20, floor {FLOOR}: dB / x",
        "16x8 dB / x (reference kernels)",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r.get("speed") or {}
        f32 = (sp.get("float32") or {}).get("p50_ms")

        def q(label: str, r: dict = r, sp: dict = sp, f32: float | None = f32) -> str:
            d = r.get(label)
            if not d:
                return "-"
            if "error" in d:
                return "error: " + d["error"][:60]
            ms = (sp.get(label) or {}).get("p50_ms")
            x = f" / {f32 / ms:.2f}x" if ms and f32 else ""
            ops = f" ({d['float_ops']})" if "float_ops" in d else ""
            return f"{d['sqnr_db']:.1f}{x}{ops}"

        i16 = r.get("int16") or {}
        i16s = (
            i16["error"]
            if "error" in i16
            else (f"{i16['sqnr_db']:.1f} / {i16['speedup']:.2f}x" if "speedup" in i16 else q("int16"))
        )
        w, io = r.get("weights") or {}, r.get("io") or {}
        grids = (
            f"{io.get('input_grid_db', '-')} / {io.get('output_grid_db', '-')}"
            if "error" not in io
            else "error: " + io["error"][:60]
        )
        out.append(
            f"| {r['model']} ({r['exporter']}) | {w.get('sqnr_db', '-')} | {grids} | {q('default')} | "
            f"{q('ceiling')} | {q('budget')} | {q('floor')} | {i16s} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names, optionally name:exporter")
    ap.add_argument("--exporter", choices=archs.EXPORTERS, default="dynamo")
    ap.add_argument("--columns", default=",".join(COLUMNS), help=f"subset of {','.join(COLUMNS)}")
    ap.add_argument("--runs", type=int, default=200, help="latency: invokes per model (0: skip)")
    ap.add_argument("--work", type=Path, help="keep the converted and quantized models here")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    assets = shared_assets()
    if assets is None:
        ap.error("shared assets not found (set EDGE_ASSETS or check out ../shared)")
    columns = set(args.columns.split(","))
    if columns - set(COLUMNS):
        ap.error(f"unknown column(s) {sorted(columns - set(COLUMNS))}; known: {', '.join(COLUMNS)}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="int8-ceiling-") as tmp:
        proto = Protocol(assets, args.work or Path(tmp), latency_runs=args.runs)
        for name, exporter in cases(argparse.Namespace(models=args.models, exporter=args.exporter, full=False)):
            print(f"== {name} ({exporter})", file=sys.stderr, flush=True)
            start = time.perf_counter()
            rows.append({**measure(name, exporter, proto, columns), "total_s": round(time.perf_counter() - start, 1)})
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(
        f"calibration: {NUM_CALIB} shared images (edgeship's default choice); SQNR of the logits on the other "
        f"{NUM_EVAL} against "
        f"the float ONNX model; speed-up over float32 at 1 thread, XNNPACK, interleaved in one run (median)"
    )
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
