"""The architecture matrix in one run: convert, int8 quality against the peers, runnability, speed.

For every model of tests/archs.py (built into its cache) and the shared real MobileNetV2
(``mobilenetv2``, exporter ``tf2onnx``): export kind and opset, convert time, float top-1
agreement and cosine (convert's own report), then on the same calibration images (100 of
the 500 shared ones, chosen as ``edgeship quantize`` chooses by default: round-robin over
the classes; ``--calib-first`` takes the first 100 by name instead) edgeship's int8,
TensorFlow's own PTQ (TFLiteConverter on the converted SavedModel, full-integer int8),
onnxruntime's static QDQ int8 (per-channel; MinMax, Percentile, Entropy: best shown) and
Google's ai-edge-quantizer (``static_wi8_ai8`` recipe on the float TFLite model; installed
apart, see ``aeq_path``), each scored on the other 400 images: top-1 against the labels
(beside the float ONNX model's), top-1 agreement with it and SQNR in dB of the logits
against it (run by onnxruntime); whether each int8 model runs on XNNPACK
and on the reference kernels (checked in a child process), XNNPACK partitions, and
float32 vs int8 latency at 1 thread (interleaved, median). Issue 13's column (``target``):
the model ``edgeship quantize --target x86-host`` writes (its SQNR budget search included),
XNNPACK partitions and ops left outside for it and for float32, and float32 vs that model
(and edgeship's default int8) at 1 thread, interleaved in one run; its own table follows.

    python benchmarks/arch_matrix.py                       # the architectures, dynamo export
    python benchmarks/arch_matrix.py --trained --columns edgeship,tf,ort,aeq --runs 0   # issue 25's table
    python benchmarks/arch_matrix.py --trained --columns edgeship,tf,ort,aeq --runs 0 --work DIR --keep-peers
                                                           # again on DIR's conversions and peers' models
    python benchmarks/arch_matrix.py --models resnet18,vit_tiny:torchscript
    python benchmarks/arch_matrix.py --full --json out.json   # + TorchScript exports + variants
    python benchmarks/arch_matrix.py --columns target --runs 100   # issue 13's table only

A column that fails shows its one-line error and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/archs.py: the shared model builders

from edgeship._assets import shared_assets  # noqa: E402
from edgeship.reference import load_pixels, run_onnx  # noqa: E402
from edgeship.runtime.bench import BenchOptions, benchmark  # noqa: E402
from edgeship.runtime.card import ModelCard, Preprocessing  # noqa: E402
from edgeship.runtime.images import ImageSet, Labels, list_images, normalize  # noqa: E402
from edgeship.runtime.metrics import accuracy, compare  # noqa: E402
from tests import archs  # noqa: E402

NUM_CALIB = 100
NUM_EVAL = 400
#: Real ONNX models of the shared assets: name -> (file under models/, exporter label, how it is fed).
SHARED = {
    "mobilenetv2": ("mobilenetv2-1.0-tf-op13.onnx", "tf2onnx", archs.Arch(archs.nn.Identity, trained=True))
}  # the file is used as it is
#: Issue 25: the trained models, every export of each.
TRAINED = [
    ("mobilenetv2", "tf2onnx"),
    ("efficientnet_lite2", "dynamo"),
    ("efficientnet_lite1", "dynamo"),
    ("efficientnet_lite2", "torchscript"),
    ("efficientnet_lite1", "torchscript"),
]
# Through quantize_static, Entropy runs with 128 histogram bins for 128 quantized bins (its
# num_bins is not an extra_option there), so it usually lands on MinMax's ranges: what users get.
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
COLUMNS = ("edgeship", "tf", "ort", "aeq", "latency", "target")
#: Issue 13's column: the model ``quantize --target TARGET`` writes (budget search included).
TARGET = "x86-host"


@dataclass(frozen=True)
class Protocol:
    """Where the images are and how much to measure."""

    assets: Path
    work: Path
    latency_runs: int = 200
    verify_images: int = 200
    #: Calibrate on the first 100 by name (the old default) instead of edgeship's default choice.
    calib_first: bool = False
    #: onnxruntime's calibration methods to try (the best SQNR is kept).
    ort_methods: tuple[str, ...] = ORT_METHODS
    #: Reuse the peers' int8 models a kept --work folder holds when made from exactly these calibration inputs.
    keep_peers: bool = False
    #: Calibrate on a random 100 chosen with this seed (``edgeship quantize --seed``) instead of the default choice.
    calib_seed: int | None = None

    @property
    def folder(self) -> Path:
        return self.assets / "data" / "imagenet-sample"

    def split(self) -> tuple[ImageSet, ImageSet]:
        """Calibration (100 chosen as ``edgeship quantize`` does, or the first 100) and evaluation (the other 400)."""
        images = list_images(self.folder)
        if not self.calib_first:
            calib, rest = images.divide(NUM_CALIB, seed=self.calib_seed)
        else:
            calib, rest = images.split(NUM_CALIB)
            calib = dataclasses.replace(calib, selection=f"the first {NUM_CALIB} by name")
        return calib, rest.subset(range(min(NUM_EVAL, len(rest))))

    def labels(self) -> Labels:
        return Labels.load(self.assets / "data" / "imagenet_classes.txt")

    def calib_args(self, work: Path) -> list[str]:
        """``edgeship quantize`` arguments for the protocol's calibration (a folder of links for the first 100)."""
        if not self.calib_first:
            seed = [] if self.calib_seed is None else ["--seed", str(self.calib_seed)]
            return ["--calib", str(self.folder), "--num-calib", str(NUM_CALIB), *seed]
        calib, rest = self.split()
        for name, chosen in (("calib", calib), ("eval", rest)):
            (work / name).mkdir(parents=True, exist_ok=True)
            for f in chosen.files:
                if not (work / name / f.name).exists():
                    (work / name / f.name).symlink_to(f)
        return ["--calib", str(work / "calib"), "--eval", str(work / "eval"), "--num-calib", str(NUM_CALIB)]


