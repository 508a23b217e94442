"""Run native code that can abort in a child process, where an abort becomes an error.

TensorFlow's converter and quantizer and a first interpreter load of a model nobody has
run yet can kill the process (SIGABRT from a failed check, SIGSEGV on a bad graph).
:class:`ChildWorker` keeps one spawned child for a run: calls go to it by function
reference, their results come back pickled, progress reports flow back while a call
runs, and a child that dies turns into :class:`NativeCrashError` naming the stage and
the last error line the native code printed. The child dies with its parent (Linux
``PR_SET_PDEATHSIG``), and a dead child is replaced on the next call.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from edgeship.errors import EdgeshipError, NativeCrashError

log = logging.getLogger(__name__)

#: Set in the child: the log file its fds 1 and 2 go to (code that captures native logs reads it).
CHILD_LOG_ENV = "EDGESHIP_CHILD_LOG"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERRORISH = re.compile(r"error|fatal|check failed|abort|failed", re.IGNORECASE)


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - no glibc
        pass


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one line without colour codes: the last error-looking line, else the last line."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERRORISH.search(ln)]
    return (errors or lines or [""])[-1][:limit]


def signal_name(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return f"exit status {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _serve(conn: Any, log_path: str) -> None:
    """The child's loop: run calls until the parent closes the pipe."""
    die_with_parent()
    os.environ[CHILD_LOG_ENV] = log_path
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # native logs (and an abort's last words) go to the log the parent reads
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except EOFError:
            return
        if kwargs.pop("_progress", False):
            kwargs["progress"] = lambda *a: conn.send(("progress", a))
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back as one message
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
            conn.send(("error", exc if _picklable(exc) else EdgeshipError(f"{type(exc).__name__}: {exc}")))


def _picklable(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        return False
    return True


class ChildWorker:
    """One spawned child that runs native-code calls for a run; use as a context manager."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that loaded TensorFlow
        self._proc: Any = None
        self._conn: Any = None
        fd, self.log_path = tempfile.mkstemp(prefix="edgeship-native-", suffix=".log")
        os.close(fd)

    def __enter__(self) -> "ChildWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
        Path(self.log_path).unlink(missing_ok=True)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._proc = self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self.log_path), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, stage: str, fn: Callable[..., Any], *args: Any,
             progress: Callable[..., None] | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the child; ``progress`` (if given) receives the child's reports.

        Raises:
            NativeCrashError: The child died; the message names ``stage`` and the last
                error line the native code wrote.
            Exception: Whatever ``fn`` raised, re-raised here.
        """
        if self._proc is None or not self._proc.is_alive():
            self.close()
            self._start()
        start = os.path.getsize(self.log_path)
        try:
            self._conn.send((fn, args, {**kwargs, "_progress": progress is not None}))
            while True:
                kind, payload = self._conn.recv()
                if kind != "progress":
                    break
                progress(*payload)  # type: ignore[misc]
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise self._crash(stage, start) from None
        if kind == "error":
            raise payload
        return payload

    def _crash(self, stage: str, log_from: int) -> NativeCrashError:
        self._proc.join(timeout=30)
        code = self._proc.exitcode
        self.close()
        with open(self.log_path, "rb") as fh:
            fh.seek(log_from)
            text = fh.read().decode("utf-8", errors="replace")
        log.debug("native log of the crashed %s:\n%s", stage, text)
        last = one_line(text)
        return NativeCrashError(f"{stage}: native code crashed ({signal_name(code)})"
                                + (f": {last}" if last else "") + "; nothing was written")
