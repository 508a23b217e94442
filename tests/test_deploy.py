"""deploy end to end on the tiny model: bundles per target, caching, report checked in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeship.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TARGETS = ["--target", "x86-host", "--target", "rpi4-aarch64", "--target", "android-arm64-cpu"]
TEXT = {"capture_output": True, "text": True}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path, calib_images: Path) -> tuple[Path, Path, float]:
    root = tmp_path_factory.mktemp("deploy")
    calib = root / "calib"
    shutil.copytree(calib_images, calib)
    out = root / "out"
    start = time.perf_counter()
    code = main(
        [
            "deploy",
            str(tiny_onnx),
            "--calib",
            str(calib),
            "-o",
            str(out),
            "--num-calib",
            "20",
            "--bench-runs",
            "20",
            "--bench-threads",
            "1",
            "-q",
            *TARGETS,
        ]
    )
    assert code == 0
    return out, calib, time.perf_counter() - start


def test_deploy_outputs(deployed: tuple[Path, Path, float]) -> None:
    out, _, _ = deployed
    summary = json.loads((out / "deploy.json").read_text())
    assert set(summary["targets"]) == {"x86-host", "rpi4-aarch64", "android-arm64-cpu"}
    for _name, t in summary["targets"].items():
        assert t["passed"] and (Path(t["bundle"]) / "model_card.json").is_file()
    # One int8 model shared by the two int8-I/O targets; the Android app's client (MediaPipe) gets uint8 I/O.
    assert [s["name"] for s in summary["stages"] if s["name"].startswith("quantize/")] == [
        "quantize/int8-io-int8-per-channel",
        "quantize/int8-io-uint8-per-channel",
    ]
    # ... which is the calibrated int8 model with its interface rewritten, not a second calibration.
    uint8 = json.loads((out / "quantize" / "int8-io-uint8-per-channel" / "quant_report.json").read_text())
    int8 = json.loads((out / "quantize" / "int8-io-int8-per-channel" / "quant_report.json").read_text())
    assert uint8["interface"] == {"rewritten_from": "int8", "to": "uint8", "exact": True}
    # A QUANTIZE op at the input; the scores stay float (float logits).
    assert uint8["ranges"] == int8["ranges"] and uint8["ops"]["QUANTIZE"] == int8["ops"].get("QUANTIZE", 0) + 1
    assert uint8["runs_on"]["float_logits"] and int8["runs_on"]["float_logits"]
    names = [s["name"] for s in summary["stages"]]  # the float reference once, computed while onnx2tf ran
    assert names.count("verify: float reference (onnxruntime, during convert)") == 1, names
    assert "verify: float reference (onnxruntime)" not in names, names
    client = summary["targets"]["android-arm64-cpu"]["client_check"]
    assert client["ok"] and client["runtime_agreement"] == 1.0
    assert summary["targets"]["x86-host"]["client_check"] is None
    assert (out / "bundles" / "rpi4-aarch64" / "requirements.txt").is_file()
    assert (out / "bundles" / "android-arm64-cpu" / "README.md").read_text().count("benchmark_model") >= 2
    for png in ("latency.png", "sizes.png"):
        assert (out / "report" / png).stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "Accuracy drift per target" in md and "PASS" in md and "Per-layer error" in md
    assert "Through the app's own library" in md and "warpPerspective" in md
    for name in ("x86-host", "rpi4-aarch64"):  # where quantize timed the speed decisions (no --host: here)
        assert f"{name}: quantize's speed decisions timed on this machine (x86_64, " in md, md


def test_rerun_reuses_every_stage(deployed: tuple[Path, Path, float], tiny_onnx: Path) -> None:
    out, calib, first = deployed
    start = time.perf_counter()
    assert (
        main(
            [
                "deploy",
                str(tiny_onnx),
                "--calib",
                str(calib),
                "-o",
                str(out),
                "--num-calib",
                "20",
                "--bench-runs",
                "20",
                "--bench-threads",
                "1",
                "-q",
                *TARGETS,
            ]
        )
        == 0
    )
    again = time.perf_counter() - start
    stages = json.loads((out / "deploy.json").read_text())["stages"]
    assert all(s["reused"] for s in stages), stages
    assert again < first / 3, (again, first)


def test_summary_says_which_verdicts_are_within_noise(deployed: tuple[Path, Path, float], tiny_onnx: Path) -> None:
    """Issue 33, point 3: a verdict whose budget line has its limit inside its 95 % interval says so in the
    terminal summary (the CLI in its own process, every stage reused), and only such a verdict."""
    out, calib, _ = deployed
    cmd = [sys.executable, "-m", "edgeship", "deploy", str(tiny_onnx), "--calib", str(calib), "-o", str(out)]
    run = subprocess.run([*cmd, "--num-calib", "20", "--bench-runs", "20", "--bench-threads", "1", *TARGETS], **TEXT)
    assert run.returncode == 0, run.stderr
    targets = json.loads((out / "deploy.json").read_text())["targets"]
    noisy = {(n, c["metric"]) for n, t in targets.items() for c in t["budget"] if c["within_noise"]}
    verdict = re.compile(r"^(\S+) +(?:PASS|FAIL)[^\n]*\n((?: +within noise[^\n]*\n)*)", re.M)
    said = set()
    for m in verdict.finditer(run.stdout):
        said |= {(m.group(1), metric) for metric in re.findall(r"within noise of its budget: (\S+)", m.group(2))}
    assert len(verdict.findall(run.stdout)) == len(targets) and said == noisy, run.stdout
    assert noisy, "the tiny model's 20-image verdicts are expected to sit within noise of 95 %"


def test_changed_calibration_reruns_from_quantize(deployed: tuple[Path, Path, float], tiny_onnx: Path) -> None:
    out, calib, _ = deployed
    shutil.copy(next(calib.glob("img_00.*")), calib / "zz_extra.png")
    assert (
        main(
            [
                "deploy",
                str(tiny_onnx),
                "--calib",
                str(calib),
                "-o",
                str(out),
                "--num-calib",
                "20",
                "--bench-runs",
                "20",
                "--bench-threads",
                "1",
                "-q",
                *TARGETS,
            ]
        )
        == 0
    )
    reused = {s["name"]: s["reused"] for s in json.loads((out / "deploy.json").read_text())["stages"]}
    assert reused["convert"] is True
    assert reused["quantize/int8-io-int8-per-channel"] is False


def test_changed_code_reruns_every_stage(
    deployed: tuple[Path, Path, float], tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeship import _cache_keys

    assert _cache_keys.code_fingerprint() == _cache_keys.code_fingerprint()
    assert len(_cache_keys.code_fingerprint()) == 16
    out, calib, _ = deployed
    monkeypatch.setattr(_cache_keys, "code_fingerprint", lambda: "0" * 16)  # as after editing edgeship's code
    assert (
        main(
            [
                "deploy",
                str(tiny_onnx),
                "--calib",
                str(calib),
                "-o",
                str(out),
                "--num-calib",
                "20",
                "--bench-runs",
                "20",
                "--bench-threads",
                "1",
                "-q",
                *TARGETS,
            ]
        )
        == 0
    )
    stages = json.loads((out / "deploy.json").read_text())["stages"]
    assert not any(s["reused"] for s in stages), stages


def test_over_budget_target_exits_3_with_report(
    tmp_path: Path, tiny_onnx: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = (Path(__file__).parents[1] / "targets" / "x86-host.toml").read_text()
    strict = tmp_path / "strict.toml"
    strict.write_text(
        host.replace('name = "x86-host"', 'name = "strict"').replace("min_sqnr_db = 18.0", "min_sqnr_db = 90.0")
    )
    out = tmp_path / "out"
    code = main(
        [
            "deploy",
            str(tiny_onnx),
            "--calib",
            str(calib_images),
            "-o",
            str(out),
            "--num-calib",
            "20",
            "--bench-runs",
            "5",
            "--bench-threads",
            "1",
            "--target",
            "x86-host",
            "--target",
            str(strict),
            "-q",
        ]
    )
    assert code == 3
    assert "over the drift budget: strict" in capsys.readouterr().err
    summary = json.loads((out / "deploy.json").read_text())
    assert summary["targets"]["x86-host"]["passed"] and not summary["targets"]["strict"]["passed"]
    assert "FAIL" in (out / "report.md").read_text() and (out / "report.html").is_file()


def test_non_deploy_folder_is_not_touched(
    tmp_path: Path, tiny_onnx: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "precious.txt").write_text("keep")
    assert (
        main(
            ["deploy", str(tiny_onnx), "--calib", str(calib_images), "-o", str(tmp_path), "--target", "x86-host", "-q"]
        )
        == 1
    )
    assert "not an edgeship deploy folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_unknown_target_fails_fast(
    tmp_path: Path, tiny_onnx: Path, calib_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "deploy",
                str(tiny_onnx),
                "--calib",
                str(calib_images),
                "-o",
                str(tmp_path / "o"),
                "--target",
                "pi-zero",
                "-q",
            ]
        )
        == 1
    )
    assert "valid targets" in capsys.readouterr().err and not (tmp_path / "o").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(deployed: tuple[Path, Path, float], tmp_path: Path) -> None:
    out, _, _ = deployed
    html = out / "report.html"
    assert "src='report/" not in html.read_text()  # self-contained: images are embedded
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "edgeship deploy report" in proc.stdout
    loaded = proc.stdout.split('data-images-loaded="', 1)[1].split('"', 1)[0]
    done, total = map(int, loaded.split("/"))
    assert total >= 4 and done == total, loaded
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
