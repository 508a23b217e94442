"""onnx2tf in edgeship's worker process, and what is done to its output before it is verified: the XNNPACK
graph clean-ups, the refusal of models the on-device interpreter cannot run, and the SavedModel's files."""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

from edgeship import tflite_graph
from edgeship._child import ChildWorker, one_line
from edgeship._run import lasting_temp_dir
from edgeship.convert import onnx2tf_worker
from edgeship.convert.report import ChildRun
from edgeship.errors import ConversionError, NativeCrashError
from edgeship.runtime.delegation import flex_refusal
from edgeship.runtime.model_check import check_model_files

log = logging.getLogger(__name__)


def run_onnx2tf(onnx_path: Path, work_dir: Path, *, float16: bool = False) -> ChildRun:
    """Run onnx2tf in edgeship's worker process on a private copy; return its figures (``float16``: also
    write the float16 model)."""
    model_copy = work_dir / "model.onnx"
    shutil.copyfile(onnx_path, model_copy)
    job = {"onnx": str(model_copy), "output": str(work_dir / "tf"), "workdir": str(work_dir), "float16": float16}
    start = time.perf_counter()
    with ChildWorker(env={"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}) as worker:
        try:
            result = worker.call("onnx2tf", onnx2tf_worker.run, job)
        except NativeCrashError as exc:
            result = {"ok": False, "error": str(exc)}
        log_text = Path(worker.log_path).read_text(errors="replace")
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if not result.get("ok") or not (work_dir / "tf" / "model_float32.tflite").is_file():
        kept = _keep_log(log_text)
        tail = _without_flag_hints(one_line(log_text))
        raise ConversionError(
            f"onnx2tf failed: {result.get('error', 'no TFLite written')}"
            + (f" ({tail})" if tail and tail not in result.get("error", "") else "")
            + (f"; full log: {kept}" if kept else "")
        )
    return ChildRun(round(wall, 3), round(peak_mb, 1), 0)


#: onnx2tf's advice to pass one of its own command-line flags, which edgeship's user cannot pass.
_FLAG_HINT = re.compile(r"[^.;()]*\btry (the )?-[A-Za-z0-9_]+ option[^.;()]*[.;]?\s*")


def _without_flag_hints(text: str) -> str:
    """``text`` without onnx2tf's "try the -xyz option" sentences."""
    return " ".join(_FLAG_HINT.sub(" ", text).split())


def clean_graph(*paths: Path | None) -> dict[str, int]:
    """The XNNPACK clean-ups of :mod:`tflite_graph`, in place on onnx2tf's outputs (verified next)."""
    counts: dict[str, int] = {}
    for path in (p for p in paths if p is not None):
        model, changed = tflite_graph.clean(path.read_bytes())
        if changed:
            path.write_bytes(model)
        counts = counts or changed
    return counts


def check_runnable(*paths: Path | None) -> None:
    """Refuse a model the on-device interpreter cannot run, before verifying it here.

    This process has TensorFlow loaded (the graph clean-ups use it), and with it the
    interpreter silently gains TensorFlow's Flex delegate, which no device has: so Select
    TF ops and custom ops are refused from the file itself, then each model is loaded,
    allocated and run once in a child process with only the runtime's interpreter.
    """
    present = [p for p in paths if p is not None]
    for path in present:
        ops = tflite_graph.custom_ops(path.read_bytes())
        refusal = flex_refusal(ops)
        if refusal:  # other custom ops: the child's run says whether the runtime resolves them
            raise ConversionError(f"the converted model {refusal} (replace those ops in the ONNX model)")
    for path, problem in check_model_files(present).items():
        if problem:
            raise ConversionError(
                f"the converted model {path.name} does not run on the on-device interpreter: {problem}"
            )


def _keep_log(text: str) -> Path | None:
    """Keep a failed worker's log where the user can read it (the run's folders are removed) and log it."""
    if not text.strip():
        return None
    log.debug("onnx2tf log:\n%s", text)
    fd, kept = tempfile.mkstemp(prefix="edgeship-onnx2tf-", suffix=".log", dir=lasting_temp_dir())
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return Path(kept)


def saved_model_files(tf_dir: Path) -> dict[str, bytes]:
    """onnx2tf's SavedModel, file by file (kept for TensorFlow's own tools)."""
    files: dict[str, bytes] = {}
    for name in ("saved_model.pb", "variables", "assets", "fingerprint.pb"):
        src = tf_dir / name
        for f in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else []:
            files[str(f.relative_to(tf_dir))] = f.read_bytes()
    return files
