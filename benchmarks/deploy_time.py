"""Time `edgeship deploy` against the bare, unverified pipeline on the same model and images, in one run.

The bare pipeline is what a user could run by hand: the onnx2tf CLI, then TensorFlow's own
int8 post-training quantization (TFLiteConverter with a representative dataset) of its
SavedModel on the calibration images deploy uses (TensorFlow's import included). Then
`edgeship deploy` to the given targets (convert, quantize, verify per target, benchmark,
bundles, report), and a re-run with nothing changed. Prints deploy's stage table, each
target's drift figures, the ratio deploy / bare, and the machine's load before and after
(the ratio compares runs made under the same load; figures of different runs do not).

    python benchmarks/deploy_time.py [MODEL.onnx] [--images DIR] [--num-calib 100] [--target T ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from edgeship._assets import shared_assets

TARGETS = ("x86-host", "rpi4-aarch64", "android-arm64-cpu")

#: TensorFlow's own int8 PTQ of onnx2tf's SavedModel, as its documentation shows it (run as a child).
BARE_PTQ = textwrap.dedent("""
    import sys, numpy as np
    from PIL import Image
    import tensorflow as tf
    saved, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    def pixels(path):
        im = Image.open(path).convert("RGB")
        w, h = im.size
        s = 256 / min(w, h)
        im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
        w, h = im.size
        im = im.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
        return ((np.asarray(im, np.float32) / 255 - mean) / std)[None]
    def data():
        for f in files:
            yield [pixels(f)]
    conv = tf.lite.TFLiteConverter.from_saved_model(saved)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = data
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    open(out, "wb").write(conv.convert())
""")


def timed(cmd: list[str], cwd: Path, env_path: str | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, its child processes included) of a child command; a failure stops
    the benchmark with its last lines. On a machine shared with other jobs, CPU seconds hold steadier."""
    env = dict(os.environ)
    if env_path:
        env["PATH"] = env_path + os.pathsep + env.get("PATH", "")
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code not in (0, 3):
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}):\n{err.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def bare_pipeline(model: Path, calib_files: list[Path], work: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """(wall, CPU) seconds of the onnx2tf CLI and of TensorFlow's PTQ: the bare pipeline."""
    sys.path.insert(0, str(Path(__file__).parent))
    from convert_vs_onnx2tf import _offline_sample, _static_shape

    onnx2tf_cli = shutil.which("onnx2tf") or str(Path(sys.executable).parent / "onnx2tf")
    shutil.copy(model, work / "bare.onnx")
    _offline_sample(work)  # onnx2tf downloads sample data otherwise
    onnx2tf_s = timed(
        [onnx2tf_cli, "-i", "bare.onnx", "-o", "bare_out", "-ois", _static_shape(model), "-n"],
        work,
        env_path=str(Path(onnx2tf_cli).parent),
    )
    (work / "ptq.py").write_text(BARE_PTQ)
    ptq_s = timed([sys.executable, "ptq.py", "bare_out", "bare_int8.tflite", *map(str, calib_files)], work)
    return onnx2tf_s, ptq_s


def deploy_cmd(
    model: Path, images: Path, out: Path, num_calib: int, targets: list[str], labels: Path | None
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "edgeship",
        "deploy",
        str(model),
        "--calib",
        str(images),
        "--num-calib",
        str(num_calib),
        "-o",
        str(out),
        "-q",
    ]
    cmd += ["--labels", str(labels)] if labels else []
    for t in targets:
        cmd += ["--target", t]
    return cmd


def main() -> int:
    assets = shared_assets()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "model", nargs="?", type=Path, default=assets / "models" / "mobilenetv2-1.0-tf-op13.onnx" if assets else None
    )
    ap.add_argument("--images", type=Path, default=assets / "data" / "imagenet-sample" if assets else None)
    ap.add_argument("--labels", type=Path, default=assets / "data" / "imagenet_classes.txt" if assets else None)
    ap.add_argument("--num-calib", type=int, default=100)
    ap.add_argument("--target", action="append", help=f"deploy target (default: {', '.join(TARGETS)})")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.model is None or args.images is None:
        ap.error("no model or images given and no shared assets found")
    from edgeship.quantize.data import Split, split_images

    calib, _ = split_images(args.images, Split(args.num_calib))  # the very images deploy calibrates on
    targets = args.target or list(TARGETS)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgeship-deploy-time-") as tmp:
        work = Path(tmp)
        onnx2tf_s, ptq_s = bare_pipeline(args.model, list(calib.files), work)
        cmd = deploy_cmd(args.model, args.images, work / "deploy", args.num_calib, targets, args.labels)
        deploy_s, deploy_cpu = timed(cmd, work)
        summary = json.loads((work / "deploy" / "deploy.json").read_text())
        rerun_s, _ = timed(cmd, work)
        rerun = json.loads((work / "deploy" / "deploy.json").read_text())
    load_after = os.getloadavg()
    bare_s, bare_cpu = onnx2tf_s[0] + ptq_s[0], onnx2tf_s[1] + ptq_s[1]
    doc = {
        "bare": {
            "onnx2tf_s": round(onnx2tf_s[0], 1),
            "tf_ptq_s": round(ptq_s[0], 1),
            "total_s": round(bare_s, 1),
            "cpu_s": round(bare_cpu, 1),
        },
        "deploy_s": round(deploy_s, 1),
        "deploy_cpu_s": round(deploy_cpu, 1),
        "rerun_s": round(rerun_s, 1),
        "ratio": round(deploy_s / bare_s, 2),
        "cpu_ratio": round(deploy_cpu / bare_cpu, 2),
        "stages": [{"name": r["name"], "seconds": r["seconds"]} for r in summary["stages"]],
        "rerun_reused_every_stage": all(r["reused"] for r in rerun["stages"]),
        "targets": {
            n: {"passed": t["passed"], **{k: t["figures"][k] for k in ("top1_agreement", "sqnr_db")}}
            for n, t in summary["targets"].items()
        },
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    _print(doc, args)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0 if all(t["passed"] for t in doc["targets"].values()) else 3


def _print(doc: dict[str, object], args: argparse.Namespace) -> None:
    bare = doc["bare"]
    print(f"model: {args.model}; {args.num_calib} calibration images from {args.images}")
    print(f"machine: {doc['cpus']} cores, load average {doc['loadavg_before']} before, {doc['loadavg_after']} after")
    print(f"{'stage':<42}{'seconds':>9}")
    for s in doc["stages"]:  # type: ignore[attr-defined]
        print(f"{s['name']:<42}{s['seconds']:>9.1f}")
    print(f"{'deploy (wall, first run)':<42}{doc['deploy_s']:>9.1f}")
    print(
        f"{'deploy re-run, nothing changed':<42}{doc['rerun_s']:>9.1f}"
        f"{'' if doc['rerun_reused_every_stage'] else '  (NOT every stage reused)'}"
    )
    print(f"{'bare: onnx2tf CLI':<42}{bare['onnx2tf_s']:>9.1f}")  # type: ignore[index]
    print(f"{'bare: TensorFlow int8 PTQ (import included)':<42}{bare['tf_ptq_s']:>9.1f}")  # type: ignore[index]
    print(f"{'bare total':<42}{bare['total_s']:>9.1f}")  # type: ignore[index]
    print(
        f"CPU seconds (user + system, child processes included): deploy {doc['deploy_cpu_s']:.1f}, "
        f"bare {bare['cpu_s']:.1f}"
    )  # type: ignore[index]
    for name, t in doc["targets"].items():  # type: ignore[attr-defined]
        print(
            f"{name:<20} {'PASS' if t['passed'] else 'FAIL'}  agreement {100 * t['top1_agreement']:.2f}%  "
            f"SQNR {t['sqnr_db']:.2f} dB"
        )
    print(f"ratio deploy / bare: {doc['ratio']:.2f}x wall, {doc['cpu_ratio']:.2f}x CPU")


if __name__ == "__main__":
    sys.exit(main())
