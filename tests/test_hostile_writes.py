"""Issue 34, data loss: one write rule, only regular files, implicit inputs never written, deploy folder ownership.

Every case runs the command in a subprocess, as a user would: a device node, a FIFO, a dangling
link or a file the command reads (the card beside a model, a target profile) is refused with one
line, ``--force`` or not, and is still there, unchanged, afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile_paths import edgeship, one_line, tree

ROOT = Path(__file__).parents[1]


@pytest.fixture()
def specials(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a character device (when allowed: root) and a dangling symbolic link."""
    found = {"fifo": tmp_path / "fifo", "dangling": tmp_path / "dangling"}
    os.mkfifo(found["fifo"])
    os.symlink(tmp_path / "nowhere", found["dangling"])
    try:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        found["chardev"] = tmp_path / "null"
    except PermissionError:
        pass
    return found


def _kind(path: Path) -> int:
    return stat.S_IFMT(os.lstat(path).st_mode)


# ------------------------------------------------------------------ 1, 6. devices, FIFOs, dangling links
@pytest.mark.parametrize("flag", ["--json", "bench-o", "verify-r"])
def test_special_files_are_never_replaced(flag: str, specials: dict[str, Path], tiny_bundle: Path) -> None:
    for name, path in specials.items():
        before = _kind(path)
        if flag == "--json":
            proc = edgeship("targets", "show", "x86-host", "--json", path, "--force")
            code = 2
        elif flag == "bench-o":
            proc = edgeship("bench", tiny_bundle / "model_float32.tflite", "-o", path, "--force", "--runs", "2", "-q")
            code = 1
        else:
            proc = edgeship(
                "verify", tiny_bundle / "model_float32.tflite", tiny_bundle / "model_float32.tflite",
                "--images", tiny_bundle, "--target", "x86-host", "-r", path, "--force", "-q",
            )  # fmt: skip
            code = 1
        err = one_line(proc, code)
        assert "regular files" in err or "dangling symbolic link" in err, (name, err)
        assert _kind(path) == before, f"{name} was replaced by {flag}"


def closed_stdout(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with stdout a pipe whose reader is already gone (``| head`` that has exited)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    finally:
        os.close(w)


def test_json_to_stdout_closed_early_is_quiet() -> None:
    """``--json - | head``: a closed pipe ends the command without a traceback."""
    proc = closed_stdout([sys.executable, "-m", "edgeship", "targets", "list", "--json", "-"])
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


# ------------------------------------------------------------------ 2. implicit inputs
def float_target(tmp_path: Path) -> Path:
    """The x86-host profile for float32 models (the tiny converted model is float32)."""
    path = tmp_path / "float-host.toml"
    text = (ROOT / "targets" / "x86-host.toml").read_text()
    text = text.replace('precision = "int8"', 'precision = "float32"').replace(
        'io_dtype = "int8"', 'io_dtype = "float32"'
    )
    path.write_text(text.replace("int8_only = true", "int8_only = false"))
    return path


def _model_folder(tiny_bundle: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(tiny_bundle, folder)
    card = json.loads((folder / "model_card.json").read_text())
    (folder / "model_float32.card.json").write_text(json.dumps(card))
    return folder


def test_verify_report_never_replaces_the_models_card(tiny_bundle: Path, tmp_path: Path) -> None:
    m = _model_folder(tiny_bundle, tmp_path)
    before = tree(m)
    for card in ("model_float32.card.json", "model_card.json"):
        proc = edgeship(
            "verify", m / "model_float32.tflite", m / "model_float32.tflite", "--images", tiny_bundle,
            "--target", "x86-host", "-r", m / card, "--force", "-q",
        )  # fmt: skip
        one_line(proc, 1, "which this command reads")
    assert tree(m) == before


def test_bundle_json_never_replaces_the_models_card(tiny_bundle: Path, tmp_path: Path) -> None:
    m = _model_folder(tiny_bundle, tmp_path)
    before = tree(m)
    proc = edgeship(
        "bundle", m / "model_float32.tflite", "--target", "x86-host", "-o", tmp_path / "b",
        "--json", m / "model_float32.card.json", "--force", "-q",
    )  # fmt: skip
    one_line(proc, 2, "which this command reads")
    assert tree(m) == before and not (tmp_path / "b").exists()


def test_bundle_into_the_folder_of_its_own_model(tiny_bundle: Path, tmp_path: Path) -> None:
    m = _model_folder(tiny_bundle, tmp_path)
    before = tree(m)
    target = float_target(tmp_path)
    proc = edgeship("bundle", m / "model_float32.tflite", "--target", target, "-o", m, "--force", "-q")
    one_line(proc, 1, "which this command reads")
    assert tree(m) == before


def test_targets_show_never_replaces_its_profile(tmp_path: Path) -> None:
    profile = tmp_path / "T.toml"
    shutil.copy(ROOT / "targets" / "x86-host.toml", profile)
    before = profile.read_bytes()
    one_line(edgeship("targets", "show", profile, "--json", profile, "--force"), 2, "which this command reads")
    assert profile.read_bytes() == before


def test_labels_named_by_a_card_are_an_input(tiny_bundle: Path, tmp_path: Path) -> None:
    """The labels file a card names is read by bundle: ``--json`` at it is refused."""
    m = _model_folder(tiny_bundle, tmp_path)
    card = json.loads((m / "model_card.json").read_text())
    (m / "labels.txt").write_text("".join(f"class{i}\n" for i in range(card["num_classes"])))
    card["labels_file"] = "labels.txt"
    (m / "model_card.json").write_text(json.dumps(card))
    (m / "model_float32.card.json").unlink()
    before = tree(m)
    proc = edgeship(
        "bundle", m / "model_float32.tflite", "--target", "x86-host", "-o", tmp_path / "b",
        "--json", m / "labels.txt", "--force", "-q",
    )  # fmt: skip
    one_line(proc, 2, "which this command reads")
    assert tree(m) == before