def aeq_path() -> Path:
    """Where ai-edge-quantizer is installed apart (``pip install --no-deps --target``): it pins
    ai-edge-litert 2.3.0 while the host extra pins 2.1.0, so it cannot share the environment."""
    return Path(os.environ.get("EDGESHIP_AEQ_PATH") or Path.home() / ".cache" / "edgeship" / "aeq")


def one_line(exc: BaseException | str) -> str:
    """An error as one short line (no colour codes, no traceback)."""
    import re

    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return re.sub(r"\x1b\[[0-9;]*m", "", " ".join(text.split()))[:300]


def exit_text(code: int) -> str:
    """``exit 1`` or ``killed by SIGABRT`` for a child's return code."""
    import signal

    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def cell(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one column; a failure becomes ``{"error": one line}``."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the matrix goes on
        return {"error": one_line(exc)}


def figures(ref: np.ndarray, out: np.ndarray, truth: list[int | None] | None = None) -> dict[str, Any]:
    f = compare(ref, out, truth)
    top1 = {"top1": round(f.cand_top1, 4)} if f.cand_top1 is not None else {}
    return {
        "sqnr_db": round(f.sqnr_db, 2),
        "agreement": round(f.top1_agreement, 4),
        "mean_cosine": round(f.mean_cosine, 5),
        **top1,
    }


def runs_on(path: Path) -> dict[str, Any]:
    """Does the model run on XNNPACK / the reference kernels (each checked in a child)?"""
    x, r = archs.run_check(path, xnnpack=True), archs.run_check(path, xnnpack=False)
    return {
        "xnnpack": x.ok,
        "reference": r.ok,
        "partitions": x.partitions,
        "run_errors": {k: c.error for k, c in (("xnnpack", x), ("reference", r)) if not c.ok},
    }


def tflite_outputs(path: Path, pixels: np.ndarray, prep: Preprocessing, xnnpack: bool) -> np.ndarray:
    """Float outputs of a TFLite model of any I/O dtype, one image at a time."""
    from edgeship.runtime.interpreter import TFLiteModel

    m = TFLiteModel(path, use_xnnpack=xnnpack, num_threads=2)
    return np.concatenate([m.run_pixels(pixels[i : i + 1], prep).reshape(1, -1) for i in range(len(pixels))])


def score_tflite(
    path: Path, pixels: np.ndarray, prep: Preprocessing, ref: np.ndarray, truth: list[int | None] | None = None
) -> dict[str, Any]:
    """Runnability plus SQNR/agreement/top-1 on whichever kernels run it (XNNPACK first)."""
    info = runs_on(path)
    if not (info["xnnpack"] or info["reference"]):
        return {**info, "error": "runs on neither interpreter: " + "; ".join(info["run_errors"].values())}
    out = tflite_outputs(path, pixels, prep, xnnpack=info["xnnpack"])
    return {**info, **figures(ref, out, truth), "size_mb": round(path.stat().st_size / 1e6, 2)}


# ----------------------------------------------------------------------------- stages
def convert_model(onnx: Path, arch: archs.Arch, out: Path, proto: Protocol) -> dict[str, Any]:
    from edgeship.convert.converter import ConvertOptions, convert

    if (out / "convert_report.json").is_file():  # a kept --work folder: reuse its conversion
        report = json.loads((out / "convert_report.json").read_text())
    else:
        report = (
            convert(
                onnx,
                options=ConvertOptions(
                    images=proto.folder,
                    max_images=proto.verify_images,
                    preprocessing=arch.prep,
                    input_shape=arch.input_shape if arch.dynamic_hw else None,
                ),
            )
            .save(out)
            .to_dict()["report"]
        )
    check = report["verification"]["float32"]
    return {
        "seconds": round(report["timings_s"]["total"], 1),
        "agreement": check["top1_agreement"],
        "mean_cosine": round(check["mean_cosine"], 6),
        "images": check["count"],
    }


def edgeship_int8(convert_dir: Path, out: Path, proto: Protocol) -> Path:
    """``edgeship quantize`` with its defaults, in a child (an abort must not end the matrix)."""
    cmd = [
        sys.executable,
        "-m",
        "edgeship",
        "quantize",
        str(convert_dir),
        *proto.calib_args(out.parent),
        "--max-eval",
        "50",
        "-o",
        str(out),
        "-q",
        "--force",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"edgeship quantize {exit_text(proc.returncode)}: {lines[-1] if lines else 'no output'}")
    return out / "model_int8.tflite"


def kept(out: Path, calib_npy: Path, calib: np.ndarray, keep: bool) -> bool:
    """With ``keep`` (``--keep-peers``): a peer's model kept in the --work folder, made after its calibration
    inputs were saved and from exactly these inputs (it depends on nothing else but the kept conversion or
    the ONNX file)."""
    ok = (
        keep
        and out.is_file()
        and calib_npy.is_file()
        and out.stat().st_mtime >= calib_npy.stat().st_mtime
        and np.array_equal(np.load(calib_npy), calib)
    )
    if ok:
        print(f"   kept {out} (--keep-peers)", file=sys.stderr, flush=True)
    return ok


def tf_ptq(convert_dir: Path, calib: np.ndarray, out: Path, keep: bool = False) -> Path:
    """TensorFlow's own full-integer PTQ of the converted SavedModel, in a child process."""
    if kept(out, out.with_suffix(".calib.npy"), calib, keep):
        return out
    np.save(out.with_suffix(".calib.npy"), calib)
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child-tf-ptq",
            str(convert_dir / "saved_model"),
            str(out.with_suffix(".calib.npy")),
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"TF PTQ {exit_text(proc.returncode)}: {lines[-1] if lines else 'no output'}")
    return out


