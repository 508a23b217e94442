"""Check a TFLite file before an interpreter opens it in this process (a corrupt model can crash it).

The flatbuffer is bounds-checked here, then a child process with the same interpreter package
loads, allocates and runs it once; verdicts are cached by content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from edgeship._files import cache_dir
from edgeship.errors import InputError
from edgeship.runtime.flatbuffer import FlatbufferError, verify_tflite
from edgeship.runtime.interpreter import BACKEND_MODULES, backend_version, pick_backend

log = logging.getLogger(__name__)


#: Seconds one model may take to load, allocate and run once in the checking child.
CHECK_TIMEOUT = 300.0
#: Bumped when the check changes, so cached verdicts of an older check are not trusted.
_CHECK_VERSION = 4
#: Exit code of the checking child when it cannot import the interpreter (no verdict).
_NO_INTERPRETER = 4
# The checking child: one model per line of stdin, one verdict per line of stdout, flushed
# before the next model, so a crash is pinned on the model it happened in. It loads,
# allocates and runs each model once on zeros, as the runtime would, with the same
# interpreter package; it imports nothing but that package and numpy.
_CHECK_SCRIPT = r"""
import gc, importlib, sys
try:  # a corrupt model can ask for any amount of memory: cap the child, not the machine
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
except (ImportError, ValueError, OSError):
    pass
try:
    import numpy as np
    Interpreter = importlib.import_module(sys.argv[1]).Interpreter
except Exception as exc:
    sys.stderr.write("cannot import %s: %s\n" % (sys.argv[1], exc))
    sys.exit(4)
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        it = Interpreter(model_path=path)
        it.allocate_tensors()
        for d in it.get_input_details():
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()
        for d in it.get_output_details():
            it.get_tensor(d["index"])
        del it
        gc.collect()  # a crash while freeing the interpreter belongs to this model too
        verdict = "ok"
    except Exception as exc:
        verdict = "bad " + (" ".join(str(exc).split())[:300] or type(exc).__name__)
    sys.stdout.write(verdict + "\n")
    sys.stdout.flush()
"""


def _check_cache_dir() -> Path:
    return cache_dir("model-checks")


def _header_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a TFLite flatbuffer, judged from its size and first bytes (None: plausible)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if size < 16:
        return f"it is {size} bytes, too small to be a model"
    if head[4:8] != b"TFL3":
        return "it is not a TFLite flatbuffer (no TFL3 identifier at byte 4)"
    root = int.from_bytes(head[:4], "little")
    if root < 8 or root + 4 > size:
        return f"its root table offset {root} lies outside the {size}-byte file (truncated or corrupt)"
    return None


def _structure_problem(path: Path) -> str | None:
    """What is out of bounds in the flatbuffer (see :mod:`edgeship.runtime.flatbuffer`), or None."""
    import struct

    try:
        verify_tflite(path.read_bytes())
    except FlatbufferError as exc:
        return str(exc)
    except (struct.error, IndexError, OverflowError) as exc:  # a bound the walk missed: still refuse
        return f"malformed flatbuffer ({exc})"
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    return None


def _cache_key(path: Path, backend: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    h.update(json.dumps([_CHECK_VERSION, backend, backend_version(backend), platform.machine()]).encode())
    return h.hexdigest()


def _read_verdict(cache: Path, key: str) -> str | None:
    """The cached verdict, or None: a missing, unreadable or wrongly typed entry is a cache miss."""
    try:
        verdict = json.loads((cache / f"{key}.json").read_bytes().decode("utf-8"))["verdict"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return verdict if isinstance(verdict, str) else None


def _store_verdict(cache: Path, key: str, verdict: str) -> None:
    """Best effort: a read-only or full cache only costs the next run another check."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"verdict": verdict}, fh)
        os.replace(tmp, cache / f"{key}.json")
    except OSError as exc:
        log.debug("cannot cache the model check in %s: %s", cache, exc)


