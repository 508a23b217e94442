"""What native code writes to file descriptor 2, sent to the log instead of the terminal.

LiteRT, MediaPipe and TensorFlow print with C stdio ("INFO: Created TensorFlow Lite XNNPACK delegate"),
so only moving the descriptor catches it. fd 2 is one per process: every thread that enters shares one
redirection, made by the first to enter and undone by the last to leave. (Each thread saving and
restoring fd 2 on its own left it pointing at another thread's sink when their spans overlapped, and the
process's stderr, its one-line errors included, went nowhere from then on.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

log = logging.getLogger("edgeship.runtime.interpreter")

_lock = threading.Lock()
_state: dict[str, Any] = {"depth": 0, "saved": None, "sink": None}


@contextlib.contextmanager
def native_stderr_to_log(level: int | None = None) -> Iterator[None]:
    """Send fd 2 to the log while the block runs: INFO lines at DEBUG, anything else at WARNING, or every
    line at ``level`` when given (start-up chatter that says nothing wrong)."""
    entered = _enter()
    try:
        yield
    finally:
        if entered:
            _log_lines(_leave(), level)


def _enter() -> bool:
    """Join the redirection, making it if this is the first thread in; False where fd 2 cannot be moved."""
    with _lock:
        if _state["depth"] == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError):  # no fd 2 (embedded, closed): nothing to redirect
                return False
            sink: IO[bytes] = tempfile.TemporaryFile()
            os.dup2(sink.fileno(), 2)
            _state.update(saved=saved, sink=sink)
        _state["depth"] += 1
        return True


def _leave() -> bytes:
    """Leave the redirection; the last thread out restores fd 2 and gets what was written meanwhile."""
    with _lock:
        _state["depth"] -= 1
        if _state["depth"]:
            return b""
        saved, sink = _state["saved"], _state["sink"]
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        text = sink.read()
        sink.close()
        _state.update(saved=None, sink=None)
        return bytes(text)


def _log_lines(text: bytes, level: int | None) -> None:
    for line in text.decode("utf-8", "replace").splitlines():
        if line.strip():
            default = logging.DEBUG if line.startswith("INFO:") else logging.WARNING
            log.log(level if level is not None else default, "%s", line)
