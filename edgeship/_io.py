"""Atomic artifact writes and output-folder staging.

Every artifact is written to a temporary name in the same folder and renamed into
place, so a crash or Ctrl-C never leaves a half-written file that looks valid.
Whole runs stage their files in a hidden sibling folder and publish them at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edgeship._files import atomic_copy as atomic_copy
from edgeship._files import atomic_write_bytes as atomic_write_bytes
from edgeship._files import atomic_write_json as atomic_write_json
from edgeship._files import atomic_write_text as atomic_write_text
from edgeship._files import cache_dir as cache_dir
from edgeship._files import file_kind_problem, input_problem, reads_path
from edgeship._files import os_error_line as os_error_line
from edgeship._files import sha256_file as sha256_file
from edgeship._lock import folder_lock
from edgeship._paths import check_writable_dir as check_writable_dir
from edgeship._paths import writable_dir_problem as writable_dir_problem
from edgeship.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)


def check_outputs_free(
    out_dir: Path, names: list[str], *, force: bool, reads: Iterable[str | os.PathLike[str] | None] = ()
) -> None:
    """Raise :class:`OutputExistsError` when any of ``names`` exists in ``out_dir``.

    Also checks, before any work, that ``out_dir`` can be written (:func:`check_writable_dir`)
    and that no output would replace one of the command's input files ``reads``, even with ``force``.
    """
    check_writable_dir(out_dir)
    if not Path(out_dir).exists():
        return
    for name in names:
        _refuse_input(Path(out_dir) / name, reads, f"output {name}")
        problem = replace_problem(Path(out_dir) / name)
        if problem:
            raise InputError(f"cannot write output {Path(out_dir) / name}: {problem}")
    if force:
        return
    clash = sorted(n for n in names if (out_dir / n).exists())
    if clash:
        raise OutputExistsError(
            f"{out_dir} already holds {', '.join(clash)}; pass {OutputExistsError.FORCE} to overwrite"
        )


def check_output_file(
    path: str | os.PathLike[str],
    flag: str,
    *,
    force: bool,
    reads: Iterable[str | os.PathLike[str] | None] = (),
    writes: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """The overwrite rule of a file a command writes (``--json``, ``-r``), checked before it runs.

    The file must not be a folder and its folder must be writable; an existing file is
    replaced only with ``force``, and never when the same command reads it (the same
    path or inode as an input file, or inside an input folder) or writes it otherwise.

    Args:
        path: The file to write.
        flag: How messages name it (``--json``).
        force: Whether an existing file may be replaced.
        reads: The command's input files and folders (None entries are skipped).
        writes: The command's other output files.

    Raises:
        InputError: A folder, an unwritable place, or a file the command reads or writes.
        OutputExistsError: The file exists and ``force`` is not given.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file path")
    problem = file_kind_problem(path) or writable_dir_problem(path.parent)
    if problem:
        raise InputError(f"cannot write {flag} {path}: {problem}")
    _refuse_input(path, reads, f"{flag} {path}")
    for other in (Path(p) for p in writes if p is not None):
        if path.resolve() == other.resolve():
            raise InputError(f"{flag} {path} is also written as another output of this command; write it elsewhere")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass {OutputExistsError.FORCE} to overwrite it")


def _refuse_input(path: Path, reads: Iterable[str | os.PathLike[str] | None], what: str) -> None:
    """Refuse ``path`` when it is an input of the command (``reads`` or declared with :func:`reading`)."""
    problem = input_problem(path, reads)
    if problem:
        raise InputError(f"{what}: {problem}")


def replace_problem(path: Path) -> str | None:
    """Why a published entry must not replace ``path`` (a folder may be replaced, as a whole set)."""
    if path.is_dir() and not path.is_symlink():
        return input_problem(path) or _inputs_inside(path)
    return file_kind_problem(path) or input_problem(path)


def _inputs_inside(folder: Path) -> str | None:
    from edgeship._files import declared_inputs

    for source in declared_inputs():
        if source.exists() and reads_path(folder, source):
            return f"it holds {source}, which this command reads; write it elsewhere"
    return None


#: Hidden names of a run's private folders: ``.<out>.staging-<owner>-<random>`` beside the
#: output folder, ``.<entry>.old-<owner>-<random>`` inside it while a set is swapped. The owner
#: (pid and host) says whose, so only those of dead processes on this host are cleaned.
_PRIVATE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)\.(?P<host>[0-9a-f]{8})-[A-Za-z0-9_]{8}$")
#: Staging folders named before the owner was in the name: removed once this old (seconds).
_LEGACY_STAGING = re.compile(r"^\.(?P<name>.+)\.staging-[a-z0-9_]{8}$")
LEGACY_STALE_AFTER = 24 * 3600.0
#: A temporary file of :func:`atomic_write_bytes` (left behind only by a killed process).
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def private_name(name: str) -> bool:
    """Whether ``name`` is one of edgeship's own temporary or moved-aside entries (by its pattern)."""
    return bool(_PRIVATE.match(name) or _TEMP.match(name))


