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


def edgeship(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeship", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


def py(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in a subprocess (the runtime's CLI, a user's script)."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        check=False,
    )


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
        if any("edgeship._worker" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)):
            time.sleep(1.0)  # mid-conversion: onnx2tf has its model copy and output folder in the temporary folder
            return
        time.sleep(0.2)
    pytest.fail("convert never reached onnx2tf")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_convert_cleans_up_and_exits_non_zero(sig: signal.Signals, tmp_path: Path, tiny_onnx: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeship", "convert", str(tiny_onnx), "-o", str(out), "-q"],
        env={**os.environ, "TMPDIR": str(scratch)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: under nohup (a CI job started with it) SIGHUP is inherited ignored, and
        # edgeship leaves a signal ignored on purpose ignored.
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
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
    assert_one_line(
        edgeship(
            "convert", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o"), "-q", env={"TMPDIR": str(scratch)}
        ),
        "missing.onnx",
    )
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


def test_fixed_batch_4_is_refused_by_convert_and_quantize(tmp_path: Path, batch4_onnx: Path, tiny_images: Path) -> None:
    out = tmp_path / "c"
    assert_one_line(edgeship("convert", str(batch4_onnx), "-o", str(out), "-q"), "batch dimension is fixed to 4")
    assert not out.exists()
    assert_one_line(
        edgeship("quantize", str(batch4_onnx), "--calib", str(tiny_images), "-o", str(out), "-q"),
        "batch dimension is fixed to 4",
    )
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
    assert_one_line(edgeship("quantize", str(folder), "--calib", str(tiny_images), "-o", str(out), "-q"), "batch 4")
    assert not out.exists()


def test_huge_input_shape_is_refused(tmp_path: Path, tiny_images: Path) -> None:
    from tests.conftest import tiny_classifier

    out = tmp_path / "c"
    dynamic = tiny_classifier()
    for i in (2, 3):
        dynamic.graph.input[0].type.tensor_type.shape.dim[i].dim_param = "HW"[i - 2]
    dyn = _save(dynamic, tmp_path / "dynamic.onnx")
    assert_one_line(
        edgeship("convert", str(dyn), "-o", str(out), "--input-shape", "1,3,100000,100000", "-q"), "too large"
    )
    assert not out.exists()
    huge = tiny_classifier()
    huge.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 100000
    huge.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 100000
    path = _save(huge, tmp_path / "huge.onnx")
    assert_one_line(edgeship("convert", str(path), "-o", str(out), "-q"), "too large")
    assert not out.exists()
    assert_one_line(
        edgeship("deploy", str(path), "--calib", str(tiny_images), "--target", "x86-host", "-o", str(out), "-q"),
        "too large",
    )
    assert not out.exists()


# --- one line, exit 1, nothing written ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_images: Path) -> Path:
    out = tmp_path_factory.mktemp("int8") / "q"
    proc = edgeship("quantize", str(tiny_bundle), "--calib", str(tiny_images), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _bad_name_folder(tmp_path: Path, tiny_images: Path) -> Path:
    import shutil

    folder = tmp_path / "calib"
    shutil.copytree(tiny_images, folder)
    with open(os.path.join(os.fsencode(folder), b"photo-\xff\xfe.png"), "wb") as fh:
        fh.write((tiny_images / "img_00.png").read_bytes())
    return folder


def test_non_utf8_file_name_in_calib(tmp_path: Path, tiny_bundle: Path, tiny_onnx: Path, tiny_images: Path) -> None:
    calib = _bad_name_folder(tmp_path, tiny_images)
    out = tmp_path / "q"
    assert_one_line(
        edgeship("quantize", str(tiny_bundle), "--calib", str(calib), "-o", str(out), "-q"), "is not valid UTF-8"
    )
    assert_one_line(
        edgeship("deploy", str(tiny_onnx), "--calib", str(calib), "--target", "x86-host", "-o", str(out), "-q"),
        "is not valid UTF-8",
    )
    assert not out.exists()


def test_non_utf8_target_toml_and_preprocess_json(
    tmp_path: Path, tiny_bundle: Path, tiny_onnx: Path, tiny_images: Path
) -> None:
    toml = Path(__file__).parent.parent / "targets" / "x86-host.toml"
    bad = tmp_path / "mine.toml"
    bad.write_bytes(toml.read_bytes().replace(b'name = "x86-host"', b'name = "mine"') + b"# caf\xe9\n")
    out = tmp_path / "q"
    assert_one_line(
        edgeship("quantize", str(tiny_bundle), "--calib", str(tiny_images), "-o", str(out), "--target", str(bad), "-q"),
        "UTF-8",
    )
    prep = tmp_path / "prep.json"
    prep.write_bytes(b'{"mean": [0.5, 0.5, 0.5], "note": "caf\xe9"}')
    assert_one_line(
        edgeship("convert", str(tiny_onnx), "-o", str(out), "--preprocess", str(prep), "-q"),
        "cannot read preprocessing JSON",
    )
    assert not out.exists()


def test_custom_domain_op_is_named(tmp_path: Path) -> None:
    from onnx import helper

    from tests.conftest import tiny_classifier

    model = tiny_classifier()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = _save(model, tmp_path / "custom.onnx")
    out = tmp_path / "c"
    assert_one_line(edgeship("convert", str(path), "-o", str(out), "-q"), "com.example.FancyRelu")
    assert not out.exists()


def test_labels_from_dev_zero_is_capped(tmp_path: Path, tiny_onnx: Path) -> None:
    out = tmp_path / "c"
    assert_one_line(
        edgeship("convert", str(tiny_onnx), "-o", str(out), "--labels", "/dev/zero", "-q", timeout=120),
        "larger than 16 MiB",
    )
    assert not out.exists()


def test_bad_model_check_cache_entry_is_a_miss(tmp_path: Path, int8_bundle: Path, tiny_images: Path) -> None:
    env = {"EDGESHIP_CACHE": str(tmp_path / "cache")}
    image = str(tiny_images / "img_00.png")
    first = py(["-m", "edgeship.runtime", str(int8_bundle / "model_int8.tflite"), image, "-q"], env=env)
    assert first.returncode == 0, first.stderr
    entries = list((tmp_path / "cache" / "model-checks").glob("*.json"))
    assert entries
    for bad in ('{"verdict": 5}', '{"verdict": ["ok"]}', "[1, 2]"):
        for entry in entries:
            entry.write_text(bad)
        again = py(["-m", "edgeship.runtime", str(int8_bundle / "model_int8.tflite"), image, "-q"], env=env)
        assert again.returncode == 0 and not again.stderr, (bad, again.stderr[-2000:])
        assert again.stdout == first.stdout


@pytest.mark.parametrize(
    "change, words",
    [
        ({"std": [float("nan"), 0.2, 0.2]}, "std must be finite"),
        ({"mean": [float("inf"), 0.2, 0.2]}, "mean must be finite"),
        ({"crop": [100000, 100000]}, "crop must be two sizes from 1 to 8192"),
        ({"resize_shorter": 100000}, "resize_shorter must be from 1 to 8192"),
    ],
)
def test_card_with_nan_or_absurd_sizes(
    change: dict[str, object], words: str, tmp_path: Path, int8_bundle: Path, tiny_images: Path
) -> None:
    import json
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle, bundle)
    card_path = bundle / "model_int8.card.json"
    card = json.loads(card_path.read_text())
    card["preprocessing"].update(change)
    card_path.write_text(json.dumps(card))
    proc = py(["-m", "edgeship.runtime", str(bundle / "model_int8.tflite"), str(tiny_images / "img_00.png"), "-q"])
    assert_one_line(proc, words)


def test_zero_sized_calibration_array_is_an_input_error(tmp_path: Path, tiny_bundle: Path) -> None:
    code = f"""
import numpy as np
import edgeship
from edgeship.errors import InputError
arrays = [np.full((40, 48, 3), 7, np.uint8)] * 11 + [np.zeros((0, 48, 3), np.uint8)]
try:
    edgeship.quantize({str(tiny_bundle)!r}, arrays)
except InputError as exc:
    print("InputError:", exc)
"""
    script = tmp_path / "user.py"
    script.write_text(code)
    proc = py([str(script)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("InputError: calibration image 11 must be an HxWx3 uint8 RGB array"), proc.stdout


def test_nan_budgets_are_refused(tmp_path: Path, tiny_bundle: Path, tiny_images: Path) -> None:
    out = tmp_path / "q"
    assert_one_line(
        edgeship("quantize", str(tiny_bundle), "--calib", str(tiny_images), "-o", str(out), "--min-sqnr", "nan", "-q"),
        "min_sqnr_db must be a finite number",
    )
    toml = Path(__file__).parent.parent / "targets" / "x86-host.toml"
    text = toml.read_text().replace('name = "x86-host"', 'name = "mine"')
    assert "min_sqnr_db = " in text
    bad = tmp_path / "mine.toml"
    bad.write_text("\n".join("min_sqnr_db = nan" if ln.startswith("min_sqnr_db") else ln for ln in text.splitlines()))
    assert_one_line(
        edgeship("quantize", str(tiny_bundle), "--calib", str(tiny_images), "-o", str(out), "--target", str(bad), "-q"),
        "key 'budget.min_sqnr_db' must be a finite number",  # the profile's own check, at load
    )
    assert not out.exists()


def test_nan_weights_and_nan_std_say_nan(tmp_path: Path, tiny_onnx: Path) -> None:
    from onnx import numpy_helper

    from tests.conftest import tiny_classifier

    model = tiny_classifier()
    w = model.graph.initializer[0]
    a = numpy_helper.to_array(w).copy()
    a[0, 0, 0, 0] = float("nan")
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    path = _save(model, tmp_path / "nan.onnx")
    out = tmp_path / "c"
    err = assert_one_line(edgeship("convert", str(path), "-o", str(out), "-q"), "NaN")
    assert "1 of its weight values are NaN" in err and "cosine" not in err
    err = assert_one_line(edgeship("convert", str(tiny_onnx), "-o", str(out), "--std", "nan,0.2,0.2", "-q"), "nan")
    assert "cosine" not in err
    assert not out.exists()


def test_bench_on_a_truncated_model_gives_the_pre_check_line(tmp_path: Path, assets: Path) -> None:
    data = (assets / "models" / "mobilenet_v2_1.0_224_quant.tflite").read_bytes()
    model = tmp_path / "cut.tflite"
    model.write_bytes(data[: len(data) // 2])
    out = tmp_path / "b"
    err = assert_one_line(
        edgeship("bench", str(model), "--runs", "3", "-o", str(out), "-q"), "cannot load TFLite model"
    )
    assert "truncated or corrupt" in err and "SIGSEGV" not in err
    assert not out.exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (the pixel data is not needed to trip the warning)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_warning_is_not_printed(tmp_path: Path, int8_bundle: Path) -> None:
    image = tmp_path / "big.png"
    image.write_bytes(_png_header(10000, 10000))  # 1e8 pixels: between 1x and 2x Pillow's limit, where it warns
    proc = py(["-m", "edgeship.runtime", str(int8_bundle / "model_int8.tflite"), str(image), "-q"])
    err = assert_one_line(proc, "decompression-bomb limit")
    assert "DecompressionBombWarning" not in err


def test_mediapipe_log_lines_are_not_printed(tmp_path: Path, int8_bundle: Path) -> None:
    pytest.importorskip("mediapipe")
    code = f"""
from edgeship.errors import InputError
from edgeship.targets.mediapipe_check import MediaPipeClassifier
try:
    MediaPipeClassifier({str(int8_bundle / "model_int8.tflite")!r})  # int8 input: MediaPipe refuses it
except InputError as exc:
    print("InputError:", exc)
"""
    proc = py(["-c", code], env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("InputError: MediaPipe ImageClassifier refuses"), proc.stdout
    assert "EGL" not in proc.stderr and "absl" not in proc.stderr, proc.stderr[-2000:]


def test_utf8_bom_is_not_part_of_the_first_label(tmp_path: Path, tiny_onnx: Path, tiny_images: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\n".join(f"class{i}" for i in range(10)).encode("utf-8-sig"))
    out = tmp_path / "c"
    proc = edgeship("convert", str(tiny_onnx), "-o", str(out), "--labels", str(labels), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = py(["-m", "edgeship.runtime", str(out), str(tiny_images / "img_00.png"), "-k", "10", "--json"])
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    names = {p["label"] for preds in json.loads(run.stdout)["predictions"].values() for p in preds}
    assert names == {f"class{i}" for i in range(10)}, names


# --- case 7: a child's failure says what it was -------------------------------------------------------------


class _Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("cannot pickle this")


def _raise_unpicklable() -> None:
    raise _Unpicklable("the quantizer said no")


def _exit_from_library_code() -> None:
    import sys

    sys.exit(3)


def _die_after_an_error_line() -> None:
    import sys

    sys.stderr.write("F0000 something.cc:12] Check failed: tensor->bytes == 40\n")
    sys.stderr.flush()
    os._exit(1)


def test_child_failures_say_what_they_were() -> None:
    from edgeship._child import ChildWorker
    from edgeship.errors import EdgeshipError, NativeCrashError

    with ChildWorker() as worker:
        with pytest.raises(EdgeshipError, match=r"^calibrate \(TensorFlow\): _Unpicklable: the quantizer said no$"):
            worker.call("calibrate (TensorFlow)", _raise_unpicklable)
        with pytest.raises(EdgeshipError, match=r"^quantize \(TensorFlow\): SystemExit: 3$"):
            worker.call("quantize (TensorFlow)", _exit_from_library_code)
        with pytest.raises(
            NativeCrashError,
            match=r"^stage: the worker process exited \(exit status 1\): F0000 "
            r"something.cc:12\] Check failed: tensor->bytes == 40; nothing",
        ):
            worker.call("stage", _die_after_an_error_line)
        with pytest.raises(EdgeshipError, match=r"^stage: the call cannot be sent to the worker process"):
            worker.call("stage", lambda: None)
        assert worker.call("after", sorted, [2, 1]) == [1, 2]
