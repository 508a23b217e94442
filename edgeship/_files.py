"""Atomic file writes, the JSON writer and the cache folder: what the device runtime also writes with.

Every file is written to a temporary name in the same folder and renamed into place, so a crash
or Ctrl-C never leaves a half-written file that looks valid. Standard library only (numpy is
used when present), so the on-device runtime can use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edgeship._version import SCHEMA_VERSION
from edgeship.errors import InputError

#: Errors of a write that the disk refused: reported naming the file being written.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: str) -> None:
    """mkstemp creates 0600 files; give artifacts the usual umask-based mode."""
    os.chmod(tmp, 0o666 & ~_umask())


#: What the running commands read, declared once per command (:func:`reading`): never written.
_declared: list[tuple[Path, ...]] = []
_declared_lock = threading.Lock()
_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class WriteRefused(InputError):
    """A write the one write rule refuses (:func:`write_problem`)."""


@contextlib.contextmanager
def reading(paths: Iterable[str | os.PathLike[str] | None]) -> Iterator[tuple[Path, ...]]:
    """Declare, for the block, the files and folders the command reads: no write may replace one."""
    declared = tuple(Path(p) for p in paths if p is not None)
    with _declared_lock:
        _declared.append(declared)
    try:
        yield declared
    finally:
        with _declared_lock:
            _declared.remove(declared)


def declared_inputs() -> list[Path]:
    """Every input declared by the commands running in this process."""
    with _declared_lock:
        return [p for group in _declared for p in group]


def file_kind_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is no place for a regular file (None: missing, or a regular file or a link to one)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            st = os.stat(path)
    except FileNotFoundError:
        return "it is a dangling symbolic link" if os.path.islink(path) else None
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror or exc})"
    if stat.S_ISREG(st.st_mode):
        return None
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
    return f"it is {kind}; edgeship writes only regular files"


def reads_path(source: Path, path: Path) -> bool:
    """Whether writing ``path`` replaces ``source`` or a file inside it (symbolic and hard links count)."""
    try:
        if source.is_dir():
            resolved, root = path.resolve(), source.resolve()
            return path.exists() and (resolved == root or root in resolved.parents)
        if path.resolve() == source.resolve():
            return True
        return os.path.samefile(path, source)
    except (OSError, RuntimeError):  # missing, or a symbolic link loop
        return False


def input_problem(path: str | os.PathLike[str], reads: Iterable[str | os.PathLike[str] | None] = ()) -> str | None:
    """Why writing ``path`` would replace an input (``reads`` and those declared with :func:`reading`)."""
    for source in [*(Path(p) for p in reads if p is not None), *declared_inputs()]:
        if reads_path(source, Path(path)):
            return f"it would replace {source}, which this command reads; write it elsewhere"
    return None


def write_problem(path: str | os.PathLike[str], reads: Iterable[str | os.PathLike[str] | None] = ()) -> str | None:
    """The one write rule: why ``path`` must not be (re)written (None: it may).

    Only a regular file (or nothing) is ever replaced: never a device node, a FIFO, a socket,
    a folder or a dangling symbolic link; and never a file the running command reads.
    """
    return file_kind_problem(path) or input_problem(path, reads)


def check_write(path: str | os.PathLike[str]) -> None:
    """Raise :class:`WriteRefused` when the write rule refuses ``path``."""
    problem = write_problem(path)
    if problem:
        raise WriteRefused(f"cannot write {path}: {problem}")


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temporary file beside ``path`` that replaces it when the block ends, removed if the block fails.

    Every file edgeship writes goes through here, so the write rule (:func:`check_write`) is
    checked here, before and again just before the rename. A write the disk refuses (full,
    read-only) is reported naming ``path``: a full disk's error names no file, a copy's names its source.
    """
    check_write(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield tmp
            _publishable(tmp)
            check_write(path)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with _replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically; a JSON object gets ``schema_version`` when it has none."""
    if isinstance(obj, dict) and "schema_version" not in obj:
        obj = {"schema_version": SCHEMA_VERSION, **obj}
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a file atomically."""
    dst = Path(dst)
    with _replacing(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def os_error_line(exc: OSError) -> str:
    """One line for an error of the file system: what it said and the file (the one written, for a full disk)."""
    name = exc.filename2 if exc.errno in _WRITE_ERRNOS and exc.filename2 else exc.filename
    if exc.errno in _WRITE_ERRNOS and name:
        return f"cannot write {name}: {exc.strerror or exc}"
    return f"{exc.strerror or exc}: {name}" if name else str(exc)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover - numpy is a hard dependency
        pass
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(*parts: str) -> Path:
    """edgeship's cache: ``$EDGESHIP_CACHE``, else ``$XDG_CACHE_HOME/edgeship``, else ``~/.cache/edgeship``."""
    if os.environ.get("EDGESHIP_CACHE"):
        return Path(os.environ["EDGESHIP_CACHE"]).expanduser().joinpath(*parts)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "edgeship", *parts)
