"""The command itself: version, help, module entry, usage errors."""

from __future__ import annotations

import subprocess
import sys

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
