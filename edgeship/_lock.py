"""One writer per output folder: an ``fcntl.flock`` on a lock file inside it.

Every command that writes a folder (convert, quantize, verify's report folder, bench,
bundle, deploy) holds :func:`folder_lock` on it while it runs; a second writer is
refused with one line naming the run that holds it. The lock is taken again freely by
the same thread (a command, then the library call that publishes), and the lock file
is removed when released, as is a folder the lock had to create and nothing else filled.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from edgeship._paths import check_writable_dir
from edgeship.errors import InputError

#: The lock file inside a folder being written (hidden: image listings and bundles skip it).
LOCK_FILE = ".edgeship.lock"

_held: dict[tuple[int, Path], int] = {}  # (thread, folder) -> depth


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str = "output folder") -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if missing) for the ``with`` block.

    Raises:
        InputError: Another process (or thread) holds it, or the folder cannot be created.
    """
    try:
        root = Path(folder).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of symbolic links (Python 3.11)
        raise InputError(f"cannot use {what} {folder}: {exc}") from None
    key = (threading.get_ident(), root)
    if key in _held:
        _held[key] += 1
        try:
            yield root
        finally:
            _held[key] -= 1
        return
    check_writable_dir(root, what)
    created = _make_dirs(root, what)
    try:
        fd = _acquire(root / LOCK_FILE)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        yield root
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(root / LOCK_FILE)  # while still locked: a waiter re-checks the inode it locked
        os.close(fd)
        _remove_empty(created)


def _make_dirs(root: Path, what: str) -> list[Path]:
    """Create ``root`` and missing parents; return those created, outermost first."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {what} {root}: {exc.strerror or exc}") from None
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders the lock created, innermost first, where nothing else was put."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


def _acquire(path: Path) -> int:
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(
                f"{path.parent} is being written by another edgeship run ({holder}); wait for it "
                "to finish or pick another folder"
            ) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}".encode())
            return fd
        os.close(fd)  # its holder removed the file after we opened it: lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
        if text:
            return text
    return "holder unknown"
