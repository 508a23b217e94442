"""End to end vs invoke(): ``Classifier.predict`` on a 12 MP phone JPEG and on 256-px images.

Everything is measured in one run, interleaved round by round (decode, preprocess and
invoke share the same machine noise), on one loaded model:

- invoke: ``invoke()`` alone on an input already set (what ``bench`` calls p50);
- predict 12 MP: ``Classifier.predict`` on a 4032x3024 JPEG (quality 92) made by upscaling
  a shared photo into a temporary folder (never kept);
- predict 256 px: ``Classifier.predict`` on the held-apart ImageNet sample images, in turn;
- drift: top-1 agreement of the model with the float ONNX reference on the held-apart
  images (calibrated on the first 100 by name, evaluated on the other 400), through the
  same path as ``edgeship verify``.

    python benchmarks/e2e_latency.py INT8.tflite [--threads 2] [--rounds 60] [--no-drift]

The model's card must be beside it (``edgeship quantize`` writes one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_12mp_jpeg(assets: Path, folder: Path) -> Path:
    """A shared photo upscaled to 4032x3024 and saved as a quality-92 JPEG (a phone photo's size)."""
    from PIL import Image

    with Image.open(assets / "data" / "images" / "parrot.jpg") as im:
        big = im.convert("RGB").resize((4032, 3024), Image.BICUBIC)
    path = folder / "phone_12mp.jpg"
    big.save(path, quality=92)
    return path


def _ms(ns: list[int]) -> float:
    return statistics.median(ns) / 1e6


def latency(model: Path, photo: Path, small: list[Path], *, threads: int, rounds: int) -> dict[str, float]:
    """Median ms of invoke, predict(12 MP) and predict(256 px), interleaved round by round."""
    from edgeship.runtime import Classifier

    clf = Classifier.load(model, num_threads=threads)
    clf.predict(photo)
    for f in small[:5]:
        clf.predict(f)
    invoke: list[int] = []
    big: list[int] = []
    little: list[int] = []
    for r in range(rounds):
        t0 = time.perf_counter_ns()
        clf.predict(photo)
        t1 = time.perf_counter_ns()
        clf.predict(small[r % len(small)])
        t2 = time.perf_counter_ns()
        for _ in range(3):  # invoke on the input the last predict set
            s = time.perf_counter_ns()
            clf.model.invoke()
            invoke.append(time.perf_counter_ns() - s)
        big.append(t1 - t0)
        little.append(t2 - t1)
    inv = _ms(invoke)
    return {
        "invoke_ms": inv,
        "predict_12mp_ms": _ms(big),
        "predict_256px_ms": _ms(little),
        "ratio_12mp": _ms(big) / inv,
        "ratio_256px": _ms(little) / inv,
        "describe": clf.describe(),
    }


def drift(model: Path, reference: Path, images: object) -> dict[str, object]:
    """Top-1 agreement with the float reference on the held-apart images, as ``edgeship verify`` runs it."""
    from edgeship.targets import load_target
    from edgeship.verify.drift import verify

    result = verify(reference, model, images, target=load_target("x86-host"))
    return {
        "agreement_pct": result.figures.agreement_pct,
        "count": result.figures.count,
        "cand_top1": result.figures.cand_top1,
        "path": result.report.candidate.image_path or "(not reported)",
    }


def main() -> int:
    from edgeship._assets import shared_assets
    from edgeship.runtime.images import list_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="int8 .tflite with its card beside it")
    ap.add_argument("--threads", type=int, default=2, help="interpreter threads (x86-host uses 2)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--no-drift", action="store_true")
    args = ap.parse_args()
    assets = shared_assets()
    if assets is None:
        raise SystemExit("shared assets not found: set EDGE_ASSETS or check out ../shared")
    held_apart = list_images(assets / "data" / "imagenet-sample").split(100)[1]
    with tempfile.TemporaryDirectory(prefix="edgeship-e2e-") as tmp:
        photo = make_12mp_jpeg(assets, Path(tmp))
        lat = latency(args.model, photo, list(held_apart.files[:40]), threads=args.threads, rounds=args.rounds)
    print(
        f"model {args.model.name}, {args.threads} thread(s), {args.rounds} interleaved rounds; "
        f"path: {lat['describe'].get('image_path', '(not reported)')}"
    )
    print(f"  invoke()                 {lat['invoke_ms']:7.2f} ms")
    print(f"  predict, 12 MP JPEG      {lat['predict_12mp_ms']:7.2f} ms  = {lat['ratio_12mp']:5.2f} x invoke")
    print(f"  predict, 256-px images   {lat['predict_256px_ms']:7.2f} ms  = {lat['ratio_256px']:5.2f} x invoke")
    if not args.no_drift:
        d = drift(args.model, assets / "models" / "mobilenetv2-1.0-tf-op13.onnx", held_apart)
        print(
            f"  drift: top-1 agreement {d['agreement_pct']:.2f}% on {d['count']} held-apart images "
            f"(deployed top-1 {100 * (d['cand_top1'] or 0):.2f}%)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