def _child_tf_ptq(saved_model: str, calib_npy: str, out: str) -> int:
    import tensorflow as tf

    calib = np.load(calib_npy)
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[None]] for x in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    Path(out).write_bytes(conv.convert())
    return 0


class _Reader:
    """onnxruntime CalibrationDataReader over NCHW float inputs."""

    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name, self.x, self.i = name, x, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0


def ort_qdq(
    onnx: Path,
    calib_nchw: np.ndarray,
    eval_px: np.ndarray,
    prep: Preprocessing,
    ref: np.ndarray,
    work: Path,
    truth: list[int | None] | None = None,
    methods: tuple[str, ...] = ORT_METHODS,
    keep: bool = False,
) -> dict[str, Any]:
    """onnxruntime static QDQ int8, per-channel, three calibration methods: best SQNR kept.

    Each method runs in a child: the histogram calibrators keep every intermediate output
    in memory (ViT-sized models can exhaust it), and that must cost one cell, not the run.
    """
    npy = work / "ort.calib.npy"
    reuse = {m for m in methods if kept(work / f"ort_{m.lower()}.onnx", npy, calib_nchw, keep)}
    if not (npy.is_file() and np.array_equal(np.load(npy), calib_nchw)):
        np.save(npy, calib_nchw)
    per: dict[str, Any] = {}
    for method in methods:

        def one(method: str = method) -> dict[str, Any]:
            out = work / f"ort_{method.lower()}.onnx"
            if method in reuse:
                return {**figures(ref, run_onnx(str(out), eval_px, prep), truth), "kept": True}
            proc = subprocess.run(
                [sys.executable, __file__, "--child-ort", method, str(onnx), str(work / "ort.calib.npy"), str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0 or not out.is_file():
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
                raise RuntimeError(f"{exit_text(proc.returncode)}: {lines[-1] if lines else 'no output'}")
            return figures(ref, run_onnx(str(out), eval_px, prep), truth)

        per[method] = cell(one)
    ok = {m: f for m, f in per.items() if "sqnr_db" in f}
    if not ok:
        return {"error": "; ".join(f"{m}: {f['error']}" for m, f in per.items()), "methods": per}
    best = max(ok, key=lambda m: ok[m]["sqnr_db"])
    return {**ok[best], "method": best, "methods": per}


def _child_ort(method: str, onnx: str, calib_npy: str, out: str) -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns on the root logger
    name = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    with contextlib.redirect_stdout(sys.stderr):  # and prints its calibration progress
        quantize_static(
            onnx,
            out,
            _Reader(name, np.load(calib_npy)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    return 0


def aeq_int8(float_tflite: Path, calib: np.ndarray, out: Path, keep: bool = False) -> Path:
    """ai-edge-quantizer's static int8 recipe (``static_wi8_ai8``, min/max) on the float TFLite model, in a child."""
    if kept(out, out.with_suffix(".calib.npy"), calib, keep):
        return out
    np.save(out.with_suffix(".calib.npy"), calib)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(aeq_path()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__, "--child-aeq", str(float_tflite), str(out.with_suffix(".calib.npy")), str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"ai-edge-quantizer {exit_text(proc.returncode)}: {lines[-1] if lines else 'no output'}")
    return out


def _child_aeq(float_tflite: str, calib_npy: str, out: str) -> int:
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    signatures = Interpreter(model_path=float_tflite).get_signature_list()
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    qt = quantizer.Quantizer(float_tflite, recipe.static_wi8_ai8())
    with contextlib.redirect_stdout(sys.stderr):  # it prints a size/time report
        calibration = qt.calibrate({key: [{name: x[None]} for x in np.load(calib_npy)]}, num_threads=2)
        qt.quantize(calibration).export_model(out, overwrite=True)
    return 0


def latency(float_path: Path, int8_path: Path, runs: int) -> dict[str, Any]:
    """Median ms of float32 and int8 at 1 thread, XNNPACK, interleaved in worker processes."""
    doc = benchmark([float_path, int8_path], BenchOptions(threads=(1,), runs=runs, warmup=20))
    by = {r.path: r.stats.p50_ms for r in doc.results}
    f, q = by[str(float_path)], by[str(int8_path)]
    return {"float32_ms": round(f, 2), "int8_ms": round(q, 2), "speedup": round(f / q, 2), "runs": runs}


# ----------------------------------------------------------------------------- issue 13: the target's model
def target_int8(convert_dir: Path, out: Path, proto: Protocol, target: str = TARGET) -> tuple[Path, dict[str, Any]]:
    """``edgeship quantize --target`` in a child: the model a user of that target gets, and its report.

    Exit 3 (over the target's SQNR budget) still writes a model, ``model_int8_OVER_BUDGET.tflite``:
    that is what the command produced, so it is measured too.
    """
    cmd = [
        sys.executable,
        "-m",
        "edgeship",
        "quantize",
        str(convert_dir),
        *proto.calib_args(out.parent),
        "--max-eval",
        "50",
        "--target",
        target,
        "-o",
        str(out),
        "-q",
        "--force",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    report_path = out / "quant_report.json"
    if proc.returncode not in (0, 3) or not report_path.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise RuntimeError(
            f"edgeship quantize --target {target} {exit_text(proc.returncode)}: {lines[-1] if lines else 'no output'}"
        )
    report = json.loads(report_path.read_text())
    return out / report["output"], report


def delegation_of(path: Path) -> dict[str, Any]:
    """XNNPACK partitions and the ops left outside (for a model that runs on XNNPACK)."""
    from edgeship.runtime.delegation import of_interpreter
    from edgeship.runtime.interpreter import TFLiteModel

    d = of_interpreter(TFLiteModel(path, num_threads=1).interpreter)
    return {"partitions": d.partitions, "outside": dict(d.outside)}


def target_speed(float_path: Path, target_path: Path, int8_path: Path | None, runs: int) -> dict[str, Any]:
    """float32 vs the target's model (and edgeship's default int8) at 1 thread, XNNPACK, interleaved in one run."""
    paths = [float_path, target_path] + ([int8_path] if int8_path is not None else [])
    doc = benchmark(paths, BenchOptions(threads=(1,), runs=runs, warmup=20))
    by = {r.path: r.stats.p50_ms for r in doc.results}
    f, t = by[str(float_path)], by[str(target_path)]
    out = {"float32_ms": round(f, 2), "target_ms": round(t, 2), "speedup": round(f / t, 2), "runs": runs}
    if int8_path is not None:
        out["default_int8_ms"] = round(by[str(int8_path)], 2)
    return out


def target_column(
    conv_dir: Path,
    work: Path,
    proto: Protocol,
    eval_px: np.ndarray,
    prep: Preprocessing,
    ref: np.ndarray,
    int8_path: Path | None,
) -> dict[str, Any]:
    """Issue 13 for one model: partitions float/target, ops outside, SQNR, float32 vs target latency."""
    float_path = conv_dir / "model_float32.tflite"
    path, report = target_int8(conv_dir, work / TARGET, proto)
    mixed = report.get("mixed_precision") or {}
    row: dict[str, Any] = {
        "target": TARGET,
        "file": path.name,
        **score_tflite(path, eval_px, prep, ref),
        "quant_sqnr_db": report["figures"]["sqnr_db"],
        "float_ops": mixed.get("float_ops", 0),
        "float_islands": len(report["runs_on"].get("float_islands", [])),
        "kept_float": [k["name"] for k in mixed.get("kept_float", [])],
    }
    if not row.get("xnnpack"):
        return {**row, "error": f"the {TARGET} model does not run on XNNPACK"}
    row["delegation_float32"], row["delegation_target"] = delegation_of(float_path), delegation_of(path)
    if proto.latency_runs > 0:
        row["latency"] = cell(lambda: target_speed(float_path, path, int8_path, proto.latency_runs))
    return row


# ----------------------------------------------------------------------------- one model
def measure(case: tuple[str, str], proto: Protocol, columns: Iterable[str] = COLUMNS) -> dict[str, Any]:
    """Every column of the matrix for one (model, exporter)."""
    import onnx as onnx_lib

    name, exporter = case
    arch, columns = SHARED[name][2] if name in SHARED else archs.ARCHS[name], set(columns)
    work = proto.work / f"{name}-{exporter}"
    work.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"model": name, "exporter": exporter}
    start = time.perf_counter()
    try:
        onnx_path = proto.assets / "models" / SHARED[name][0] if name in SHARED else archs.build(name, exporter)
    except Exception as exc:  # noqa: BLE001
        return {**row, "error": f"build: {one_line(exc)}"}
    meta = onnx_lib.load(str(onnx_path), load_external_data=False)
    row["export"] = {
        "opset": meta.opset_import[0].version,
        "external_data": bool(list(onnx_path.parent.glob("*.data"))),
        "nodes": len(meta.graph.node),
        "build_s": round(time.perf_counter() - start, 1),
    }
    conv_dir = work / "convert"
    row["convert"] = cell(lambda: convert_model(onnx_path, arch, conv_dir, proto))
    if "error" in row["convert"]:
        return row
    card = ModelCard.load(conv_dir / "model_card.json")
    calib_set, eval_set = proto.split()
    truth = eval_set.labels_for(proto.labels()) if arch.classes == 1000 else None
    row["split"] = {
        "calibration": calib_set.selection,
        "calib_classes": calib_set.classes(),
        "eval_classes": eval_set.classes(),
        "calib": len(calib_set),
        "eval": len(eval_set),
    }
    eval_px = load_pixels(eval_set, arch.prep)
    ref = run_onnx(str(onnx_path), eval_px, arch.prep)
    if truth is not None:
        row["float_top1"] = round(accuracy(ref, truth, 1) or 0.0, 4)
    tfl_prep = card.preprocessing  # input affine ops may have been folded into it
    tfl_eval_px = load_pixels(eval_set, tfl_prep)
    row["float32"] = cell(
        lambda: {
            **runs_on(conv_dir / "model_float32.tflite"),
            **figures(ref, tflite_outputs(conv_dir / "model_float32.tflite", tfl_eval_px, tfl_prep, True), truth),
        }
    )
    int8: Path | None = None
    if "edgeship" in columns:

        def es() -> dict[str, Any]:
            nonlocal int8
            int8 = edgeship_int8(conv_dir, work / "int8", proto)
            return {**score_tflite(int8, tfl_eval_px, tfl_prep, ref, truth), **quant_choices(work / "int8")}

        row["edgeship_int8"] = cell(es)
    calib_tfl = np.stack([normalize(p, tfl_prep) for p in load_pixels(calib_set, tfl_prep)])
    if "tf" in columns:
        row["tf_ptq"] = cell(
            lambda: score_tflite(
                tf_ptq(conv_dir, calib_tfl, work / "tf_ptq.tflite", proto.keep_peers), tfl_eval_px, tfl_prep, ref, truth
            )
        )
    if "ort" in columns:
        calib_nchw = np.stack([normalize(p, arch.prep) for p in load_pixels(calib_set, arch.prep)]).transpose(
            0, 3, 1, 2
        )
        row["ort_qdq"] = cell(
            lambda: ort_qdq(
                onnx_path,
                np.ascontiguousarray(calib_nchw),
                eval_px,
                arch.prep,
                ref,
                work,
                truth,
                proto.ort_methods,
                proto.keep_peers,
            )
        )
    if "aeq" in columns:
        row["aeq_int8"] = cell(
            lambda: score_tflite(
                aeq_int8(conv_dir / "model_float32.tflite", calib_tfl, work / "aeq_int8.tflite", proto.keep_peers),
                tfl_eval_px,
                tfl_prep,
                ref,
                truth,
            )
        )
    if "latency" in columns and proto.latency_runs > 0:
        ok = int8 is not None and row.get("edgeship_int8", {}).get("xnnpack")
        row["latency"] = (
            cell(lambda: latency(conv_dir / "model_float32.tflite", int8, proto.latency_runs))
            if ok
            else {"error": "no int8 model that runs on XNNPACK"}
        )
    if "target" in columns:
        es_ok = int8 is not None and row.get("edgeship_int8", {}).get("xnnpack")
        row["target_int8"] = cell(
            lambda: target_column(conv_dir, work, proto, tfl_eval_px, tfl_prep, ref, int8 if es_ok else None)
        )
    row["total_s"] = round(time.perf_counter() - start, 1)
    return row


def quant_choices(out: Path) -> dict[str, Any]:
    """What edgeship's default chose (range method, float islands and logits, bias correction, per-channel)
    and which images it calibrated on."""
    report = json.loads((out / "quant_report.json").read_text())
    opts, calib = report.get("options", {}), report.get("calibration", {})
    return {
        "range_method": report.get("ranges", {}).get("auto", {}).get("chosen", opts.get("method")),
        "per_channel": opts.get("per_channel"),
        "float_islands": len(report.get("runs_on", {}).get("float_islands", [])),
        "float_logits": bool(report.get("runs_on", {}).get("float_logits")),
        "bias_correction": report.get("bias_correction", {}).get("ops") or [],
        "calibration": {k: calib.get(k) for k in ("count", "selection", "classes", "file_list_sha256")},
    }


# ----------------------------------------------------------------------------- table
def _q(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    if "sqnr_db" not in d:
        return "cannot run" if "runs on neither" in d.get("error", "") else "ERR (below)"
    extra = f" {d['method']}" if "method" in d else ""
    return f"{d['sqnr_db']:.1f} dB ({100 * d['agreement']:.0f}%){extra}"


def _runs(d: dict[str, Any] | None) -> str:
    if not d or "xnnpack" not in d:
        return "-"
    return f"{'yes' if d['xnnpack'] else 'NO'}/{'yes' if d['reference'] else 'NO'}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the matrix (one line per model); errors in full below it."""
    head = (
        "| model | export | convert s | float agree / cos | edgeship int8 | TF PTQ | ORT QDQ best | "
        "runs XNNPACK/ref (es, TF) | fp32 ms | int8 ms | speed-up | partitions fp32/int8 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    errors = []
    for r in rows:
        label = f"{r['model']} ({r['exporter']})"
        if "error" in r or "error" in r.get("convert", {}):
            err = r.get("error") or r["convert"]["error"]
            lines.append(f"| {label} | {_export(r)} | ERR | - | - | - | - | - | - | - | - | - |")
            errors.append(f"{label}: {err}")
            continue
        c, lat = r["convert"], r.get("latency", {})
        es, tf, f32 = r.get("edgeship_int8"), r.get("tf_ptq"), r.get("float32", {})
        lines.append(
            f"| {label} | {_export(r)} | {c['seconds']:.0f} | {100 * c['agreement']:.0f}% / {c['mean_cosine']:.5f} | "
            f"{_q(es)} | {_q(tf)} | {_q(r.get('ort_qdq'))} | {_runs(es)}, {_runs(tf)} | "
            f"{lat.get('float32_ms', '-')} | {lat.get('int8_ms', '-')} | {lat.get('speedup', '-')} | "
            f"{f32.get('partitions', '-')}/{(es or {}).get('partitions', '-')} |"
        )
        for col in ("edgeship_int8", "tf_ptq", "ort_qdq", "latency", "float32"):
            d = r.get(col) or {}
            if d.get("error") and not d.get("run_errors"):  # else the per-interpreter lines say it
                errors.append(f"{label} {col}: {d['error']}")
            for kind, why in (d.get("run_errors") or {}).items():
                errors.append(f"{label} {col} on {kind}: {why}")
    return lines + ([""] + errors if errors else [])


def _export(r: dict[str, Any]) -> str:
    e = r.get("export") or {}
    return f"opset {e['opset']}{' +data' if e.get('external_data') else ''}" if e else "-"


#: Issue 25's columns: (row key, heading).
PEERS = (("edgeship_int8", "edgeship"), ("tf_ptq", "TF PTQ"), ("ort_qdq", "ORT QDQ best"), ("aeq_int8", "AI Edge Q"))
#: Issue 25: edgeship's int8 top-1 within this of float; no peer better by more than one image of 400.
MAX_DROP, ONE_IMAGE = 0.005, 0.0025


def _acc(d: dict[str, Any] | None) -> str:
    if not d or "agreement" not in d:
        return "ERR" if d else "-"
    top1 = f"{100 * d['top1']:.2f}" if "top1" in d else "-"
    return f"{top1} / {100 * d['agreement']:.2f} / {d['sqnr_db']:.1f}"


def verdict(r: dict[str, Any]) -> str:
    """Issue 25's acceptance for one row: edgeship within 0.5 pt of float, no peer ahead by more than one image."""
    es = r.get("edgeship_int8") or {}
    if "top1" not in es or "float_top1" not in r:
        return "-"
    bad = (
        [f"drop {100 * (r['float_top1'] - es['top1']):.2f} pt"]
        if r["float_top1"] - es["top1"] > MAX_DROP + 1e-9
        else []
    )
    for key, label in PEERS[1:]:
        d = r.get(key) or {}
        for fig in ("top1", "agreement"):
            if fig in d and d[fig] - es[fig] > ONE_IMAGE + 1e-9:
                bad.append(f"{label} {fig} +{100 * (d[fig] - es[fig]):.2f} pt{_above_float(r, d, fig)}")
    return "pass" if not bad else "; ".join(bad)


def _above_float(r: dict[str, Any], peer: dict[str, Any], fig: str) -> str:
    """A note when a peer's top-1 beats float's by more than one image: an int8 model that agrees with
    float on every image scores float's top-1, so no faithful quantizer can be within one image of it."""
    if fig != "top1" or peer["top1"] - r["float_top1"] <= ONE_IMAGE + 1e-9:
        return ""
    return f" (above float by {100 * (peer['top1'] - r['float_top1']):.2f} pt)"


def pooled_table(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 25's figures pooled over every calibration split measured for a model: top-1 and agreement
    summed over all evaluated images of all splits, SQNR averaged; empty unless a model has two splits."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "float_top1" in r:
            groups.setdefault((r["model"], r["exporter"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    head = (
        "| model | export | splits / images | float top-1 | "
        + " | ".join(f"{h} top-1 / agree / SQNR" for _, h in PEERS)
        + " |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (model, exporter), g in groups.items():
        n = [r["split"]["eval"] for r in g]
        fl = sum(r["float_top1"] * k for r, k in zip(g, n)) / sum(n)
        cells = [_acc(_pool([(r.get(key) or {}, k) for r, k in zip(g, n)])) for key, _ in PEERS]
        lines.append(f"| {model} | {exporter} | {len(g)} / {sum(n)} | {100 * fl:.2f} | " + " | ".join(cells) + " |")
    return lines


def _pool(cells: list[tuple[dict[str, Any], int]]) -> dict[str, Any] | None:
    """One peer's figures over several splits (weighted by images); None unless every split measured it."""
    if not all("agreement" in d and "top1" in d for d, _ in cells):
        return None
    total = sum(k for _, k in cells)
    return {
        "top1": sum(d["top1"] * k for d, k in cells) / total,
        "agreement": sum(d["agreement"] * k for d, k in cells) / total,
        "sqnr_db": sum(d["sqnr_db"] for d, _ in cells) / len(cells),
    }


def accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 25's table: float top-1, then top-1 / agreement (%) / SQNR (dB) for edgeship and each peer."""
    head = (
        "| model | export | float top-1 | "
        + " | ".join(f"{h} top-1 / agree / SQNR" for _, h in PEERS)
        + " | edgeship chose | verdict |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "float_top1" not in r:
            continue
        es = r.get("edgeship_int8") or {}
        chose = _chose(es) if "top1" in es else "-"
        lines.append(
            f"| {r['model']} | {r['exporter']} | {100 * r['float_top1']:.2f} | "
            + " | ".join(_acc(r.get(k)) for k, _ in PEERS)
            + f" | {chose} | {verdict(r)} |"
        )
    return lines


def _chose(es: dict[str, Any]) -> str:
    """edgeship's choices in a few words: range method, float islands, float logits, bias-corrected ops."""
    bc = "/".join(op.split("_")[0].lower() for op in es.get("bias_correction", [])) or "none"
    logits = ", float logits" if es.get("float_logits") else ""
    return f"{es.get('range_method', '-')}, islands {es.get('float_islands', '-')}{logits}, BC {bc}"


#: Issue 13: the target's model must be at least this much faster than float32 at 1 thread.
MIN_SPEEDUP = 1.3


def _outside(d: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} x{v}" for k, v in (d or {}).get("outside", {}).items()) or "none"


def target_table(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 13's table: XNNPACK partitions, ops outside, float32 vs the ``--target`` model at 1 thread."""
    head = (
        f"| model | partitions fp32/{TARGET} | ops outside fp32 | ops outside {TARGET} | fp32 ms | {TARGET} ms | "
        f"speed-up | default int8 ms | SQNR dB (300 held-apart) | float ops kept | file |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    errors = []
    for r in rows:
        t = r.get("target_int8")
        if not t:
            continue
        label = f"{r['model']} ({r['exporter']})"
        if "delegation_target" not in t:
            lines.append(
                f"| {label} | ERR | - | - | - | - | - | - | {t.get('sqnr_db', '-')} | - | {t.get('file', '-')} |"
            )
            errors.append(f"{label} target_int8: {t.get('error')}")
            continue
        lat, df, dt = t.get("latency", {}), t["delegation_float32"], t["delegation_target"]
        speed = lat.get("speedup")
        mark = "" if speed is None else (" (SLOWER)" if speed < 1.0 else (" (<1.3)" if speed < MIN_SPEEDUP else ""))
        lines.append(
            f"| {label} | {df['partitions']}/{dt['partitions']} | {_outside(df)} | {_outside(dt)} | "
            f"{lat.get('float32_ms', '-')} | {lat.get('target_ms', '-')} | {speed if speed else '-'}{mark} | "
            f"{lat.get('default_int8_ms', '-')} | {t['sqnr_db']:.1f} | "
            f"{t['float_ops'] + t['float_islands']} | {t['file']} |"
        )
        if lat.get("error"):
            errors.append(f"{label} target latency: {lat['error']}")
    return lines + ([""] + errors if errors else [])


# ----------------------------------------------------------------------------- CLI
def cases(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (model, exporter) pairs asked for."""
    big = [n for n in archs.ARCHS if not n.startswith("tiny")]
    shared = [(n, SHARED[n][1]) for n in SHARED]
    if args.models:
        out = []
        for item in args.models.split(","):
            name, _, exporter = item.partition(":")
            if name not in archs.ARCHS and name not in SHARED:
                raise SystemExit(f"unknown model {name!r}; known: {', '.join([*archs.ARCHS, *SHARED])}")
            out.append((name, SHARED[name][1] if name in SHARED else exporter or args.exporter))
        return out
    if getattr(args, "trained", False):
        return list(TRAINED)
    if args.full:
        return (
            [(n, e) for n in big for e in archs.EXPORTERS]
            + shared
            + [(n, "dynamo") for n in archs.ARCHS if n not in big]
        )
    return [(n, args.exporter) for n in big] + shared


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated names, optionally name:exporter (default: the 8 architectures)")
    ap.add_argument("--exporter", choices=archs.EXPORTERS, default="dynamo")
    ap.add_argument("--full", action="store_true", help="every architecture with both exporters, plus the variants")
    ap.add_argument(
        "--trained",
        action="store_true",
        help="the trained models only: EfficientNet-Lite1/2 (both exporters) and the shared MobileNetV2",
    )
    ap.add_argument(
        "--calib-first",
        action="store_true",
        help="calibrate on the first 100 images by name (the old default) instead of edgeship's default choice",
    )
    ap.add_argument(
        "--calib-seed",
        type=int,
        help="calibrate on a random 100 chosen with this seed (edgeship quantize --seed), evaluate on the rest",
    )
    ap.add_argument("--columns", default=",".join(COLUMNS), help=f"subset of {','.join(COLUMNS)}")
    ap.add_argument(
        "--ort-methods",
        default=",".join(ORT_METHODS),
        help="onnxruntime calibration methods to try "
        "(the histogram ones hold every intermediate output in memory: ~9 GB on EfficientNet-Lite1)",
    )
    ap.add_argument("--runs", type=int, default=200, help="latency: invokes per model (0: skip)")
    ap.add_argument("--work", type=Path, help="keep the converted and quantized models here")
    ap.add_argument(
        "--keep-peers",
        action="store_true",
        help="reuse the peers' int8 models kept in --work when made from exactly these calibration inputs "
        "(edgeship's column is always made again)",
    )
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--tables", type=Path, nargs="+", help="print the tables of rows kept by --json (no measuring)")
    ap.add_argument("--child-tf-ptq", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-ort", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--child-aeq", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_tf_ptq:
        return _child_tf_ptq(*args.child_tf_ptq)
    if args.child_ort:
        return _child_ort(*args.child_ort)
    if args.child_aeq:
        return _child_aeq(*args.child_aeq)
    if args.tables:
        print_tables([row for path in args.tables for row in json.loads(path.read_text())], args.runs)
        return 0
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer warns on the root logger
    assets = shared_assets()
    if assets is None:
        ap.error("shared assets not found (set EDGE_ASSETS or check out ../shared)")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="arch-matrix-") as tmp:
        proto = Protocol(
            assets,
            args.work or Path(tmp),
            latency_runs=args.runs,
            calib_first=args.calib_first,
            calib_seed=args.calib_seed,
            ort_methods=tuple(args.ort_methods.split(",")),
            keep_peers=args.keep_peers,
        )
        for case in cases(args):
            print(f"== {case[0]} ({case[1]})", file=sys.stderr, flush=True)
            rows.append(measure(case, proto, args.columns.split(",")))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print_tables(rows, args.runs)
    return 0


def print_tables(rows: list[dict[str, Any]], runs: int) -> None:
    """The matrix table, issue 25's accuracy table and issue 13's target table (when measured)."""
    split = rows[0].get("split", {}) if rows else {}
    print(
        f"calibration: {NUM_CALIB} shared images, {split.get('calibration', '?')} ({split.get('calib_classes', '?')} "
        f"classes); evaluation: the other {split.get('eval', NUM_EVAL)} ({split.get('eval_classes', '?')} classes); "
        f"SQNR of int8 logits vs the float ONNX model (onnxruntime); latency at 1 thread, XNNPACK"
    )
    print("\n".join(table(rows)))
    if any("float_top1" in r for r in rows):
        print("\ntop-1 against labels (%), top-1 agreement with float (%), SQNR (dB) on the evaluation images")
        print("\n".join(accuracy_table(rows)))
    pooled = pooled_table(rows)
    if pooled:
        print("\npooled over the calibration splits (top-1 and agreement over every evaluated image; SQNR mean)")
        print("\n".join(pooled))
    if any("target_int8" in r for r in rows):
        print(
            f"\nissue 13: `quantize --target {TARGET}` model vs float32, XNNPACK, 1 thread, interleaved in one run "
            f"({runs} invokes each, median); float ops kept = budget-search ops + float islands"
        )
        print("\n".join(target_table(rows)))


if __name__ == "__main__":
    sys.exit(main())
