"""Issue 34, deploy folders: ownership is proven by a valid record, inputs never sit where deploy
replaces, stages are swapped (never deleted first), and cache keys come from content.

Each case runs ``edgeship deploy`` in a subprocess on the tiny model of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
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


def _stages_on_disk(out: Path) -> dict[str, dict]:
    """Every published stage folder (relative name) and its record, each checked whole: its files are exactly
    the ones its record lists, with their sizes and hashes."""
    found = {}
    for mark in out.rglob(".stage.json"):
        rel = mark.parent.relative_to(out).as_posix()
        if ".staging-" in rel or ".old-" in rel:
            continue
        record = json.loads(mark.read_text())
        stage, files = mark.parent, record["files"]
        for name, (size, digest) in files.items():
            f = stage / name
            assert f.is_file() and f.stat().st_size == size and sha256_file(f) == digest, f"{f} does not match"
        on_disk = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()} - {".stage.json"}
        assert on_disk == set(files), (stage, on_disk ^ set(files))
        found[rel] = record
    return found


def _consistent(out: Path) -> None:
    """Every stage is whole; deploy.json, when there, describes exactly the stages on disk (their keys; the
    model it names has the hash it records); a report, when there, names the key of every stage on disk (so
    its verdict is for these files, not for stages a later run replaced)."""
    stages = _stages_on_disk(out)
    summary_file = out / "deploy.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        for s in summary["stages"]:
            if s["key"]:  # "" is a step shared by several stages, kept by none
                assert stages.get(s["name"], {}).get("key") == s["key"], f"deploy.json is stale for {s['name']}"
        for t in summary["targets"].values():
            assert Path(t["model"]).is_file() and Path(t["bundle"]).is_dir(), t
            assert sha256_file(Path(t["model"])) == t["model_sha256"], "deploy.json names a replaced model"
    for report in ("report.html", "report.md"):
        if (out / report).exists():
            text = (out / report).read_text()
            stale = [name for name, r in stages.items() if r["key"][:12] not in text]
            assert not stale, f"{report} does not describe the stages {stale} on disk"


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


#: Where a re-deploy is killed: as each stage starts being built (the ones before it have been swapped in), and
#: as the report starts being written (every stage swapped in). Stages run two at a time (verify and bundles), so
#: a run may swap in a stage the next boundary names: that run is then killed at the boundary after it.
BOUNDARIES = ("quantize/", "verify/", "bundles/", "bench", "report")
#: The killed runs' benchmark: long enough (seconds, not a tenth of one) for the signal to land inside it.
BENCH_RUNS = ("--bench-runs", "5000")


def _killed_at(
    model: Path, images: Path, out: Path, boundaries: tuple[str, ...], sig: signal.Signals
) -> tuple[str | None, bool]:
    """Run deploy until its progress says it starts building one of ``boundaries`` (not reusing it), then send
    ``sig``; return that boundary (None: deploy ended first, having built them all) and whether the run ended by
    the signal. One that finished (exit 0) before a loaded machine delivered the signal tested nothing: the
    caller changes the inputs and tries that boundary again.

    stderr is read on a thread and the process is waited for, never stderr's end: after SIGKILL, a grandchild
    (pip building the wheel) may hold the pipe open for a while, and under load a line may come late.
    """
    cmd = [sys.executable, "-m", "edgeship", "deploy", str(model), "--calib", str(images), "-o", str(out),
           "--target", "x86-host", *BENCH_RUNS]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr or ()] + [lines.put(None)], daemon=True).start()
    seen: list[str] = []
    hit: str | None = None
    try:
        while hit is None and (line := lines.get(timeout=900)) is not None:
            seen.append(line)
            text = line.split("]", 1)[-1].strip()
            hit = next((b for b in boundaries if text.startswith(b) and "reused" not in text), None)
    finally:
        if proc.poll() is None:
            proc.send_signal(sig)
        code = proc.wait(timeout=300)
    if hit is not None and code == 0:
        return hit, False
    expected = (0,) if hit is None else (-sig, 128 + sig)
    assert code in expected, f"the run to be killed at {hit!r} ended {code}: {seen[-3:]}"
    return hit, hit is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_redeploy_killed_at_every_stage_boundary_keeps_every_stage_whole(
    deployed: tuple[Path, Path, Path], sig: signal.Signals
) -> None:
    """The calibration changes once, so every stage from quantize on is rebuilt; each run is killed at the next
    boundary and the next run reuses what the killed one swapped in. After every kill: every stage whole, and no
    deploy.json or report describing stages other than the ones on disk (the first swap retracts them)."""
    model, images, out = deployed
    _consistent(out)
    shutil.copy(images / "img_01.bmp", images / f"new_{sig.name}.bmp")
    left, hits, retries = BOUNDARIES, [], 0
    while left:
        hit, killed = _killed_at(model, images, out, left, sig)
        if hit is None:
            break
        _consistent(out)
        if not killed:  # it finished first: change the calibration again, so the boundary comes back
            retries += 1
            assert retries <= 3, f"three runs finished before the signal at {hit!r}"
            shutil.copy(images / "img_02.bmp", images / f"new_{sig.name}_{retries}.bmp")
            continue
        hits.append(hit)
        _consistent(out)
        if hit not in (BOUNDARIES[0], "report"):  # a stage was swapped, no new report yet: the old one is gone
            assert not (out / "deploy.json").exists() and not (out / "report.html").exists()
        left = left[left.index(hit) + 1 :]
    assert hits[0] == "quantize/" and hits[-1] == "report" and len(hits) >= 4, hits
    proc = _deploy(model, images, out, "-q", *BENCH_RUNS)  # the next run finishes, reusing what the killed ones built
    assert proc.returncode == 0, proc.stderr[-3000:]
    _consistent(out)
    reused = {s["name"]: s["reused"] for s in json.loads((out / "deploy.json").read_text())["stages"] if s["key"]}
    assert all(reused.values()), reused
    leftovers = [p for p in out.rglob(".*") if ".staging-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
