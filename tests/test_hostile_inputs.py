"""Hostile but realistic inputs (issue 22, crashes/races/messages): one line on stderr, exit non-zero,
nothing written, no traceback; killed runs leave no temporary folder behind.

Every test runs the CLI in a subprocess (the Python API where the case is the API's).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeship._io import owner_tag

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def edgeship(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeship", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd, check=False)


def assert_one_line(proc: subprocess.CompletedProcess[str], match: str = "", code: int = 1) -> str:
    """Exit ``code``, exactly one line on stderr, no traceback; the line contains ``match``."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-3000:]
    assert match in err, err
    return err


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- case 11: SIGTERM/SIGHUP like Ctrl-C; dead runs' temporary folders removed by the next run -------------

def _wait_for_onnx2tf(proc: subprocess.Popen[bytes]) -> None:
    import psutil

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if any("onnx2tf_worker" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)):
            time.sleep(1.0)  # mid-conversion: onnx2tf has its model copy and output folder in the temporary folder
            return
        time.sleep(0.2)
    pytest.fail("convert never reached onnx2tf")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_convert_cleans_up_and_exits_non_zero(sig: signal.Signals, tmp_path: Path, tiny_onnx: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edgeship", "convert", str(tiny_onnx), "-o", str(out), "-q"],
                            env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_onnx2tf(proc)  # type: ignore[arg-type]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    assert err.strip() == f"edgeship convert: interrupted ({sig.name})", err[-2000:]
    assert not list(scratch.iterdir()), "a temporary folder was left behind"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tmp"], list(tmp_path.iterdir())


def test_next_run_removes_temporary_folders_of_dead_runs(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    dead = scratch / f"edgeship-run-{owner_tag(dead_pid())}-abcd1234"
    live = scratch / f"edgeship-run-{owner_tag(os.getppid())}-abcd1234"
    other = scratch / "edgeship-convert-abcd1234"  # not a run folder: never touched
    for folder in (dead, live, other):
        (folder / "tf").mkdir(parents=True)
        (folder / "tf" / "model.onnx").write_bytes(b"x" * 1000)
    assert_one_line(edgeship("convert", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o"), "-q",
                             env={"TMPDIR": str(scratch)}), "missing.onnx")
    assert not dead.exists() and live.is_dir() and other.is_dir()


# --- case 9 and huge inputs: refused in one line before any work ------------------------------------------

def _save(model: object, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def batch4_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import tiny_classifier

    return _save(tiny_classifier(batch=4), tmp_path_factory.mktemp("b4") / "batch4.onnx")


def test_fixed_batch_4_is_refused_by_convert_and_quantize(tmp_path: Path, batch4_onnx: Path,
                                                          tiny_images: Path) -> None:
    out = tmp_path / "c"
    assert_one_line(edgeship("convert", str(batch4_onnx), "-o", str(out), "-q"), "batch dimension is fixed to 4")
    assert not out.exists()
    assert_one_line(edgeship("quantize", str(batch4_onnx), "--calib", str(tiny_images), "-o", str(out), "-q"),
                    "batch dimension is fixed to 4")
    assert not out.exists()


def test_quantize_refuses_a_convert_folder_of_batch_4(tmp_path: Path, tiny_bundle: Path, tiny_images: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "conv"
    shutil.copytree(tiny_bundle, folder)
    card = json.loads((folder / "model_card.json").read_text())
    card["input"]["shape"][0] = 4  # what an older edgeship wrote for a batch-4 model
    (folder / "model_card.json").write_text(json.dumps(card))
    out = tmp_path / "q"
    assert_one_line(edgeship("quantize", str(folder), "--calib", str(tiny_images), "-o", str(out), "-q"),
                    "batch 4")
    assert not out.exists()


def test_huge_input_shape_is_refused(tmp_path: Path, tiny_images: Path) -> None:
    from tests.conftest import tiny_classifier

    out = tmp_path / "c"
    dynamic = tiny_classifier()
    for i in (2, 3):
        dynamic.graph.input[0].type.tensor_type.shape.dim[i].dim_param = "HW"[i - 2]
    dyn = _save(dynamic, tmp_path / "dynamic.onnx")
    assert_one_line(edgeship("convert", str(dyn), "-o", str(out), "--input-shape", "1,3,100000,100000", "-q"),
                    "too large")
    assert not out.exists()
    huge = tiny_classifier()
    huge.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 100000
    huge.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 100000
    path = _save(huge, tmp_path / "huge.onnx")
    assert_one_line(edgeship("convert", str(path), "-o", str(out), "-q"), "too large")
    assert not out.exists()
    assert_one_line(edgeship("deploy", str(path), "--calib", str(tiny_images), "--target", "x86-host", "-o", str(out),
                             "-q"), "too large")
    assert not out.exists()
