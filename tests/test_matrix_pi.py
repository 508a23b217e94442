"""The issue's matrix on emulated Pis: two models x two Pi targets on a two-node Ray cluster on this machine,
each node holding one emulated Pi (reached over ssh, as a real one) as its device resource.

Both emulated Pis (``edgeship emulate``: Debian roots under qemu-user) run the drift checks and benches of two
small real classifiers (tests/conftest.py's tiny model, built as ONNX in two exports: opset 13, and the zoo's old
opset-7 style with its weights as graph inputs) on real shared images, so the matrix, Ray and both emulated Pis
are what the time goes to, not qemu running MobileNetV2 (about a second an image). Skips, with the reason, when
the host cannot emulate or when the Pis' roots are not built yet, unless ``EDGESHIP_REQUIRE_EMULATOR=1`` (CI)
makes that a failure (then it builds them, as tests/test_pi_emulated.py does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import save, tiny_classifier
from tests.test_matrix import two_node_cluster
from tests.test_pi_emulated import REQUIRE, _ca_bundle, _emulator_problem

#: Whether every pytest run runs this test (CI does, with EDGESHIP_REQUIRE_EMULATOR=1); if False, only with
#: EDGESHIP_FLEET_PI=1. Its times on this 2-core machine are in docs/fleet.md ("What has been run"): 3.5 to 4.5 min
#: with the devices' venvs in place, under 7 min when both Pis first build them, all on a loaded machine.
IN_EVERY_CI_RUN = True

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(
        not IN_EVERY_CI_RUN and os.environ.get("EDGESHIP_FLEET_PI") != "1",
        reason="the emulated-Pi matrix runs with EDGESHIP_FLEET_PI=1 (or IN_EVERY_CI_RUN = True in its file)",
    ),
]
ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny-op13", "tiny-op7")
PIS = {"rpi4-aarch64": "pi4", "rpi-armv7": "pi-armv7"}
#: Calibration images, then evaluation images per cell (the next ones by name, held apart from calibration).
CALIB, EVAL = 40, 20
#: The OS release of both Pis: bookworm, where both targets run (rpi-armv7 on trixie refuses: no TFLite runtime).
RELEASE = "bookworm"


@pytest.fixture(scope="module")
def pis() -> Iterator[dict[str, Any]]:
    from edgeship.targets import emulated_pi

    problem = _emulator_problem()
    if problem is None and not REQUIRE:
        missing = [n for n in PIS if not emulated_pi.root_ready(emulated_pi.root_path(emulated_pi.profile(n), RELEASE))]
        problem = f"emulated Pi roots not built ({', '.join(missing)}): edgeship emulate start" if missing else None
    if problem:
        if REQUIRE:
            pytest.fail(f"EDGESHIP_REQUIRE_EMULATOR=1 but {problem}")
        pytest.skip(problem)
    with (
        emulated_pi.emulated("rpi4-aarch64", release=RELEASE, ca_bundle=_ca_bundle()) as a,
        emulated_pi.emulated("rpi-armv7", release=RELEASE, ca_bundle=_ca_bundle()) as b,
    ):
        yield {"rpi4-aarch64": a, "rpi-armv7": b}


def _images(assets: Path, folder: Path) -> tuple[Path, Path]:
    """The first CALIB shared images (by name) to calibrate, the next EVAL to evaluate (links, nothing copied)."""
    files = sorted((assets / "data" / "imagenet-sample").glob("*.jpg"))
    calib, evaluation = folder / "calib", folder / "eval"
    for dest, chosen in ((calib, files[:CALIB]), (evaluation, files[CALIB : CALIB + EVAL])):
        dest.mkdir()
        for f in chosen:
            (dest / f.name).symlink_to(f)
    return calib, evaluation


def _models(folder: Path) -> dict[str, Path]:
    """The two models: the tiny classifier as an opset-13 export and as an old opset-7 one (other weights)."""
    op13 = tiny_classifier(batch=1, seed=0)
    op7 = tiny_classifier(batch=1, seed=1, opset=7, ir_version=3, init_as_inputs=True)
    return {"tiny-op13": save(op13, folder / "tiny_op13.onnx"), "tiny-op7": save(op7, folder / "tiny_op7.onnx")}


def matrix_file(assets: Path, folder: Path, pis: dict[str, Any]) -> Path:
    calib, evaluation = _images(assets, folder)
    text = f'calibration = "{calib}"\nevaluation = "{evaluation}"\n[options]\nnum_calib = {CALIB}\nbench_runs = 3\n'
    for name, path in _models(folder).items():
        text += f'[[model]]\nname = "{name}"\npath = "{path}"\ninput_shape = [1, 3, 32, 32]\n'
    for target in PIS:
        text += f'[[target]]\nname = "{target}"\n'
    for target, device in PIS.items():
        pi = pis[target]
        node = '\nnode = "rack-b"' if target == "rpi-armv7" else ""
        text += f'[[device]]\nname = "{device}"\ntarget = "{target}"\nssh = "{pi.host}"{node}\n'
        text += f'identity = "{pi.identity}"\nknown_hosts = "{pi.known_hosts}"\n'
    path = folder / "matrix.toml"
    path.write_text(text)
    return path


def test_two_models_two_pi_targets_on_two_nodes(pis, assets: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = matrix_file(assets, tmp_path, pis)
    out = tmp_path / "out"
    with two_node_cluster("device:pi4", "device:pi-armv7") as cluster:
        proc = subprocess.run(
            [sys.executable, "-m", "edgeship", "matrix", str(path), "-o", str(out), "--ray-address",
             cluster["address"], "-q"],
            capture_output=True, text=True, env=cluster["env"], cwd=ROOT, timeout=3600,
        )  # fmt: skip
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    doc = json.loads((out / "matrix.json").read_text())
    assert {(c["model"], c["target"]) for c in doc["cells"]} == {(m, t) for m in MODELS for t in PIS}
    for cell in doc["cells"]:
        assert cell["status"] == "done", cell
        assert all((out / cell["folder"] / f).is_file() for f in cell["files"])
        drift = json.loads((out / cell["folder"] / "drift_report.json").read_text())
        runtime = drift["candidate"]["runtime"]
        assert runtime.get("machine") == ("aarch64" if cell["target"] == "rpi4-aarch64" else "armv7l"), runtime
        assert cell["latency_label"], "an emulated device's timings are labelled"
        assert [s["device"] for s in cell["shards"]] == [PIS[cell["target"]]]
    assert {d["status"] for d in doc["devices"].values()} == {"ok"}
    md_links = [link.split(")")[0] for link in (out / "report.md").read_text().split("](")[1:]]
    html_links = re.findall(r'href="([^"]+)"', (out / "report.html").read_text())
    assert len(html_links) == 2 + 4 * 4 and len(md_links) >= 4 * 3, (md_links, html_links)  # models; 4 per cell
    assert all((out / link).is_file() or (out / link).is_dir() for link in md_links + html_links)
    if os.environ.get("EDGESHIP_MATRIX_KEEP"):
        print(out)
