"""Run native code that can abort in a child process, where an abort becomes an error.

TensorFlow's converter and quantizer and a first interpreter load of a model nobody has
run yet can kill the process (SIGABRT from a failed check, SIGSEGV on a bad graph).
:class:`ChildWorker` keeps one child for a run, started as ``python -m edgeship._worker``
(never through ``multiprocessing``'s spawn, which re-imports the caller's ``__main__``)
and speaking framed pickles over its standard input and output: calls go to it by
function reference, their results come back pickled, progress reports flow back while a
call runs, an exception the call raised is raised again here (or, when it cannot travel,
an :class:`EdgeshipError` naming its type and message), and a child that dies turns into
:class:`NativeCrashError` naming the stage, the signal or exit status and the last error
line the native code printed. The child dies with its parent (Linux
``PR_SET_PDEATHSIG``), and a dead child is replaced on the next call.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Callable

from edgeship._run import clean_dead_runs, owned_prefix
from edgeship.errors import EdgeshipError, NativeCrashError

log = logging.getLogger(__name__)

#: Set in the child: the log file its fds 1 and 2 go to (code that captures native logs reads it).
CHILD_LOG_ENV = "EDGESHIP_CHILD_LOG"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ERRORISH = re.compile(r"error|fatal|check failed|abort|failed", re.IGNORECASE)
_HEADER = struct.Struct(">Q")  # a frame: its length, then that many bytes of pickle


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


def write_frame(stream: IO[bytes], payload: Any) -> None:
    """Pickle ``payload`` and write it as one frame."""
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> bytes:
    """The next frame's bytes, not unpickled (so a frame that does not unpickle leaves the stream in step).

    Raises:
        EOFError: The other side closed the pipe or died, possibly mid-frame.
    """
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("pipe closed")
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("pipe closed mid-frame")
    return data


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ChildWorker:
    """One child process that runs native-code calls for a run; use as a context manager."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        """``env``: variables set in the child's environment besides this process's."""
        self._env = dict(env or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._busy = False
        clean_dead_runs()  # what killed runs left: an API run killed by SIGTERM removes nothing itself
        fd, self.log_path = tempfile.mkstemp(prefix=owned_prefix("native"), suffix=".log")
        os.close(fd)

    def __enter__(self) -> ChildWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        Path(self.log_path).unlink(missing_ok=True)

    def close(self) -> None:
        """End the child: closing its input ends an idle one; one interrupted mid-call is killed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._busy:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._busy = False

    def _start(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeship._worker", self.log_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, **self._env},
            )
        self._proc = proc
        write_frame(proc.stdin, ("path", list(sys.path)))  # type: ignore[arg-type]
        return proc

    def call(
        self, stage: str, fn: Callable[..., Any], *args: Any, progress: Callable[..., None] | None = None, **kwargs: Any
    ) -> Any:
        """``fn(*args, **kwargs)`` in the child; ``progress`` (if given) receives the child's reports.

        ``fn`` must be importable by module and name (not defined in ``__main__``).

        Raises:
            NativeCrashError: The child died; the message names ``stage``, the signal or
                exit status and the last error line the native code wrote.
            EdgeshipError: ``fn`` raised an exception that could not be sent back (its type
                and message named), or the call or its result did not pickle.
            Exception: Whatever ``fn`` raised, re-raised here.
        """
        proc = self._proc if self._proc is not None and self._proc.poll() is None else None
        if proc is None:
            self.close()
            proc = self._start()
        start = os.path.getsize(self.log_path)
        try:
            call = pickle.dumps(("call", fn, args, kwargs, progress is not None), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - e.g. a lambda: say so instead of a pickling traceback
            raise EdgeshipError(f"{stage}: the call cannot be sent to the worker process ({describe(exc)})") from None
        self._busy = True
        try:
            proc.stdin.write(_HEADER.pack(len(call)) + call)  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            while True:
                reply = pickle.loads(read_frame(proc.stdout))  # type: ignore[arg-type]
                if reply[0] != "progress":
                    break
                progress(*reply[1])  # type: ignore[misc]
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise self._crash(stage, start) from None
        self._busy = False  # not on an interrupt: close() then kills the child mid-call
        if reply[0] == "error":
            raise _failure(stage, reply[1], reply[2])
        return reply[1]

    def _crash(self, stage: str, log_from: int) -> NativeCrashError:
        proc = self._proc
        try:
            code = proc.wait(timeout=30) if proc is not None else None
        except subprocess.TimeoutExpired:
            code = None
        self._busy = True  # kill it if it still runs
        self.close()
        with open(self.log_path, "rb") as fh:
            fh.seek(log_from)
            text = fh.read().decode("utf-8", errors="replace")
        log.debug("native log of the crashed %s:\n%s", stage, text)
        last = one_line(text)
        what = "native code crashed" if code is not None and code < 0 else "the worker process exited"
        return NativeCrashError(
            f"{stage}: {what} ({signal_name(code)})"
            + (f": {last}" if last else ": it wrote no error")
            + "; nothing was written"
        )


def _failure(stage: str, pickled: bytes | None, summary: str) -> BaseException:
    """The exception a call raised in the child, or an :class:`EdgeshipError` naming it."""
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:  # noqa: BLE001 - its class does not import here
            exc = None
        if isinstance(exc, Exception):
            return exc
    return EdgeshipError(f"{stage}: {summary}")
