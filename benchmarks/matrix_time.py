"""The matrix's wall time against the same deploys run one after another, and what part of the difference the
devices' parallelism explains.

    python benchmarks/matrix_time.py MATRIX.toml --work DIR [--ray-address ADDR] [--json out.json]

1. ``edgeship matrix MATRIX.toml -o DIR/matrix`` into an empty folder (wall time of the command).
2. The same models and targets the way one runs them without a matrix: for each model, one
   ``edgeship deploy MODEL --target T... --host T=<the target's first device>`` into an empty folder, one after
   another (each wall time; the ssh options are the first device's: the devices must share key and
   known_hosts, as the emulated Pis and the test sshd do).
3. The explanation, from the matrix's own timings (``matrix.json``): the device jobs' seconds summed over
   devices (what one device at a time would take) against the span in which they ran (first job submitted
   to last one finished): their difference is the time the devices' parallelism saved. Deploy's stages that
   the matrix does not run (the host benchmark, bundles and their wheel) are shown apart, so like is compared
   with like; deploy's device benchmark also times the float32 model, which the matrix's does not.

Timings on emulated devices are an emulator's: the ratios hold within one run, not a device's speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: deploy stages the matrix does not run (the host benchmark, bundles and the wheel they ship).
EXTRA = ("bench", "bundles/", "bundles: ")
#: deploy stages that run on the devices, and on the host before them (the matrix's device and prepare tasks).
DEVICE = ("verify/", "device-bench/")
HOST = ("convert", "quantize/", "verify: float reference")


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return seconds


def deploy_cmd(matrix: Any, model: Any, out: Path) -> list[str]:
    """The deploy a user would run for this model: every target, each on its first device."""
    first = {t.name: matrix.devices_of(t.name)[0] for t in matrix.targets}
    spec = next(iter(first.values())).spec
    o = matrix.options
    cmd = [sys.executable, "-m", "edgeship", "deploy", model.source, "--calib", str(matrix.calibration), "-o", str(out)]
    cmd += ["--num-calib", str(o.num_calib), "--bench-runs", str(o.bench_runs), "-q"]
    cmd += ["--eval", str(matrix.evaluation)] if matrix.evaluation else []
    cmd += ["--max-eval", str(o.max_eval)] if o.max_eval else []
    cmd += ["--labels", str(model.labels)] if model.labels else []
    cmd += [arg for t in matrix.targets for arg in ("--target", t.given)]
    cmd += [arg for t in matrix.targets for arg in ("--host", f"{t.name}={first[t.name].spec.host}")]
    cmd += ["--identity", str(spec.identity)] if spec.identity else []
    cmd += ["--known-hosts", str(spec.known_hosts)] if spec.known_hosts else []
    cmd += ["--remote-python", spec.python] + (["--pip-args", " ".join(spec.pip_args)] if spec.pip_args else [])
    return cmd


def stage_split(deploy_json: Path) -> dict[str, float]:
    """Seconds of one deploy's stages: all, those the matrix does not run, device work, host work before it."""
    stages = json.loads(deploy_json.read_text())["stages"]

    def total(prefixes: tuple[str, ...]) -> float:
        return round(sum(s["seconds"] for s in stages if s["name"].startswith(prefixes)), 1)

    return {"all": total(("",)), "extra": total(EXTRA), "device": total(DEVICE), "host": total(HOST)}


def main() -> None:
    from edgeship.matrix_file import load_matrix

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("matrix", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="an empty or missing folder for both runs")
    ap.add_argument("--ray-address")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--explain", type=Path, metavar="RESULT_JSON", help="recompute the table from an earlier --json")
    args = ap.parse_args()
    if args.explain:
        old = json.loads(args.explain.read_text())
        doc = json.loads((args.work / "matrix" / "matrix.json").read_text())
        deploys = {m: {"wall_s": d["wall_s"], **stage_split(args.work / f"deploy-{m}" / "deploy.json")}
                   for m, d in old["deploys"].items()}  # fmt: skip
        print(table(explain(old["matrix_wall_s"], doc, deploys)))
        return
    if args.work.exists() and any(args.work.iterdir()):
        sys.exit(f"--work {args.work} is not empty")
    matrix = load_matrix(args.matrix)
    cmd = [sys.executable, "-m", "edgeship", "matrix", str(args.matrix), "-o", str(args.work / "matrix"), "-q"]
    matrix_s = run(cmd + (["--ray-address", args.ray_address] if args.ray_address else []))
    doc = json.loads((args.work / "matrix" / "matrix.json").read_text())
    deploys = {}
    for m in matrix.models:
        out = args.work / f"deploy-{m.name}"
        deploys[m.name] = {"wall_s": round(run(deploy_cmd(matrix, m, out)), 1), **stage_split(out / "deploy.json")}
    result = explain(matrix_s, doc, deploys)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def explain(matrix_s: float, doc: dict[str, Any], deploys: dict[str, dict[str, float]]) -> dict[str, Any]:
    busy = sum(d["busy_s"] for d in doc["devices"].values())
    span = doc["timings"]["device_span_s"]
    sequential = sum(d["wall_s"] for d in deploys.values())
    extra = sum(d["extra"] for d in deploys.values())
    device = sum(d["device"] for d in deploys.values())
    host = sum(d["host"] for d in deploys.values())
    prepare = max(doc["timings"]["prepare_s"].values())
    return {
        "deploys_device_stages_s": round(device, 1),
        "deploys_host_stages_s": round(host, 1),
        "matrix_prepare_span_s": prepare,
        "saved_on_devices_s": round(device - span, 1),
        "saved_on_host_s": round(host - prepare, 1),
        "matrix_wall_s": round(matrix_s, 1),
        "deploys_wall_s": round(sequential, 1),
        "deploys_wall_without_extra_stages_s": round(sequential - extra, 1),
        "deploys": deploys,
        "device_jobs_s": round(busy, 1),
        "device_span_s": round(span, 1),
        "prepare_s": doc["timings"]["prepare_s"],
        "devices": {n: {"jobs": d["jobs_done"], "busy_s": d["busy_s"]} for n, d in doc["devices"].items()},
        "cells": [(c["model"], c["target"], c["status"]) for c in doc["cells"]],
    }


def table(r: dict[str, Any]) -> str:
    diff = r["deploys_wall_without_extra_stages_s"] - r["matrix_wall_s"]
    overhead = r["saved_on_devices_s"] + r["saved_on_host_s"] - diff
    rows = [
        ("matrix wall", r["matrix_wall_s"]),
        ("deploys one after another", r["deploys_wall_s"]),
        ("  without stages the matrix does not run", r["deploys_wall_without_extra_stages_s"]),
        ("difference, like for like", diff),
        ("device work: deploys' verify + device-bench", r["deploys_device_stages_s"]),
        ("  matrix: span of its device jobs", r["device_span_s"]),
        ("  saved by the devices' parallelism", r["saved_on_devices_s"]),
        ("  matrix: its device jobs' seconds summed", r["device_jobs_s"]),
        ("host work: deploys' convert + quantize + reference", r["deploys_host_stages_s"]),
        ("  matrix: longest prepare task (models side by side)", r["matrix_prepare_span_s"]),
        ("  saved by preparing models side by side", r["saved_on_host_s"]),
        ("the matrix's own cost (Ray start, a session per job, ...)", overhead),
    ]
    return "\n".join(f"{name:<52}{value:8.1f} s" for name, value in rows)


if __name__ == "__main__":
    main()
