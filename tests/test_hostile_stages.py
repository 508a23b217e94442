"""Issue 34, deploy folders: ownership is proven by a valid record, inputs never sit where deploy
replaces, stages are swapped (never deleted first), and cache keys come from content.

Each case runs ``edgeship deploy`` in a subprocess on the tiny model of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeship._files import sha256_file
from tests.conftest import save, tiny_classifier
from tests.test_hostile_paths import edgeship, one_line, tree

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _bmp_images(folder: Path, count: int = 24, seed: int = 5) -> Path:
    """BMP images: one size for all, so a file rewritten with other pixels keeps its size."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.bmp")
    return folder


def _deploy(model: Path, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return edgeship("deploy", model, "--calib", images, "-o", out, "--target", "x86-host", *extra, timeout=1200)


# ------------------------------------------------------------------ 3. a garbage marker proves nothing
@pytest.mark.parametrize("marker", ["", "garbage", "[]", '{"written": "report.html"}', "null"])
def test_garbage_deploy_marker_does_not_make_a_folder_deploys(tmp_path: Path, marker: str) -> None:
    model = save(tiny_classifier(), tmp_path / "tiny.onnx")
    images = _bmp_images(tmp_path / "imgs", 12)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("<p>my report</p>")
    (out / "deploy.json").write_text('{"mine": true}')
    (out / ".edgeship-deploy.json").write_text(marker)
    before = tree(out)
    one_line(_deploy(model, images, out, "-q"), 1, "deploy did not write")
    one_line(_deploy(model, images, out, "-q", "--force"), 1, "deploy did not write")
    assert tree(out) == before


# ------------------------------------------------------------------ 4. the model inside a folder deploy replaces
def test_deploy_refuses_a_model_inside_its_own_stage_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "convert").mkdir(parents=True)
    model = save(tiny_classifier(), out / "convert" / "model_simplified.onnx")
    (out / ".edgeship-deploy.json").write_text(
        json.dumps({"edgeship": "0", "written": ["convert/model_simplified.onnx", ".edgeship-deploy.json"]})
    )
    images = _bmp_images(tmp_path / "imgs", 12)
    before = tree(out)
    for force in ((), ("--force",)):
        one_line(_deploy(model, images, out, "-q", *force), 1, "which deploy replaces")
    assert tree(out) == before


# ------------------------------------------------------------------ 7, 8. stages swapped; keys from content
@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("deployed")
    model = save(tiny_classifier(), root / "tiny.onnx")
    images = _bmp_images(root / "imgs")
    proc = _deploy(model, images, root / "out", "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, images, root / "out"


def _stage_of(out: Path, path: Path) -> Path:
    """The stage folder (the one with ``.stage.json``) holding ``path``."""
    for folder in [path, *path.parents]:
        if (folder / ".stage.json").is_file():
            return folder
        if folder == out:
            break
    raise AssertionError(f"{path} is in no stage folder")


def _consistent(out: Path) -> None:
    """Every path deploy.json names exists, and its stage's files match the hashes the stage recorded."""
    summary = json.loads((out / "deploy.json").read_text())
    named = [Path(t[k]) for t in summary["targets"].values() for k in ("model", "bundle")]
    for path in named:
        assert path.exists(), f"deploy.json names {path}, which is gone"
        stage = _stage_of(out, path)
        files = json.loads((stage / ".stage.json").read_text())["files"]
        for rel, (size, digest) in files.items():
            f = stage / rel
            assert f.is_file() and f.stat().st_size == size and sha256_file(f) == digest, f"{f} does not match"
        on_disk = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()} - {".stage.json"}
        assert on_disk == set(files), (stage, on_disk ^ set(files))


def test_cache_notices_an_image_rewritten_with_the_same_size_and_mtime(deployed: tuple[Path, Path, Path]) -> None:
    model, images, out = deployed
    victim = images / "img_00.bmp"
    st = victim.stat()
    from PIL import Image

    Image.fromarray(np.full((40, 48, 3), 7, np.uint8)).save(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    proc = _deploy(model, images, out, "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reused = {s["name"]: s["reused"] for s in json.loads((out / "deploy.json").read_text())["stages"]}
    assert reused["convert"] is True, reused
    assert not any(v for k, v in reused.items() if k.startswith("quantize/")), reused
    _consistent(out)


BOUNDARIES = ("quantize/", "verify/", "bundles/", "bench", "report")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_redeploy_killed_at_every_stage_boundary_keeps_every_stage_whole(
    deployed: tuple[Path, Path, Path], sig: signal.Signals
) -> None:
    model, images, out = deployed
    for n, boundary in enumerate(BOUNDARIES):
        shutil.copy(images / "img_01.bmp", images / f"new_{sig}_{n}.bmp")  # the calibration changed: all re-run
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeship", "deploy", str(model), "--calib", str(images), "-o", str(out),
             "--target", "x86-host"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        deadline = time.monotonic() + 900
        for line in proc.stderr:
            if boundary in line.split("]", 1)[-1] or time.monotonic() > deadline:
                break
        proc.send_signal(sig)
        proc.communicate(timeout=300)
        _consistent(out)
    proc = _deploy(model, images, out, "-q")  # and the next run finishes the job
    assert proc.returncode == 0, proc.stderr[-3000:]
    _consistent(out)
    leftovers = [p for p in out.rglob(".*") if ".staging-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