def owner_tag(pid: int | None = None) -> str:
    """``<pid>.<host hash>``: who made a private folder (this process by default)."""
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid() if pid is None else pid}.{host}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this host) still runs."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_entry(path: Path) -> None:
    """Remove a file or folder, read-only parts included (they were ours to replace)."""

    def retry(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
        func(p)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=retry)
    else:
        path.unlink(missing_ok=True)


def clean_stale(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left behind for ``out_dir``; return what was removed or restored.

    A staging folder whose owner process is gone is deleted. An entry moved aside during
    a swap whose owner is gone is put back when its place is empty (the run died before
    the new entry arrived), else deleted. Folders of live runs are never touched.
    """
    out_dir = Path(out_dir)
    done: list[Path] = []
    candidates = []
    with contextlib.suppress(OSError):
        candidates += [
            (p, "staging") for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.staging-")
        ]
    with contextlib.suppress(OSError):
        candidates += [(p, "old") for p in out_dir.iterdir() if ".old-" in p.name]
    host = owner_tag().split(".", 1)[1]
    for path, kind in candidates:
        m = _PRIVATE.match(path.name)
        if not m:
            legacy = kind == "staging" and _LEGACY_STAGING.match(path.name)
            with contextlib.suppress(OSError):
                if legacy and time.time() - path.stat().st_mtime > LEGACY_STALE_AFTER:
                    remove_entry(path)
                    done.append(path)
            continue
        if m["kind"] != kind or m["host"] != host or pid_alive(int(m["pid"])):
            continue
        try:
            if kind == "old" and not (out_dir / m["name"]).exists():
                os.rename(path, out_dir / m["name"])
            else:
                remove_entry(path)
            done.append(path)
        except OSError as exc:
            log.warning("could not clean up %s left by a killed run: %s", path, exc)
    return done


def _swap_in(stage: Path, out_dir: Path) -> None:
    """Move every entry of ``stage`` into ``out_dir`` as one set, or leave ``out_dir`` as it was.

    Old entries are first renamed aside inside ``out_dir`` (same folder: no copy, and a
    read-only folder can be renamed), then the new ones are renamed in; only when all
    are in place is the old set deleted. Any failure puts the old set back.
    """
    entries = sorted(p.name for p in stage.iterdir())
    tag = f"old-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    aside: list[tuple[Path, Path]] = []  # (original place, aside name)
    placed: list[str] = []
    try:
        for name in entries:
            problem = replace_problem(out_dir / name)
            if problem:
                raise InputError(f"cannot publish {out_dir / name}: {problem}")
        for name in entries:
            target = out_dir / name
            if target.exists() or target.is_symlink():
                hidden = out_dir / f".{name}.{tag}"
                os.rename(target, hidden)
                aside.append((target, hidden))
        for name in entries:
            os.rename(stage / name, out_dir / name)
            placed.append(name)
    except OSError as exc:
        for name in reversed(placed):
            with contextlib.suppress(OSError):
                os.rename(out_dir / name, stage / name)
        for target, hidden in reversed(aside):
            with contextlib.suppress(OSError):
                os.rename(hidden, target)
        raise InputError(
            f"cannot publish into {out_dir}: {exc.strerror or exc} ({exc.filename}); nothing was replaced"
        ) from None
    for _target, hidden in aside:
        try:
            remove_entry(hidden)
        except OSError as exc:
            log.warning("published %s, but could not delete the replaced %s: %s", out_dir, hidden, exc)


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike[str], names: list[str], *, force: bool) -> Iterator[Path]:
    """Stage a run's artifacts and publish them into ``out_dir`` only on success, as one set.

    Yields a private staging folder beside ``out_dir`` (``.<out>.staging-<pid>-*``;
    those of killed runs are removed first). When the block finishes, the staged entries
    replace their namesakes in ``out_dir`` all together or not at all (replacing only
    when ``force``); when it raises, the staging folder is removed and ``out_dir`` is
    left as it was.
    """

    out_dir = Path(out_dir).resolve()
    check_outputs_free(out_dir, names, force=force)
    with folder_lock(out_dir):
        clean_stale(out_dir)
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-{owner_tag()}-", dir=out_dir.parent))
        except OSError as exc:
            raise InputError(f"cannot write beside output folder {out_dir}: {exc.strerror or exc}") from None
        try:
            yield stage
            check_outputs_free(out_dir, [p.name for p in stage.iterdir()], force=force)
            _swap_in(stage, out_dir)
        except OSError as exc:
            raise _in_place(exc, stage, out_dir) from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _in_place(exc: OSError, stage: Path, out_dir: Path) -> OSError:
    """An error naming a staged file, as naming the file it was going to be in ``out_dir``."""
    name = exc.filename
    if isinstance(name, str) and Path(name).is_relative_to(stage):
        return OSError(exc.errno, exc.strerror, str(out_dir / Path(name).relative_to(stage)))
    return exc
