"""A command's process-wide guards: its own temporary folder, and SIGTERM/SIGHUP handled like Ctrl-C.

Every temporary file or folder of a command run (this process's and its child
processes', through ``tempfile`` and ``TMPDIR``) lands in one folder,
``edgeship-run-<pid>.<host>-<random>`` in the system's temporary folder. It is removed
when the command ends, however it ends short of SIGKILL; the next run removes those of
processes that are gone (a killed run's, or one from before a reboot).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeship._io import owner_tag

log = logging.getLogger(__name__)

RUN_PREFIX = "edgeship-run-"
#: A temporary entry owned by one process: a run folder, or an API call's work folder or native log
#: (:func:`owned_prefix`), ``edgeship-<what>-<pid>.<host>-<random>[.log]``.
_RUN_DIR = re.compile(r"^edgeship-[a-z0-9]+-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})-[A-Za-z0-9_]{8}(\.log)?$")
#: Signals handled like Ctrl-C: the command unwinds, cleans up and exits ``128 + signal``.
HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when a handled signal arrives, so cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's live process
    return True


def owned_prefix(what: str) -> str:
    """The prefix of a temporary entry this process owns (``edgeship-<what>-<pid>.<host>-``): when the process
    is killed before it removes the entry (SIGTERM through the Python API, SIGKILL), a later run sweeps it."""
    return f"edgeship-{what}-{owner_tag()}-"


def clean_dead_runs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the temporary entries in ``root`` (default: the system's temporary folder) of processes that are
    gone: run folders, and the work folders and native logs of API calls (:func:`owned_prefix`)."""
    root = Path(root or lasting_temp_dir())
    host = owner_tag().split(".", 1)[1]
    removed = []
    with contextlib.suppress(OSError):
        for path in root.iterdir():
            m = _RUN_DIR.match(path.name)
            if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d temporary folder(s) of runs that were killed", len(removed))
    return removed


_outer: str | None = None  # the system's temporary folder while a run folder stands in for it


def lasting_temp_dir() -> str:
    """Where to leave a file for the user after the command ends (a failed tool's full log)."""
    return _outer or tempfile.gettempdir()


@contextlib.contextmanager
def run_temp_dir() -> Iterator[Path | None]:
    """Point ``tempfile`` and ``TMPDIR`` at a fresh run folder for the block, then remove it.

    Yields None (and changes nothing) when the system's temporary folder cannot be written:
    the code that needs a temporary file then says so itself.
    """
    clean_dead_runs()
    try:
        run = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{owner_tag()}-"))
    except OSError:
        yield None
        return
    global _outer
    saved_dir, saved_env, saved_outer = tempfile.tempdir, os.environ.get("TMPDIR"), _outer
    _outer = str(run.parent)
    tempfile.tempdir, os.environ["TMPDIR"] = str(run), str(run)
    try:
        yield run
    finally:
        tempfile.tempdir, _outer = saved_dir, saved_outer
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(run, ignore_errors=True)


def _raise_terminated(signum: int, _frame: Any) -> None:
    for sig in HANDLED:  # a second signal must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` in the block (main thread only; elsewhere a no-op)."""
    try:  # a signal ignored on purpose (nohup's SIGHUP) stays ignored
        saved = {
            sig: signal.signal(sig, _raise_terminated) for sig in HANDLED if signal.getsignal(sig) is not signal.SIG_IGN
        }
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
