"""The README's Python API snippet runs as a plain script: once, as a file and from standard input.

A script without an ``if __name__ == "__main__":`` guard is how users try an API first.
Native work must not re-import it (``multiprocessing``'s spawn did: the script ran twice,
then failed "calibrate (TensorFlow): native code crashed (exit status 1)").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: The README's "### Python API" snippet with its placeholders filled in: the real MobileNetV2,
#: 12 arrays as calibration data (10 calibrate, 2 held apart), verify on 10 of the shared images.
SCRIPT = """\
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import edgeship
from edgeship import ConvertOptions, QuantizeOptions

print("user script started", flush=True)
shared = Path(sys.argv[1])
model = str(shared / "models" / "mobilenetv2-1.0-tf-op13.onnx")
images = shared / "data" / "imagenet-sample"
calibration = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(images.glob("*.jpg"))[:12]]

conv = edgeship.convert(model, options=ConvertOptions())
q = edgeship.quantize(conv, calibration, options=QuantizeOptions(num_calib=10, method="minmax"))
q.model; q.card; q.figures
q.save("out/")
d = edgeship.verify(model, q, images, target="x86-host", device=None, max_images=10)
d.passed; d.failures; d.figures
print("user script done", q.card.precision, flush=True)
"""


def _run(how: str, folder: Path, assets: Path) -> subprocess.CompletedProcess[str]:
    script = folder / "user.py"
    script.write_text(SCRIPT)
    if how == "file":
        return subprocess.run(
            [sys.executable, str(script), str(assets)],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
    with open(script) as stdin:
        return subprocess.run(
            [sys.executable, "-", str(assets)],
            cwd=folder,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["file", "stdin"])
def test_readme_snippet_runs_once_as_a_plain_script(how: str, tmp_path: Path, assets: Path) -> None:
    proc = _run(how, tmp_path, assets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("user script started") == 1, proc.stdout  # never re-imported by a worker
    assert "user script done int8" in proc.stdout
    assert (tmp_path / "out" / "model_int8.tflite").read_bytes()[4:8] == b"TFL3"
