"""Native code runs where a crash becomes an error, and child processes die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeship._child import ChildWorker
from edgeship.cli import main
from edgeship.errors import NativeCrashError


def _abort(*args, **kwargs):  # runs in edgeship's child process, like a failed TensorFlow check
    os.abort()


def test_native_abort_is_one_line_and_exit_1(
    tmp_path: Path, tiny_bundle: Path, calib_images: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from edgeship.quantize import tflite_quant

    monkeypatch.setattr(tflite_quant, "quantize_calibrated", _abort)
    assert main(["quantize", str(tiny_bundle), "--calib", str(calib_images), "-o", str(tmp_path / "q"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "quantize (TensorFlow)" in err and "SIGABRT" in err
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def _report_and_fail(progress=None):
    progress(1)
    progress(2)
    raise ValueError("bad value 7")


def test_child_worker_progress_errors_and_crash_recovery() -> None:
    seen = []
    with ChildWorker() as worker:
        with pytest.raises(ValueError, match="bad value 7"):
            worker.call("stage", _report_and_fail, progress=seen.append)
        assert seen == [1, 2]
        with pytest.raises(NativeCrashError, match=r"^crashing stage: native code crashed \(SIGABRT\)"):
            worker.call("crashing stage", _abort)
        assert worker.call("after the crash", sorted, [3, 1, 2]) == [1, 2, 3]  # a new child took over


def test_onnx2tf_worker_dies_with_a_killed_convert(tmp_path: Path, tiny_onnx: Path) -> None:
    """SIGKILL of `edgeship convert` used to leave the onnx2tf worker running for ~40 s."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "convert", str(tiny_onnx), "-o", str(tmp_path / "c"), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = None
    deadline = time.monotonic() + 120
    while worker is None and time.monotonic() < deadline and proc.poll() is None:
        worker = next(
            (
                c
                for c in psutil.Process(proc.pid).children(recursive=True)
                if "edgeship._worker" in " ".join(c.cmdline())
            ),
            None,
        )
        time.sleep(0.2)
    assert worker is not None, "the onnx2tf worker never started"
    time.sleep(1.0)  # let it get past its start-up
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs([worker], timeout=10)
    assert not alive, "the onnx2tf worker outlived its parent"


def test_equalize_scratch_only_with_equalize(
    tmp_path: Path, tiny_bundle: Path, calib_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert main(["quantize", str(tiny_bundle), "--calib", str(calib_images), "-o", str(tmp_path / "q"), "-q"]) == 0
    assert not list(scratch.glob("edgeship-equalize-*"))
    assert not list(scratch.glob("edgeship-native-*")), "the child's log was left behind"


#: A plain script: eight threads load a model 30 times each (each load moves fd 2 to catch LiteRT's lines),
#: then the script writes to stderr.
THREADED_LOADS = """\
import sys, threading
from edgeship.runtime.interpreter import TFLiteModel

def load():
    for _ in range(30):
        TFLiteModel(sys.argv[1])

threads = [threading.Thread(target=load) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("stderr still reaches the terminal", file=sys.stderr)
"""


def test_models_loaded_on_many_threads_leave_stderr_where_it_was(tiny_bundle: Path, tmp_path: Path) -> None:
    """fd 2 is one per process: overlapping loads used to leave it pointing at one load's sink, and every
    later line on stderr (one-line errors included) went nowhere."""
    script = tmp_path / "loads.py"
    script.write_text(THREADED_LOADS)
    model = next(tiny_bundle.glob("*.tflite"))
    proc = subprocess.run([sys.executable, str(script), str(model)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stderr still reaches the terminal" in proc.stderr
