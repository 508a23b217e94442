"""Choose the QDQ writer's calibration settings on the calibration images alone (two folds, cross-fitted).

Each candidate (:class:`~edgeship.quantize.onnx_qdq.QdqOptions`) calibrates on one half of the
calibration images and is measured on the other half, then the halves swap; the evaluation images play
no part. ``python -m edgeship.quantize.qdq_choice MODEL --calib DIR`` prints the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeship.convert.result import ConvertResult
from edgeship.quantize import data
from edgeship.quantize.data import ImagesUsed, Pixels
from edgeship.quantize.onnx_qdq import QdqOptions, fixed_dims, measure, write_qdq
from edgeship.quantize.source import float_source
from edgeship.runtime.metrics import DriftFigures

#: What is compared by default: the three onnxruntime methods, then float logits on each.
CANDIDATES = tuple(
    QdqOptions(method=m, float_logits=f) for f in (False, True) for m in ("minmax", "entropy", "percentile")
)


@dataclass(frozen=True)
class FoldResult:
    """One candidate on one fold: calibrated on one half, measured (QDQ arithmetic) on the other."""

    candidate: QdqOptions
    fold: int
    figures: DriftFigures

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.candidate.method.value,
            "float_logits": self.candidate.float_logits,
            "fold": self.fold,
            "agreement": self.figures.top1_agreement,
            "sqnr_db": self.figures.sqnr_db,
        }


def cross_fit(
    model: ConvertResult | str | os.PathLike[str],
    calibration: str | os.PathLike[str],
    *,
    num_calib: int = 100,
    candidates: Sequence[QdqOptions] = CANDIDATES,
) -> list[FoldResult]:
    """Every candidate on both folds of the calibration images the TFLite path would choose."""
    split = QdqOptions(num_calib=num_calib).split
    listed = data.listed_sets(calibration, None, split)
    source = float_source(model)
    prep = source.card.preprocessing
    calib, _ = data.pixels_of(listed, calibration, None, split, prep, source.label_names(), lambda *a: None)
    float_onnx = fixed_dims(source.simplified_onnx)
    halves = (np.arange(len(calib)) % 2 == 0, np.arange(len(calib)) % 2 == 1)
    results = []
    for candidate in candidates:
        for fold, (fit, held) in enumerate((halves, halves[::-1])):
            options = replace(candidate, num_calib=num_calib)
            qdq, _ = write_qdq(float_onnx, calib.pixels[fit], prep, options)
            held_px = Pixels(calib.pixels[held], (None,) * int(held.sum()), ImagesUsed(int(held.sum()), "fold"))
            measured = measure(float_onnx, qdq, held_px, prep)
            results.append(FoldResult(candidate, fold, measured.figures))
            print(json.dumps(results[-1].to_dict()), flush=True)  # noqa: T201 - a measuring script's output
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgeship.quantize.qdq_choice", description=__doc__)
    ap.add_argument("model", help="ONNX model, or the output folder of `edgeship convert`")
    ap.add_argument("--calib", required=True, help="folder of calibration images")
    ap.add_argument("--num-calib", type=int, default=100)
    args = ap.parse_args(argv)
    results = cross_fit(args.model, args.calib, num_calib=args.num_calib)
    by: dict[tuple[str, bool], list[DriftFigures]] = {}
    for r in results:
        by.setdefault((r.candidate.method.value, r.candidate.float_logits), []).append(r.figures)
    for (method, logits), figs in by.items():
        agree = np.mean([f.top1_agreement for f in figs])
        sqnr = np.mean([f.sqnr_db for f in figs])
        print(f"{method:10s} float_logits={logits!s:5s} agreement {100 * agree:6.2f} %  SQNR {sqnr:6.2f} dB")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
