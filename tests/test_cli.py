"""The command itself: version, help, module entry, usage errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeship import __version__
from edgeship.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"edgeship {__version__}"


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "convert" in capsys.readouterr().out


def test_no_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "edgeship", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"edgeship {__version__}"


def test_unknown_option_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--no-such-flag"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "m.onnx", "m.tflite", "--images", "imgs", "--target", "x86-host"],
        ["deploy", "m.onnx", "--calib", "imgs", "--target", "x86-host", "-o", "out"],
    ],
)
def test_adb_drift_checks_are_explained_not_offered(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main([argv[0], "--help"])
    assert "--adb" not in capsys.readouterr().out
    code = main([*argv, "--adb", "SERIAL"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Python on the" in err and "--emulate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["emulate", "status"], ["targets", "list"]])
def test_json_of_commands_without_force(argv: list[str], tmp_path: Path) -> None:
    """Commands that have no --force still write --json (they once failed with an internal error)."""
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "edgeship", *argv, "--json", str(out)], capture_output=True, text=True)
    assert run.returncode == 0 and out.is_file(), run.stderr
