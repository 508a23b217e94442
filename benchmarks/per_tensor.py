"""Per-tensor int8 on the confirming split: before and after equalization, beside per-channel (issue 33).

    python benchmarks/per_tensor.py --work DIR [--draws 5] [--json DIR/per_tensor.json]

Resumable: every finished cell is kept in ``DIR/cells`` and reused, so a later run with more draws adds
only the new ones.

The 500 images of ``../shared/data/imagenet-sample`` sorted by name: the even positions are the
*choosing* split (calibration: 100 of them per draw, picked with seed ``d``), the odd ones the
*confirming* split (evaluation only; no class in both). MobileNetV2 is converted once with the
ImageNet labels, so quantize reports top-1 against them. Per draw, quantize runs full-integer with

- ``per-channel``: per-channel weights (what every target but the per-tensor one gets);
- ``per-tensor, before``: ``--per-tensor --no-equalize``;
- ``per-tensor``: ``--per-tensor`` (equalization on, its default with per-tensor weights).

Every figure is against the float model as given (not the equalized one): agreement with its
top-1, int8 top-1 and the drop against the labels, each with its 95 % interval (Wilson; Newcombe
paired for the drop), and SQNR of the logits. Pooled rows add the draws' counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from defaults import splits  # noqa: E402  (the decision protocol's choosing and confirming splits)

from edgeship._assets import shared_assets  # noqa: E402
from edgeship._files import atomic_write_text  # noqa: E402
from edgeship.convert import converter as conv  # noqa: E402
from edgeship.convert.options import ConvertOptions  # noqa: E402
from edgeship.quantize import QuantizeOptions, quantize  # noqa: E402
from edgeship.runtime.card import CARD_FILE  # noqa: E402
from edgeship.runtime.intervals import paired_difference, percent, wilson  # noqa: E402

NUM_CALIB = 100
ROWS: dict[str, dict[str, Any]] = {
    "per-channel": {},
    "per-tensor, before": {"per_tensor": True, "equalize": False},
    "per-tensor": {"per_tensor": True},
}


def split_folders(images: Path, work: Path) -> tuple[Path, Path]:
    """``work/choose`` and ``work/confirm``: links to the decision protocol's two splits (``defaults.splits``)."""
    for name, part in splits(images, None).items():
        (work / name).mkdir(parents=True, exist_ok=True)
        for f in part:
            if not (work / name / f.name).exists():
                (work / name / f.name).symlink_to(f)
    return work / "choose", work / "confirm"


def converted(assets: Path, work: Path) -> Path:
    folder = work / "float"
    if not (folder / CARD_FILE).is_file():
        labels = assets / "data" / "imagenet_classes.txt"
        model = assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"
        conv.convert(model, options=ConvertOptions(labels=labels)).save(folder, force=True)
    return folder


def cached_cell(work: Path, name: str, draw: int, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A cell's figures from ``work/cells`` when a run made them before, else made and written atomically."""
    path = work / "cells" / f"{name.replace(', ', '-').replace(' ', '_')}-draw{draw}.json"
    if path.is_file():
        return dict(json.loads(path.read_text()))
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, default=str))
    return out


def cell(float_dir: Path, choose: Path, confirm: Path, draw: int, fields: dict[str, Any]) -> dict[str, Any]:
    opts = QuantizeOptions(num_calib=NUM_CALIB, seed=draw, float_islands=False, **fields)
    result = quantize(float_dir, choose, evaluation=confirm, options=opts)
    f, eq = result.figures, result.report.equalization
    return {
        "n": f.count,
        "agree": round(f.top1_agreement * f.count),
        "both": f.both_right,
        "ref_only": f.ref_only_right,
        "cand_only": f.cand_only_right,
        "labelled": f.labelled,
        "sqnr_db": f.sqnr_db,
        "equalization": eq.to_dict() if eq is not None else None,
    }


def summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    n, agree = sum(c["n"] for c in cells), sum(c["agree"] for c in cells)
    both, ref, cand = (sum(c[k] for c in cells) for k in ("both", "ref_only", "cand_only"))
    labelled = sum(c["labelled"] for c in cells)
    int8_right, float_right = both + cand, both + ref
    drop = paired_difference(both, ref, cand, labelled - both - ref - cand)  # float's top-1 minus int8's
    return {
        "n": n,
        "agreement_pct": 100 * agree / n,
        "agreement_ci": percent(wilson(agree, n)),
        "float_top1_pct": 100 * float_right / labelled,
        "int8_top1_pct": 100 * int8_right / labelled,
        "drop_pt": 100 * (float_right - int8_right) / labelled,
        "drop_ci": [round(100 * x, 2) for x in drop],
        "sqnr_db": sum(c["sqnr_db"] for c in cells) / len(cells),
    }


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| weights | draw | agreement [95 % CI] | int8 top-1 (float) | drop pt [95 % CI] | SQNR dB |",
        "|---|---|---|---|---|---|",
    ]
    for name, cells in results.items():
        for label, part in [*((str(d), [c]) for d, c in enumerate(cells)), ("pooled", cells)]:
            s = summary(part)
            lines.append(
                f"| {name} | {label} | {s['agreement_pct']:.2f} % [{s['agreement_ci'][0]:.1f}, "
                f"{s['agreement_ci'][1]:.1f}] | {s['int8_top1_pct']:.1f} % ({s['float_top1_pct']:.1f} %) | "
                f"{s['drop_pt']:.1f} [{s['drop_ci'][0]:.1f}, {s['drop_ci'][1]:.1f}] | {s['sqnr_db']:.1f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (split links, the conversion)")
    ap.add_argument("--draws", type=int, default=5, help="calibration draws (seeds 0..N-1; default 5)")
    ap.add_argument("--json", type=Path, help="write every cell and the pooled figures here")
    args = ap.parse_args(argv)
    assets = shared_assets()
    if assets is None:
        raise SystemExit("needs ../shared (or EDGE_ASSETS): the shared MobileNetV2 and its labelled images")
    choose, confirm = split_folders(assets / "data" / "imagenet-sample", args.work)
    float_dir = converted(assets, args.work)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in ROWS}
    for d in range(args.draws):
        for name, fields in ROWS.items():
            print(f"draw {d}: {name}", file=sys.stderr, flush=True)
            make = partial(cell, float_dir, choose, confirm, d, fields)
            results[name].append(cached_cell(args.work, name, d, make))
    print("\n".join(table(results)))
    if args.json:
        pooled = {name: summary(cells) for name, cells in results.items()}
        args.json.write_text(json.dumps({"cells": results, "pooled": pooled}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
