"""Faults and bad input (issue 15): nothing crashes, nothing is silently corrupted, nothing half-published.

Each test is one case of the issue: corrupt models never reach an interpreter in-process,
remote names never reach a shell, unwritable outputs are found before the work, a set of
outputs is published all or nothing, killed runs leave nothing behind for long, and a
model without its card or with a mistyped card is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.cli import main
from edgeship.errors import DeviceError, InputError, OutputExistsError
from tests.sshd import (
    SshServer,
    sshd,  # noqa: F401
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GOOGLE = "mobilenet_v2_1.0_224_quant.tflite"
#: The card of Google's uint8 MobileNetV2 (it ships without one): input (pixel - 128) / 128.
GOOGLE_CARD = {
    "model_file": GOOGLE,
    "precision": "int8",
    "input": {
        "name": "input",
        "shape": [1, 224, 224, 3],
        "dtype": "uint8",
        "layout": "NHWC",
        "scale": 0.0078125,
        "zero_point": 128,
    },
    "output": {"name": "output", "shape": [1, 1001], "dtype": "uint8"},
    "preprocessing": {"resize_shorter": 256, "crop": [224, 224], "mean": [128 / 255] * 3, "std": [128 / 255] * 3},
    "num_classes": 1001,
    "postprocessing": "none",
}
CUTS = (0.1, 0.5, 0.9, 0.99)


def run_child(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1, match: str = "") -> str:
    """Exit ``code`` (never a signal), exactly one line on stderr, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def google(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Google's uint8 model in a folder of its own, with a card beside it."""
    folder = tmp_path_factory.mktemp("google")
    shutil.copyfile(assets / "models" / GOOGLE, folder / GOOGLE)
    (folder / "model_card.json").write_text(json.dumps(GOOGLE_CARD))
    return folder / GOOGLE


@pytest.fixture(scope="module")
def photo(assets: Path) -> Path:
    return assets / "data" / "images" / "parrot.jpg"


def cut(model: Path, fraction: float, dest: Path) -> Path:
    """A copy of ``model`` truncated to ``fraction`` of its size, with the model's card beside it."""
    dest.mkdir(parents=True, exist_ok=True)
    data = model.read_bytes()
    out = dest / model.name
    out.write_bytes(data[: int(len(data) * fraction)])
    for card in ("model_card.json", model.stem + ".card.json"):
        if (model.parent / card).is_file():
            shutil.copyfile(model.parent / card, dest / card)
    return out


# ------------------------------------------------------------------ 1. corrupt models never crash


@pytest.mark.parametrize("fraction", CUTS)
def test_truncated_model_runtime_one_line(google: Path, photo: Path, tmp_path: Path, fraction: float) -> None:
    model = cut(google, fraction, tmp_path)
    proc = run_child("-m", "edgeship.runtime", str(model), str(photo))
    assert_one_line_error(proc, 1, "cannot load TFLite model")


def test_truncated_model_verify_one_line_before_running(google: Path, assets: Path, tmp_path: Path) -> None:
    model = cut(google, 0.5, tmp_path / "m")
    proc = run_child(
        "-m",
        "edgeship",
        "verify",
        str(assets / "models" / "mobilenetv2-1.0-tf-op13.onnx"),
        str(model),
        "--images",
        str(assets / "data" / "imagenet-sample"),
        "--target",
        "android-nnapi",
        "-r",
        str(tmp_path / "d.json"),
        "-q",
    )
    assert_one_line_error(proc, 1, "truncated or corrupt")
    assert not (tmp_path / "d.json").exists()


def test_intact_model_passes_the_check_and_it_is_cached(
    google: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeship.runtime import model_check

    monkeypatch.setenv("EDGESHIP_CACHE", str(tmp_path / "cache"))
    bad = cut(google, 0.9, tmp_path / "bad")
    verdicts = model_check.check_model_files([google, bad])
    assert verdicts[google] is None
    assert verdicts[bad] is not None and "lies outside the" in verdicts[bad] and "truncated or corrupt" in verdicts[bad]
    # The flatbuffer walk refused the cut file in-process; the intact one went through the child and is cached.
    assert len(list((tmp_path / "cache" / "model-checks").glob("*.json"))) == 1

    def no_child(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a cached verdict must not start a child")

    monkeypatch.setattr(model_check.subprocess, "run", no_child)
    start = time.perf_counter()
    model_check.check_model_file(google)
    with pytest.raises(InputError, match="truncated or corrupt"):
        model_check.check_model_file(bad)
    assert time.perf_counter() - start < 1.0


def test_checking_child_pins_a_crash_on_its_model(google: Path, tmp_path: Path) -> None:
    """Behind the flatbuffer walk: a crash in the child is the model's, and the others still get checked."""
    from edgeship.runtime import model_check
    from edgeship.runtime.interpreter import pick_backend

    bad = cut(google, 0.9, tmp_path / "bad")
    verdicts = model_check._run_checker([google, bad, google], pick_backend())
    assert verdicts == {0: "ok", 1: "crash: the interpreter crashed on it (SIGSEGV)", 2: "ok"}


def test_model_header_is_checked_in_process(tmp_path: Path) -> None:
    from edgeship.runtime.model_check import check_model_file

    for name, data, match in [
        ("empty.tflite", b"", "too small"),
        ("text.tflite", b"hello world, not a model", "no TFL3 identifier"),
        ("root.tflite", b"\xff\xff\x00\x00TFL3" + b"\0" * 40, "root table offset"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=match):
            check_model_file(tmp_path / name)


# ------------------------------------------------------------------ 2. bundle refuses broken models


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_bundle_refuses_broken_models(google: Path, tmp_path: Path, kind: str) -> None:
    if kind == "truncated":
        model = cut(google, 0.5, tmp_path / "m")
    else:
        model = cut(google, 1.0, tmp_path / "m")
        model.write_bytes(np.random.default_rng(0).integers(0, 256, 500_000, dtype=np.uint8).tobytes())
    proc = run_child("-m", "edgeship", "bundle", str(model), "--target", "android-nnapi", "-o", str(tmp_path / "b"))
    assert_one_line_error(proc, 1, "cannot load TFLite model")
    assert not (tmp_path / "b").exists()


def test_bundle_still_ships_a_good_model(google: Path, tmp_path: Path) -> None:
    assert main(["bundle", str(google), "--target", "android-nnapi", "-o", str(tmp_path / "b"), "-q"]) == 0
    assert (tmp_path / "b" / GOOGLE).stat().st_size >= google.stat().st_size


# ------------------------------------------------------------------ 3. no shell injection through scp

EVIL = "m$(touch pwned).tflite"


def test_scp_paths_are_quoted_or_refused() -> None:
    from edgeship.targets.ssh import SshTarget

    t = SshTarget("127.0.0.1", user="pi")
    assert t.scp_path("/home/pi/.cache/job-1/model.tflite") == "pi@127.0.0.1:/home/pi/.cache/job-1/model.tflite"
    for bad in (f"/tmp/{EVIL}", "/tmp/a b", "/tmp/`id`", "/tmp/x;rm -rf ~", "/tmp/'q'"):
        with pytest.raises(DeviceError, match="holds characters"):
            t.scp_path(bad)


@pytest.fixture()
def legacy_scp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scp edgeship starts speaks the old protocol, where remote paths go through a shell."""
    real = shutil.which("scp")
    if real is None:
        pytest.skip("scp not installed (apt-get install openssh-client)")
    bindir = tmp_path / "legacy-bin"
    bindir.mkdir()
    (bindir / "scp").write_text(f'#!/bin/sh\nexec {real} -O "$@"\n')
    (bindir / "scp").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


#: A bench.json row as the device's benchmark writes it (figures made up: the copy is what is tested).
_BENCH_ROW = {
    "threads": 1,
    "size_bytes": 7,
    "init_ms": 1.0,
    "first_ms": 1.0,
    **dict.fromkeys(("mean_ms", "p50_ms", "p90_ms", "p99_ms"), 1.0),
    "peak_rss_mb": 1.0,
    "runtime": {"interpreter": "tflite_runtime", "interpreter_version": "2.14.0", "delegate": "xnnpack"},
    "ratio_p50_to_first": 1.0,
}


def _pwned(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.rglob("pwned*")]


def test_legacy_scp_runs_nothing_from_model_names(
    sshd: SshServer,
    legacy_scp: None,
    tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``bench --host`` and the drift check's copy, with a hostile model name, over ``scp -O``."""
    from edgeship.runtime.card import ModelCard
    from edgeship.targets import load_target, remote, ssh
    from edgeship.verify.drift import stage_bundle

    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    model = local / EVIL
    model.write_bytes(b"not run")

    class Device(ssh.SshDevice):
        """The real ssh/scp transport; the venv and the remote module are stand-ins."""

        def ensure_venv(self, *_a: Any, **_k: Any) -> str:
            return "python3"

        def run_module(self, python: str, module: str, args: Any, *, timeout: float) -> Any:
            names = [a for a in args if a.endswith(".tflite")]
            doc = {"results": [{**_BENCH_ROW, "model": Path(n).name, "path": n} for n in names]}
            out = args[args.index("-o") + 1]
            return self.run(["sh", "-c", 'printf %s "$1" > "$2"', "sh", json.dumps(doc), out])

        def probe(self) -> dict[str, str]:
            return {"machine": os.uname().machine}

    import edgeship.wheel

    monkeypatch.setattr(edgeship.wheel, "build_edgeship_wheel", lambda _dest: tmp_path / "edgeship-0-py3-none-any.whl")
    device = Device(sshd.target(workdir=str(remote_dir)))
    target = load_target("x86-host")
    monkeypatch.setattr(target.__class__, "pip_requirements", lambda self: [], raising=False)
    doc = remote.ssh_benchmark(device, target, [model], [])
    assert not _pwned(remote_dir, Path.home(), tmp_path), "a file name ran as a command on the device"
    assert doc.results[0].model == EVIL and doc.results[0].path == str(model)
    # The drift check's staged bundle: fixed names inside, pushed and pulled back intact.
    card = ModelCard.from_dict({**GOOGLE_CARD, "model_file": EVIL, "labels_file": "l$(touch pwned2).txt"})
    (local / "l$(touch pwned2).txt").write_text("a\n")
    bundle = tmp_path / "bundle"
    stage_bundle(bundle, model.read_bytes(), card, (local / "l$(touch pwned2).txt").read_bytes())
    assert sorted(p.name for p in bundle.iterdir()) == ["labels.txt", "model.tflite", "model_card.json"]
    job = ssh.new_job(device)
    device.push(bundle, f"{job}/bundle")
    device.pull(f"{job}/bundle/model.tflite", tmp_path / "back.tflite")
    assert (tmp_path / "back.tflite").read_bytes() == b"not run"
    assert not _pwned(remote_dir, Path.home(), tmp_path), "a file name ran as a command on the device"


def test_adb_model_name_is_fixed(tmp_path: Path) -> None:
    """``bench --adb``: the model goes to a fixed name; the shell line is quoted argument by argument."""
    import shlex

    from edgeship.targets import adb

    model, binary = tmp_path / EVIL, tmp_path / "benchmark_model"
    model.write_bytes(b"m")
    binary.write_bytes(b"b")
    calls: list[tuple[str, ...]] = []

    class Device(adb.AdbDevice):
        def _run(self, args: list[str], *, timeout: float | None = None) -> Any:
            calls.append(tuple(args))
            out = (
                "INFO: Inference timings in us: Init: 3200, First inference: 13117, Warmup (avg): 8903.7, "
                "Inference (avg): 8892.9\n"
                if args[0] == "shell" and "--graph=" in args[1]
                else ""
            )
            return subprocess.CompletedProcess(args, 0, out, "")

        def check(self) -> dict[str, str]:
            return {"abi": "arm64-v8a"}

    adb.run_benchmark(Device("serial"), binary, model, ["--num_threads=1"])
    pushed = [c[2] for c in calls if c[0] == "push"]
    assert pushed == [f"{adb.REMOTE_DIR}/benchmark_model", f"{adb.REMOTE_DIR}/model.tflite"]
    shell_lines = [c[1] for c in calls if c[0] == "shell"]
    assert all("$(" not in line for line in shell_lines), shell_lines
    assert shlex.split(shell_lines[-1])[1] == f"--graph={adb.REMOTE_DIR}/model.tflite"


# ------------------------------------------------------------------ 7. one line, found before the work


def _unwritable(tmp_path: Path) -> Path:
    """An existing folder this process cannot write (root ignores permissions: use /sys then)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if os.access("/sys", os.W_OK) and not _sys_read_only():
        pytest.skip("running as root with a writable /sys: no unwritable folder to test with")
    return Path("/sys")


def _sys_read_only() -> bool:
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir="/sys")
    except OSError:
        return True
    os.close(fd)
    os.unlink(name)
    return False


@pytest.fixture()
def no_convert(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure the conversion never starts: output problems must be found before it."""
    import edgeship.convert.onnx_model as onnx_model

    def boom(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(onnx_model, "load_model", boom)


@pytest.mark.parametrize("where", ["unwritable", "unwritable_parent", "file_parent"])
def test_bad_output_folder_found_before_convert(
    where: str, tiny_onnx: Path, tmp_path: Path, no_convert: None, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "unwritable":
        out = _unwritable(tmp_path)
    elif where == "unwritable_parent":
        out = _unwritable(tmp_path) / "new" / "out"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub"
    code = main(["convert", str(tiny_onnx), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert ("cannot write" in err) or ("is a file, not a folder" in err), err


def test_json_folder_is_a_usage_error_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["targets", "list", "--json", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("is a folder; give a file path") and len(err.splitlines()) == 1


def test_json_in_unwritable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["targets", "list", "--json", str(_unwritable(tmp_path) / "x" / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot write" in err and len(err.splitlines()) == 1, err


def test_verify_report_folder_found_before_running(
    tmp_path: Path, tiny_onnx: Path, google: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edgeship.verify.drift as drift

    monkeypatch.setattr(drift, "verify", lambda *a, **k: pytest.fail("verify ran before the report path was checked"))
    (tmp_path / "imgs").mkdir()
    for report in (tmp_path, tmp_path / "file.json" / "r.json"):
        (tmp_path / "file.json").write_text("{}")
        code = main(
            [
                "verify",
                str(tiny_onnx),
                str(google),
                "--images",
                str(tmp_path / "imgs"),
                "--target",
                "android-nnapi",
                "-r",
                str(report),
                "--force",
                "-q",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1, err
        assert "is a folder" in err or "is a file, not a folder" in err, err


def test_deploy_stage_with_deleted_or_truncated_file_is_rebuilt(tmp_path: Path) -> None:
    from edgeship.deploy import _Stages

    builds: list[str] = []

    def build(d: Path) -> None:
        d.mkdir(parents=True)
        (d / "model.tflite").write_bytes(b"x" * 1000)
        (d / "report.json").write_text("{}")
        builds.append(d.name)

    stages = _Stages(tmp_path, lambda *a, **k: None)
    for _ in range(2):
        stages.run("quantize", {"k": 1}, build)
    assert len(builds) == 1 and [r.reused for r in stages.records] == [False, True]
    (tmp_path / "quantize" / "report.json").unlink()
    stages.run("quantize", {"k": 1}, build)
    (tmp_path / "quantize" / "model.tflite").write_bytes(b"x" * 500)  # a truncated cached model
    stages.run("quantize", {"k": 1}, build)
    (tmp_path / "quantize" / ".stage.json").write_text("{not json")
    stages.run("quantize", {"k": 1}, build)
    assert len(builds) == 4 and [r.reused for r in stages.records] == [False, True, False, False, False]
    assert (tmp_path / "quantize" / "model.tflite").stat().st_size == 1000


# ------------------------------------------------------------------ 8. publishing is all or nothing

CONVERT_SET = ["convert_report.json", "model_card.json", "model_float32.tflite", "model_simplified.onnx", "saved_model"]


def _old_set(out: Path) -> None:
    out.mkdir()
    for name in CONVERT_SET[:-1]:
        (out / name).write_text("old")
    (out / "saved_model").mkdir()
    (out / "saved_model" / "saved_model.pb").write_text("old")
    (out / "keep.txt").write_text("not ours")


def _new_set(stage: Path) -> None:
    for name in CONVERT_SET[:-1]:
        (stage / name).write_text("new")
    (stage / "saved_model").mkdir()
    (stage / "saved_model" / "saved_model.pb").write_text("new")


def _contents(out: Path) -> set[str]:
    return {
        (out / n).read_text() if n != "saved_model" else (out / n / "saved_model.pb").read_text() for n in CONVERT_SET
    }


def test_read_only_saved_model_is_replaced_with_the_set(tmp_path: Path) -> None:
    from edgeship._io import staged_output

    out = tmp_path / "conv"
    _old_set(out)
    (out / "saved_model").chmod(0o555)
    with staged_output(out, CONVERT_SET, force=True) as stage:
        _new_set(stage)
    assert _contents(out) == {"new"} and (out / "keep.txt").read_text() == "not ours"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["conv"]


@pytest.mark.parametrize("fail_on", ["saved_model", "model_card.json"])
def test_failed_publish_keeps_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str) -> None:
    """The last (or a middle) move fails, as with a read-only saved_model as a normal user: nothing changes."""
    import edgeship._io as io

    out = tmp_path / "conv"
    _old_set(out)
    if os.geteuid() != 0:
        (out / "saved_model").chmod(0o555)
    real = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(dst) == out / fail_on and ".staging-" in str(src):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)

    monkeypatch.setattr(io.os, "rename", rename)
    with (
        pytest.raises(InputError, match="nothing was replaced"),
        io.staged_output(out, CONVERT_SET, force=True) as stage,
    ):
        _new_set(stage)
    monkeypatch.undo()
    assert _contents(out) == {"old"} and (out / "keep.txt").read_text() == "not ours"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in tmp_path.iterdir()] == ["conv"]


# ------------------------------------------------------------------ 9. leftovers of killed runs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_dead_runs_is_cleaned_live_ones_kept(tmp_path: Path) -> None:
    from edgeship._io import LEGACY_STALE_AFTER, owner_tag, staged_output

    out = tmp_path / "conv"
    _old_set(out)
    dead, alive = owner_tag(_dead_pid()), owner_tag(os.getppid())
    stale = tmp_path / f".conv.staging-{dead}-abcd1234"
    live = tmp_path / f".conv.staging-{alive}-efgh5678"
    other_host = tmp_path / f".conv.staging-{dead.split('.')[0]}.00000000-ijkl9012"  # a shared disk: not ours
    legacy = tmp_path / ".conv.staging-x1y2z3w4"  # named before owners were: removed only when old
    old_legacy = tmp_path / ".conv.staging-a1b2c3d4"
    for d in (stale, live, other_host, legacy, old_legacy):
        (d / "saved_model").mkdir(parents=True)
    long_ago = time.time() - LEGACY_STALE_AFTER - 60
    os.utime(old_legacy, (long_ago, long_ago))
    # A swap killed midway: model_card.json moved aside, its replacement never arrived.
    os.rename(out / "model_card.json", out / f".model_card.json.old-{dead}-0a1b2c3d")
    (out / f".convert_report.json.old-{dead}-0a1b2c3d").write_text("older")
    with staged_output(out, ["other.txt"], force=False) as stage:
        (stage / "other.txt").write_text("x")
    assert not stale.exists() and not old_legacy.exists()
    assert live.exists() and other_host.exists() and legacy.exists()
    assert (out / "model_card.json").read_text() == "old" and (out / "convert_report.json").read_text() == "old"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_sigkilled_run_leaves_staging_that_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from edgeship._io import staged_output\n"
        f"with staged_output({str(out)!r}, ['a'], force=False) as stage:\n"
        "    (stage / 'a').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert run_child("-c", code).returncode == -9
    assert len(list(tmp_path.glob(".out.staging-*"))) == 1
    from edgeship._io import staged_output

    with staged_output(out, ["a"], force=False) as stage:
        (stage / "a").write_text("whole")
    assert (out / "a").read_text() == "whole" and not list(tmp_path.glob(".out.staging-*"))


# ------------------------------------------------------------------ 10. cards, quiet, messages, mismatch


def test_model_without_card_needs_explicit_preprocessing(google: Path, photo: Path, tmp_path: Path) -> None:
    from edgeship.runtime import Classifier, Preprocessing

    bare = tmp_path / "bare.tflite"
    shutil.copyfile(google, bare)
    with pytest.raises(InputError, match="no model card beside"):
        Classifier.load(bare)
    prep = Preprocessing(resize_shorter=256, crop=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert Classifier.load(bare, preprocessing=prep).card.preprocessing == prep
    assert_one_line_error(run_child("-m", "edgeship.runtime", str(bare), str(photo)), 1, "no model card beside")
    (tmp_path / "prep.json").write_text(json.dumps(prep.to_dict()))
    proc = run_child("-m", "edgeship.runtime", str(bare), str(photo), "--preprocess", str(tmp_path / "prep.json"))
    assert proc.returncode == 0 and "parrot.jpg" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("num_classes", "lots", "num_classes"),
        ("input", {**GOOGLE_CARD["input"], "shape": [1, "224", 224, 3]}, "input.shape"),
        ("output", {**GOOGLE_CARD["output"], "shape": [1, 1001.5]}, "output.shape"),
        ("preprocessing", {**GOOGLE_CARD["preprocessing"], "crop": "224"}, "preprocessing.crop"),
        ("preprocessing", {**GOOGLE_CARD["preprocessing"], "mean": [0.5, "x", 0.5]}, "preprocessing.mean"),
        ("model_file", 7, "model_file"),
        ("labels_file", ["a"], "labels_file"),
        ("notes", "hello", "notes"),
        ("input", [1, 2], "input"),
    ],
)
def test_card_types_are_checked(google: Path, photo: Path, tmp_path: Path, key: str, value: Any, named: str) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    shutil.copyfile(google, folder / GOOGLE)
    (folder / "model_card.json").write_text(json.dumps({**GOOGLE_CARD, key: value}))
    err = assert_one_line_error(run_child("-m", "edgeship.runtime", str(folder), str(photo)), 1, "is invalid")
    assert f"invalid: {named} must be" in err, err


def test_quiet_runtime_prints_nothing_but_results(google: Path, photo: Path) -> None:
    proc = run_child("-m", "edgeship.runtime", str(google.parent), str(photo), "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = run_child("-m", "edgeship.runtime", str(google.parent), str(photo))
    assert "XNNPACK delegate" not in proc.stderr, proc.stderr


def test_force_hint_is_spelled_for_cli_and_api(
    google: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeship.targets import load_target
    from edgeship.targets.bundle import bundle

    out = tmp_path / "b"
    bundle(google, load_target("android-nnapi"), out)
    with pytest.raises(OutputExistsError) as info:
        bundle(google, load_target("android-nnapi"), out)
    assert "pass force=True to overwrite" in str(info.value) and "--force" not in str(info.value)
    assert main(["bundle", str(google), "--target", "android-nnapi", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pass --force to overwrite" in err and "force=True" not in err


def test_verify_float_model_on_int8_target_is_a_mismatch_before_running(
    tmp_path: Path, google: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import edgeship.runtime.candidate as device_side
    import edgeship.verify.drift as drift

    monkeypatch.setattr(device_side, "candidate_outputs", lambda *a, **k: pytest.fail("the candidate ran"))
    monkeypatch.setattr(drift, "reference_outputs", lambda *a, **k: pytest.fail("the reference ran"))
    folder = tmp_path / "float"
    folder.mkdir()
    shutil.copyfile(google, folder / GOOGLE)
    (folder / "model_card.json").write_text(json.dumps({**GOOGLE_CARD, "precision": "float32"}))
    (tmp_path / "imgs").mkdir()
    code = main(
        [
            "verify",
            str(google),
            str(folder / GOOGLE),
            "--images",
            str(tmp_path / "imgs"),
            "--target",
            "x86-host",
            "-r",
            str(tmp_path / "d.json"),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 4, err
    assert "target x86-host runs int8 models, this one is float32" in err and len(err.splitlines()) == 1
    from edgeship.errors import EXIT_CODES

    assert EXIT_CODES["model_target_mismatch"] == 4
