"""``python -m edgeship.runtime MODEL_OR_BUNDLE IMAGE...``: print the top-5 classes of each image.

The runner a Raspberry Pi user types; needs only numpy, Pillow and a TFLite interpreter (or onnxruntime, for an
``.onnx`` model: edgeship's int8 QDQ model).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from edgeship.errors import EdgeshipError, InputError
from edgeship.runtime.card import Preprocessing
from edgeship.runtime.classifier import Classifier


def _read_preprocessing(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read preprocessing JSON {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"preprocessing JSON {path} must hold an object")
    return Preprocessing.from_dict(data)


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeship.runtime", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="bundle folder (with model_card.json), .tflite or .onnx file")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("-k", "--top-k", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--no-xnnpack", action="store_true", help="do not apply the XNNPACK delegate")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument(
        "--preprocess",
        metavar="JSON",
        help="preprocessing as a JSON file (keys: resize_shorter, crop, "
        "interpolation, color_order, pixel_scale, mean, std); needed for a model without its card",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="only results and errors on the terminal")
    ap.add_argument("-v", "--verbose", action="store_true", help="log details (and the interpreter's own lines)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        prep = _read_preprocessing(args.preprocess) if args.preprocess else None
        clf = Classifier.load(args.model, num_threads=args.threads, use_xnnpack=not args.no_xnnpack, preprocessing=prep)
        results = {img: clf.predict(img, args.top_k) for img in args.images}
    except EdgeshipError as exc:
        print(f"edgeship.runtime: error: {exc}", file=sys.stderr)
        return exc.exit_code
    info = clf.describe()
    if args.json:
        print(
            json.dumps(
                {"runtime": info, "predictions": {k: [p._asdict() for p in v] for k, v in results.items()}}, indent=2
            )
        )
        return 0
    how = (
        f"{info['execution_provider']}, kernels {_kinds(info['kernel_kinds'])}"
        if "execution_provider" in info
        else f"delegate {info['delegate']}"
    )
    print(f"# {info['model_file']} ({info['precision']}) on {info['interpreter']} {info['interpreter_version']}, {how}")
    for img, preds in results.items():
        print(img)
        for p in preds:
            print(f"  {p.probability:6.3f}  {p.class_index:5d}  {p.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
