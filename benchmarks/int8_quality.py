"""int8 quality per architecture: default vs measured ranges vs SQNR-budgeted mixed precision (issue 12).

One run per model, one protocol: calibrate on the first 100 shared ImageNet images by name,
evaluate on the next ``--max-eval`` others (held apart), SQNR of the logits against the
float model. Per model it quantizes twice with edgeship's own ``quantize``:

- ``default``: quantize's defaults (percentile 99.999 on edgeship's statistics);
- ``budgeted``: ``min_sqnr_db`` (the cheapest op groups kept float until the budget is met
  on calibration images), with the ranges of ``--budget-method`` (default percentile;
  ``auto``: chosen by measured error, its all-int8 SQNR is the table's "auto" column);

then times float32, default int8 and budgeted at 1 thread, interleaved in one run.
Models come from ``tests/archs.py`` (the architecture matrix); ``mobilenetv2`` is the
shared real network.

    python benchmarks/int8_quality.py [--models mobilenetv3_small efficientnet_b0 vit_tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeship._assets import shared_assets  # noqa: E402
from edgeship.convert import converter as conv  # noqa: E402
from edgeship.quantize import QuantizeOptions, quantize, speed  # noqa: E402
from edgeship.quantize.pipeline import REPORT_FILE  # noqa: E402
from edgeship.runtime.card import CARD_FILE  # noqa: E402

MODELS = ("mobilenetv2", "mobilenetv3_small", "efficientnet_b0", "vit_tiny")


def onnx_of(name: str, assets: Path) -> Path:
    if name == "mobilenetv2":
        return assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"
    from tests import archs

    return archs.build(name)


def converted(name: str, assets: Path, work: Path) -> Path:
    """The float conversion of the model, reused across runs when it exists."""
    folder = work / name / "float"
    if not (folder / CARD_FILE).is_file():
        conv.convert(onnx_of(name, assets)).save(folder, force=True)
    return folder


def run_quantize(float_dir: Path, images: Path, out: Path, options: QuantizeOptions) -> dict[str, Any]:
    """quantize's report; an over-budget run (exit 3 in the CLI) still writes its best model and report."""
    quantize(float_dir, images, options=options).save(out, force=True)
    report = json.loads((out / REPORT_FILE).read_text())
    report["model_path"] = str(out / report["output"])
    return report


def measure(name: str, assets: Path, work: Path, max_eval: int, budget: float, method: str) -> dict[str, Any]:
    images = assets / "data" / "imagenet-sample"
    float_dir = converted(name, assets, work)
    # MobileNetV2 keeps the shared protocol of the README: evaluate on all 400 other images.
    common = dict(num_calib=100, max_eval=None if name == "mobilenetv2" else max_eval)
    default = run_quantize(float_dir, images, work / name / "default", QuantizeOptions(**common))
    budgeted = run_quantize(
        float_dir, images, work / name / "budgeted", QuantizeOptions(**common, method=method, min_sqnr_db=budget)
    )
    card = json.loads((float_dir / CARD_FILE).read_text())
    latency = speed.latencies(
        {
            "float32": float_dir / card["model_file"],
            "default": Path(default["model_path"]),
            "budgeted": Path(budgeted["model_path"]),
        },
        work,
    )
    mp = budgeted.get("mixed_precision") or {}
    base_int8 = mp.get("eval_sqnr_db_all_int8", budgeted["figures"]["sqnr_db"])
    return {
        "model": name,
        "eval_images": default["evaluation"]["count"],
        "default": default["figures"],
        "budget_base_sqnr_db": base_int8,
        "budgeted": budgeted["figures"],
        "ranges_chosen": budgeted["ranges"].get("auto", {}).get("chosen", budgeted["ranges"]["method"]),
        "kept_float": [k["name"] for k in mp.get("kept_float", [])],
        "float_ops": mp.get("float_ops", 0),
        "within_budget": budgeted["figures"]["sqnr_db"] >= budget,
        "latency_ms": latency,
        "partitions": {
            "default": default["runs_on"]["delegation"]["partitions"],
            "budgeted": budgeted["runs_on"]["delegation"]["partitions"]
            if not mp.get("delegation")
            else mp["delegation"]["partitions"],
        },
    }


def table(rows: list[dict[str, Any]], budget: float) -> list[str]:
    lines = [
        f"| model | default SQNR dB (agree %) | budgeted run's all-int8 SQNR dB "
        f"| budgeted >= {budget} dB: SQNR (agree %) | ranges | kept float "
        "| ms float32 / default int8 / budgeted (1 thread) | budgeted vs float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, b, lat = r["default"], r["budgeted"], r["latency_ms"]
        kept = f"{r['float_ops']} ops: " + ", ".join(r["kept_float"]) if r["kept_float"] else "none"
        lines.append(
            f"| {r['model']} | {d['sqnr_db']:.1f} ({100 * d['top1_agreement']:.1f}) | "
            f"{r['budget_base_sqnr_db']:.1f} | "
            f"{b['sqnr_db']:.1f} ({100 * b['top1_agreement']:.1f}){'' if r['within_budget'] else ' OVER'} | "
            f"{r['ranges_chosen']} | {kept} | {lat['float32']:.2f} / {lat['default']:.2f} / "
            f"{lat['budgeted']:.2f} | {lat['float32'] / lat['budgeted']:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--max-eval", type=int, default=300, help="held-apart evaluation images (default 300)")
    p.add_argument("--min-sqnr", type=float, default=20.0, help="SQNR budget of the budgeted run (default 20)")
    p.add_argument("--budget-method", default="percentile", help="range method of the budgeted run")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgeship-int8-quality"))
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    assets = shared_assets()
    if assets is None:
        print("shared assets not found: set EDGE_ASSETS or check out ../shared", file=sys.stderr)
        return 1
    rows = []
    for name in args.models:
        rows.append(measure(name, assets, args.work, args.max_eval, args.min_sqnr, args.budget_method))
        print(f"{name}: done", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print("\n".join(table(rows, args.min_sqnr)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
