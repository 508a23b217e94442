"""The child side of :class:`edgeship._child.ChildWorker`: ``python -m edgeship._worker``.

Started by module name, so it never imports the caller's ``__main__`` (a user's script
without an ``if __name__ == "__main__":`` guard, or one read from standard input, runs
once). It reads framed pickled calls from its standard input, runs them, and writes
framed pickled replies to its standard output; file descriptors 1 and 2 then point at
the log file the parent reads, so native logs and an abort's last words land there.

Frames: an 8-byte big-endian length, then that many bytes of pickle. Parent to child:
first ``("path", sys.path)``, then ``("call", fn, args, kwargs, wants_progress)``.
Child to parent: ``("progress", args)`` while a call runs, then ``("ok", value)`` or
``("error", pickled_exception_or_None, "Type: message")``.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from typing import IO, Any

from edgeship._child import CHILD_LOG_ENV, describe, die_with_parent, read_frame, write_frame


def _error_reply(exc: BaseException) -> tuple[str, bytes | None, str]:
    try:
        dumped = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(dumped)
        pickled: bytes | None = dumped
    except Exception:  # noqa: BLE001 - an exception that does not travel goes back as its description
        pickled = None
    if not isinstance(exc, Exception):  # SystemExit from library code, KeyboardInterrupt: never re-raised as such
        pickled = None
    return ("error", pickled, describe(exc))


def _run(frame: bytes, out: IO[bytes]) -> None:
    """Run one call frame and write its reply."""
    try:
        _, fn, args, kwargs, wants_progress = pickle.loads(frame)
    except Exception as exc:  # noqa: BLE001 - e.g. a function defined in the caller's __main__
        write_frame(out, ("error", None, f"the call could not be loaded in the worker ({describe(exc)})"))
        return
    if wants_progress:
        kwargs["progress"] = lambda *a: write_frame(out, ("progress", a))
    try:
        reply: Any = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back as one message
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        reply = _error_reply(exc)
    try:
        write_frame(out, reply)
    except Exception as exc:  # noqa: BLE001 - a result that does not pickle
        write_frame(out, ("error", None, f"the result could not be sent back ({describe(exc)})"))


def _pipes(log_path: str) -> tuple[IO[bytes], IO[bytes]]:
    """The protocol's streams (the original fds 0 and 1); fds 1 and 2 then go to the log, 0 to /dev/null."""
    inp = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    return inp, out


def main(argv: list[str]) -> int:
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request took effect
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes or kills us
    os.environ[CHILD_LOG_ENV] = argv[0]
    inp, out = _pipes(argv[0])
    try:
        _, path = pickle.loads(read_frame(inp))
    except EOFError:
        return 0
    sys.path[:] = [p for p in path if isinstance(p, str)]  # the caller's, so functions resolve as there
    while True:
        try:
            frame = read_frame(inp)
        except EOFError:
            return 0
        _run(frame, out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
