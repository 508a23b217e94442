"""Issue 34, the Python API as users run it: a plain script file in a subprocess, on the tiny model.

Cases: an unbounded calibration iterable is read no further than needed (9); ``q.save()`` into the
calibration folder and ``verify`` on one image are refused (12); a run killed by SIGTERM leaves nothing in
the temporary folder that a later run does not sweep (13); arguments of the wrong type get a clear
TypeError, not an AttributeError from deep inside (``convert(options={})``, ``verify(device='bogus')``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: Each probe prints "<name> <ExceptionType>: <message>" (or "<name> ok"); then the last line is JSON.
PROBES = """\
import json, sys
from pathlib import Path

import numpy as np

import edgeship
from edgeship import ConvertOptions, QuantizeOptions

model, images, out = sys.argv[1:4]
found = {}


def probe(name, call):
    try:
        call()
        found[name] = "ok"
    except Exception as exc:
        found[name] = f"{type(exc).__name__}: {exc}"
        found[name + " is TypeError"] = isinstance(exc, TypeError)


probe("convert(options={})", lambda: edgeship.convert(model, options={}))
conv = edgeship.convert(model, options=ConvertOptions())
conv.save(Path(out) / "conv")
read = 0


def frames():  # a camera stream: it never ends (stopped at 400 so that a failing run ends)
    global read
    rng = np.random.default_rng(0)
    while read < 400:
        read += 1
        yield (rng.random((40, 40, 3)) * 255).astype(np.uint8)


edgeship.quantize(conv, frames(), options=QuantizeOptions(num_calib=20, max_eval=5, method="minmax"))
found["frames read"] = read
q = edgeship.quantize(conv, images, options=QuantizeOptions(num_calib=10, method="minmax"))
probe("save into the calibration folder", lambda: q.save(Path(images) / "quantized"))
probe("verify(device='bogus')", lambda: edgeship.verify(model, q, images, target="x86-host", device="bogus"))
probe("verify on one image", lambda: edgeship.verify(model, q, images, target="x86-host", max_images=1))
print(json.dumps(found))
"""


def _script(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user.py").write_text(text)
    return folder / "user.py"


def _env(tmp: Path) -> dict[str, str]:
    """The script's own temporary folder, so what it leaves there can be seen (and nothing else is swept)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from PIL import Image

    from tests.conftest import save, tiny_classifier

    root = tmp_path_factory.mktemp("api")
    model = save(tiny_classifier(), root / "tiny.onnx")
    images = root / "images"
    images.mkdir()
    rng = __import__("numpy").random.default_rng(3)
    for i in range(14):
        Image.fromarray((rng.random((40, 44, 3)) * 255).astype("uint8")).save(images / f"img_{i:02d}.png")
    script = _script(root / "run", PROBES)
    proc = subprocess.run(
        [sys.executable, str(script), str(model), str(images), str(root / "out")],
        cwd=root / "run", env=_env(root / "tmp"), capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), root


def test_an_unbounded_calibration_iterable_is_read_no_further_than_needed(probed: tuple[dict, Path]) -> None:
    found, _ = probed
    assert found["frames read"] <= 20 + 5, found  # num_calib + max_eval


def test_save_into_the_calibration_folder_is_refused(probed: tuple[dict, Path]) -> None:
    found, root = probed
    said = found["save into the calibration folder"]
    assert said.startswith("InputError") and "calibration folder" in said and "would read its own outputs" in said
    assert not [p for p in (root / "images").iterdir() if p.suffix != ".png"], "something was written there"


def test_verify_on_one_image_gives_no_verdict(probed: tuple[dict, Path]) -> None:
    found, _ = probed
    said = found["verify on one image"]
    assert said.startswith("InputError") and "cannot give a verdict" in said and "at least 2" in said, said


@pytest.mark.parametrize(
    ("call", "names"),
    [("convert(options={})", "must be a ConvertOptions, got dict"), ("verify(device='bogus')", "got 'bogus'")],
)
def test_arguments_of_the_wrong_type_are_a_clear_type_error(probed: tuple[dict, Path], call: str, names: str) -> None:
    found, _ = probed
    assert found[f"{call} is TypeError"] and names in found[call], found[call]


KILLED = """\
import sys

import edgeship
from edgeship import QuantizeOptions
from edgeship.convert import ConvertResult

conv = ConvertResult.load(sys.argv[1])
print("quantizing", flush=True)
edgeship.quantize(conv, sys.argv[2], options=QuantizeOptions(num_calib=10, method="minmax"))
print("done", flush=True)
"""


def _ours(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("edgeship-quantize-", "edgeship-native-")))


def test_an_api_run_killed_by_sigterm_leaves_nothing_a_later_run_does_not_sweep(
    probed: tuple[dict, Path], tmp_path: Path
) -> None:
    _, root = probed
    script, tmp = _script(tmp_path / "run", KILLED), tmp_path / "tmp"
    args = [sys.executable, str(script), str(root / "out" / "conv"), str(root / "images")]
    proc = subprocess.Popen(args, cwd=script.parent, env=_env(tmp), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "quantizing"
    deadline = time.monotonic() + 600
    while not any(n.startswith("edgeship-quantize-") for n in _ours(tmp)) and proc.poll() is None:
        assert time.monotonic() < deadline, "quantize made no work folder"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    left = _ours(tmp)
    assert proc.returncode == -signal.SIGTERM and left, (proc.returncode, left)  # Python's default: no cleanup
    again = subprocess.run(args, cwd=script.parent, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "done" in again.stdout, again.stderr[-3000:]
    assert _ours(tmp) == [], f"{_ours(tmp)} left after a later run (the killed run left {left})"