def _run_checker(paths: list[Path], backend: str) -> dict[int, str] | None:
    """Verdicts (``ok``/``bad ...``/``crash ...``) by index; None when no child can check here."""
    verdicts: dict[int, str] = {}
    start = 0
    while start < len(paths):
        todo = paths[start:]
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHECK_SCRIPT, BACKEND_MODULES[backend]],
                input="".join(f"{p}\n" for p in todo),
                capture_output=True,
                text=True,
                timeout=CHECK_TIMEOUT * len(todo),
                check=False,
            )
        except OSError as exc:  # e.g. an emulated guest that cannot start a second interpreter
            log.debug("cannot start the model-checking child: %s", exc)
            return None
        except subprocess.TimeoutExpired:
            verdicts[start] = f"crash: loading and running it once took over {CHECK_TIMEOUT:g} s"
            start += 1
            continue
        if proc.returncode == _NO_INTERPRETER or "ready" not in proc.stdout.splitlines():
            # No interpreter, or the child never started (an emulated guest whose executable only runs
            # under its emulator's root): no verdict, rather than blaming the model or the interpreter.
            log.debug("model-checking child could not check (exit %s): %s", proc.returncode, proc.stderr.strip())
            return None
        done = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "bad"))]
        for i, line in enumerate(done):
            verdicts[start + i] = line
        start += len(done)
        if proc.returncode != 0 and start < len(paths):
            how = (
                (
                    signal.Signals(-proc.returncode).name
                    if -proc.returncode in signal.valid_signals()
                    else f"exit {proc.returncode}"
                )
                if proc.returncode < 0
                else f"exit {proc.returncode}"
            )
            verdicts[start] = f"crash: the interpreter crashed on it ({how})"
            start += 1
        elif len(done) < len(todo):  # the child stopped early without a crash: should not happen
            verdicts[start] = f"crash: the checking child stopped (exit {proc.returncode})"
            start += 1
    return verdicts


def check_model_files(paths: Sequence[str | os.PathLike[str]], *, backend: str | None = None) -> dict[Path, str | None]:
    """Check TFLite files before any interpreter opens them in this process.

    A truncated or corrupt flatbuffer can crash the interpreter (a segfault, which no
    ``try`` catches). So every offset and index of the file's flatbuffer is bounds-checked
    here (:mod:`edgeship.runtime.flatbuffer`; an out-of-bounds read may or may not crash,
    so a child alone cannot be trusted with it), then the file is loaded, allocated, run
    once on zeros and freed in a child process with the same interpreter package; a
    crash there only kills the child. Verdicts are cached by content
    (``~/.cache/edgeship/model-checks``), so a model is checked once per interpreter.
    Where no child can run the interpreter (an emulated guest), the in-process checks stand alone.

    Returns:
        For each path, None when it is usable, else one line saying what is wrong.
    """
    backend = backend or pick_backend()
    cache = _check_cache_dir()
    result: dict[Path, str | None] = {}
    pending: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.is_file():
            result[p] = "it does not exist"
            continue
        problem = _header_problem(p) or _structure_problem(p)
        if problem:
            result[p] = problem
            continue
        key = _cache_key(p, backend)
        verdict = _read_verdict(cache, key)
        if verdict is None:
            pending.append((p, key))
        else:
            result[p] = _problem(verdict, backend)
    if pending:
        verdicts = _run_checker([p for p, _ in pending], backend)
        for i, (p, key) in enumerate(pending):
            verdict = verdicts.get(i, "ok") if verdicts is not None else "ok"
            if verdicts is not None:
                _store_verdict(cache, key, verdict)
            result[p] = _problem(verdict, backend)
    return result


def _problem(verdict: str, backend: str) -> str | None:
    """One line for a verdict. A crash comes after the structural check passed: the interpreter failed, not the file."""
    if verdict == "ok":
        return None
    kind, _, detail = verdict.partition(" ")
    if kind == "crash:":
        who = f"{backend} {backend_version(backend) or '(version unknown)'} on {platform.machine()}"
        detail = detail.replace("the interpreter crashed", f"the interpreter ({who}) crashed")
        if who not in detail:
            detail = f"{detail} ({who})"
        return (
            f"{detail}; the file passed the structural check, so the interpreter failed, not the file: "
            "try another version of the interpreter package"
        )
    return detail or "the interpreter rejected it"


def check_model_file(path: str | os.PathLike[str], *, backend: str | None = None) -> None:
    """Raise :class:`InputError` (one line) unless ``path`` is a TFLite model the interpreter can run."""
    problem = check_model_files([path], backend=backend)[Path(path)]
    if problem:
        raise InputError(f"cannot load TFLite model {path}: {problem}")
