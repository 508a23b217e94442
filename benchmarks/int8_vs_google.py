"""edgeship's int8 model next to Google's int8 MobileNetV2 builds, accuracy and speed, in one run.

Protocol of the quantize issue: calibrate on the first 100 shared ImageNet images by name,
evaluate on the other 400. Prints, for each model: top-1 agreement with the fp32 ONNX
reference (onnxruntime), top-1/top-5 accuracy, mean cosine of the logits (edgeship's
models only: Google's output softmax probabilities), size; then an interleaved latency
run (ai-edge-litert, XNNPACK) with ratios.

    python benchmarks/int8_vs_google.py [--quant-dir DIR] [--threads 1,2] [--runs 300]

Without --quant-dir it runs `edgeship convert` + `edgeship quantize` into a temp folder first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgeship._assets import shared_assets
from edgeship.reference import load_pixels
from edgeship.runtime.bench import BenchOptions, benchmark, table
from edgeship.runtime.card import ModelCard, Preprocessing
from edgeship.runtime.images import Labels, list_images
from edgeship.runtime.interpreter import TFLiteModel
from edgeship.runtime.metrics import compare
from edgeship.verify.drift import reference_outputs


def google_outputs(model: Path, pixels: np.ndarray) -> np.ndarray:
    """Google's uint8 models take raw pixels; output 1001 uint8 probabilities, index 0 = background."""
    m = TFLiteModel(model)
    rows = []
    for px in pixels:
        m.set_raw_input(px[None].astype(np.uint8))
        m.invoke()
        rows.append(m.dequantize_output(m.raw_output())[0, 1:])
    return np.stack(rows)


def edgeship_outputs(model: Path, card: ModelCard, pixels: np.ndarray) -> np.ndarray:
    """The deployed path: int8 input straight from pixels when the card allows it (as on a device)."""
    m = TFLiteModel(model)
    return np.concatenate([m.run_pixels(pixels[i : i + 1], card.preprocessing) for i in range(len(pixels))])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant-dir", type=Path, help="output folder of `edgeship quantize` (model_int8.tflite)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=300)
    args = ap.parse_args()
    assets = shared_assets()
    if assets is None:
        ap.error("shared assets not found (set EDGE_ASSETS)")
    onnx = assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"
    images = assets / "data" / "imagenet-sample"
    with tempfile.TemporaryDirectory() as tmp:
        qdir = args.quant_dir
        if qdir is None:
            qdir = Path(tmp) / "q"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgeship",
                    "quantize",
                    str(onnx),
                    "--calib",
                    str(images),
                    "--num-calib",
                    "100",
                    "-o",
                    str(qdir),
                    "-q",
                ],
                check=False,
            )  # quantize's defaults
        report(onnx, images, qdir, assets, args)
    return 0


def report(onnx: Path, images: Path, qdir: Path, assets: Path, args: argparse.Namespace) -> None:
    card = ModelCard.load(qdir / "model_int8.card.json")
    evals = list_images(images).split(100)[1]
    labels = Labels.load(assets / "data" / "imagenet_classes.txt")
    truth = evals.labels_for(labels)
    ref = reference_outputs(onnx, list(evals.files), card)
    pixels = load_pixels(evals, Preprocessing.imagenet())
    rows = [("fp32 ONNX (onnxruntime)", onnx, ref, True)]
    float_tfl = qdir / "model_float32.tflite"
    if float_tfl.is_file():
        rows.append(("edgeship float32 TFLite", float_tfl, edgeship_outputs(float_tfl, card, pixels), True))
    rows.append(
        (
            "edgeship int8 (int8 I/O)",
            qdir / "model_int8.tflite",
            edgeship_outputs(qdir / "model_int8.tflite", card, pixels),
            True,
        )
    )
    for name in ("tf2_mobilenet_v2_1.0_224_ptq.tflite", "mobilenet_v2_1.0_224_quant.tflite"):
        path = assets / "models" / name
        rows.append((f"Google {name}", path, google_outputs(path, pixels), False))
    print(f"calibration: first 100 images by name; evaluation: the other {len(evals)} images")
    print(f"{'model':<48}{'agree':>8}{'top-1':>8}{'top-5':>8}{'mean cos':>10}{'MB':>8}")
    for name, path, out, logits in rows:
        f = compare(ref, out, truth)
        cos = f"{f.mean_cosine:.4f}" if logits else "n/a"
        print(
            f"{name:<48}{100 * f.top1_agreement:>7.2f}%{100 * f.cand_top1:>7.2f}%{100 * f.cand_top5:>7.2f}%"
            f"{cos:>10}{path.stat().st_size / 1e6:>8.2f}"
        )
    models = [onnx, *(p for _, p, _, _ in rows[1:])]
    opts = BenchOptions(threads=tuple(int(t) for t in args.threads.split(",")), runs=args.runs, warmup=20)
    doc = benchmark(models, opts)
    print("\n".join(table(doc)))
    by = {(r.model, r.threads): r.stats.p50_ms for r in doc.results}
    for t in opts.threads:
        q, f32 = by[("model_int8.tflite", t)], by.get(("model_float32.tflite", t))
        g = by[("tf2_mobilenet_v2_1.0_224_ptq.tflite", t)]
        line = f"threads={t}: int8 p50 {q:.2f} ms; Google TF2 PTQ {g:.2f} ms -> int8/Google {q / g:.2f}x"
        if f32:
            line += f"; float32 {f32:.2f} ms -> float32/int8 speed-up {f32 / q:.2f}x"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
